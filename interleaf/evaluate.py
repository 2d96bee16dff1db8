"""`interleaf eval MODEL_DIR`: score a model on held-out scenes of the built-in shapes world.

Five measurements, all deterministic for a given seed:

- text -> image: draw each held-out caption, read the drawing back with the world's analyser
  (`interleaf.data.analyse`) and score colours, shapes, sizes, positions and exact scenes,
  with classifier-free guidance on and off;
- image -> text: caption each held-out image (greedy) and score the parsed caption the same way;
- story steps (interleaved): given a scene's caption, its image and a change ("then the red
  circle moves to the top left"), draw the next scene and score it against the scene the change
  leads to, beside the scores of leaving the scene as it was (what ignoring the text gets);
- held-out loss and perplexity per modality (text tokens, image tokens) on caption->image and
  image->caption documents;
- VQ-GAN reconstruction PSNR and codebook usage on the held-out images.

Held-out means drawn from a world seed the training data never uses (`EvalConfig.world_seed`);
the world is finite at the level of single scenes, so a one-shape scene can still coincide with a
training scene by chance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import interleaf
from interleaf.data.analyse import analyse, mean_scores, score_caption, score_image, score_scene
from interleaf.data.shapes import Scene, ShapesWorld
from interleaf.errors import InterleafError
from interleaf.sampling.generate import Request, check_pipe, collect, stream_requests
from interleaf.sampling.params import SamplingParams
from interleaf.tokenizer.image import load_image, to_pil
from interleaf.tokenizer.vqgan import code_stats, psnr
from interleaf.utils import check_writable, write_json

HELDOUT_WORLD_SEED = 1_000_003  # no training config uses this world seed


@dataclass
class EvalConfig:
    """What `interleaf eval` measures and on how much data."""

    n_draw: int = 48  # held-out captions drawn (per CFG setting)
    n_caption: int = 48  # held-out images captioned
    n_loss: int = 64  # held-out pairs for the loss (each in both orders)
    n_story: int = 48  # held-out story steps drawn (at the first of cfg_scales)
    cfg_scales: list[float] = field(default_factory=lambda: [3.0, 1.0])
    world_seed: int = HELDOUT_WORLD_SEED
    max_shapes: int = 3
    seed: int = 0  # sampling seed
    batch_size: int = 8
    image_temperature: float = 1.0
    image_top_k: int = 0
    image_top_p: float = 1.0
    image_parallel: int = 1  # the drawings' speculative window (1: one code per forward pass)

    def validate(self) -> None:
        if min(self.n_draw, self.n_caption, self.n_loss, self.n_story) < 0:
            raise InterleafError("eval sizes must be >= 0")
        if self.batch_size < 1:
            raise InterleafError("eval batch_size must be >= 1")
        last = max(self.n_draw, self.n_caption, self.n_story)  # requests use seed + i
        for s in self.cfg_scales:  # the sampler's own checks of the drawing requests, before any work
            for i in (0, last):
                _drawing("", self, s, i)


def _world(pipe, cfg: EvalConfig):
    if pipe.vqgan is None:
        raise InterleafError("this model directory has no VQ-GAN: image evaluation needs one")
    return ShapesWorld(resolution=pipe.vqgan.config.resolution, max_shapes=cfg.max_shapes, seed=cfg.world_seed)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _drawing(prompt, cfg: EvalConfig, cfg_scale: float, i: int):
    """The Request that draws one image for `prompt` (item i of a measurement)."""
    params = SamplingParams(
        mode="image",
        cfg_scale=cfg_scale,
        seed=cfg.seed + i,
        image_temperature=cfg.image_temperature,
        image_top_k=cfg.image_top_k,
        image_top_p=cfg.image_top_p,
        image_parallel=cfg.image_parallel,
    )
    return Request(prompt, params)


def _run_requests(pipe, requests) -> list:
    return collect(stream_requests(pipe, requests))


def eval_draw(pipe, cfg: EvalConfig, cfg_scale: float, progress: bool = True) -> dict:
    """Draw held-out captions; score each drawing with the analyser."""
    world = _world(pipe, cfg)
    scores, examples = [], []
    bar = tqdm(total=cfg.n_draw, desc=f"draw (cfg {cfg_scale:g})", unit="img", disable=not progress)
    for batch in _batches(cfg.n_draw, cfg.batch_size):
        pairs = [world.pair(i) for i in batch]
        requests = [_drawing(caption, cfg, cfg_scale, i) for i, (_, caption, _) in zip(batch, pairs)]
        for (_, caption, scene), doc in zip(pairs, _run_requests(pipe, requests)):
            image = doc.images[0] if doc.images else None
            s = score_image(image, scene) if image is not None else score_image_missing()
            scores.append(s)
            if len(examples) < 4:
                examples.append({"caption": caption, "scores": s})
        bar.update(len(batch))
    bar.close()
    return {"cfg_scale": cfg_scale, "n": cfg.n_draw, **mean_scores(scores), "examples": examples}


def eval_story(pipe, cfg: EvalConfig, cfg_scale: float, progress: bool = True) -> dict:
    """Draw the scene after the first change of held-out stories; score it against that scene.

    `unchanged` holds the scores the scene before the change would get (a model that ignores the
    text), `copied` the share of drawings that show the scene before the change again.
    """
    world = _world(pipe, cfg)  # documents come from their own stream: no scene of the other measurements
    scores, unchanged, copied, examples = [], [], [], []
    bar = tqdm(total=cfg.n_story, desc=f"story step (cfg {cfg_scale:g})", unit="img", disable=not progress)
    for batch in _batches(cfg.n_story, cfg.batch_size):
        steps = [world.story_step(i) for i in batch]
        requests = [_drawing(prompt, cfg, cfg_scale, i) for i, (prompt, _, _) in zip(batch, steps)]
        for (prompt, before, after), doc in zip(steps, _run_requests(pipe, requests)):
            drawn = analyse(doc.images[0]) if doc.images else None
            s = score_scene(drawn, after)
            scores.append(s)
            unchanged.append(score_scene(before, after))
            copied.append(score_scene(drawn, before)["exact"])
            if len(examples) < 4:
                examples.append({"change": prompt[2], "scores": s})
        bar.update(len(batch))
    bar.close()
    return {
        "cfg_scale": cfg_scale,
        "n": cfg.n_story,
        **mean_scores(scores),
        "copied": sum(copied) / max(len(copied), 1),
        "unchanged": mean_scores(unchanged),
        "examples": examples,
    }


def score_image_missing() -> dict:
    """Scores of a drawing request that produced no image."""
    return score_scene(None, Scene([]))


def eval_caption(pipe, cfg: EvalConfig, progress: bool = True) -> dict:
    """Caption held-out images greedily; score each parsed caption."""
    world = _world(pipe, cfg)
    offset = 10 * max(cfg.n_draw, 1)  # images other than the drawn captions' scenes
    scores, examples = [], []
    bar = tqdm(total=cfg.n_caption, desc="caption", unit="img", disable=not progress)
    for batch in _batches(cfg.n_caption, cfg.batch_size):
        pairs = [world.pair(offset + i) for i in batch]
        requests = [
            Request([image], SamplingParams(mode="text", temperature=0.0, max_new_tokens=64, seed=cfg.seed + i))
            for i, (image, _, _) in zip(batch, pairs)
        ]
        for (_, caption, scene), doc in zip(pairs, _run_requests(pipe, requests)):
            text = doc.text.strip()
            s = score_caption(text, scene)
            scores.append(s)
            if len(examples) < 4:
                examples.append({"truth": caption, "generated": text, "scores": s})
        bar.update(len(batch))
    bar.close()
    return {"n": cfg.n_caption, **mean_scores(scores), "examples": examples}


@torch.no_grad()
def eval_loss(pipe, cfg: EvalConfig, progress: bool = True) -> dict:
    """Held-out CE per modality on caption->image and image->caption documents."""
    world = _world(pipe, cfg)
    offset = 20 * max(cfg.n_draw, cfg.n_caption, 1)
    model, vocab = pipe.model, pipe.vocab
    sums = {"text": 0.0, "image": 0.0}
    counts = {"text": 0, "image": 0}
    image_mask = vocab.image_mask().to(pipe.device)
    for i in tqdm(range(cfg.n_loss), desc="held-out loss", unit="pair", disable=not progress):
        image, caption, _ = world.pair(offset + i)
        codes = pipe.tokenizer.encode([image], bos=False, eos=False)  # encode the image once
        text = pipe.text.encode(caption)
        for ids in ([vocab.bos_id, *text, *codes, vocab.eos_id], [vocab.bos_id, *codes, *text, vocab.eos_id]):
            ids = ids[: model.args.max_seq_len + 1]
            tokens = torch.tensor([ids[:-1]], device=pipe.device)
            targets = torch.tensor([ids[1:]], device=pipe.device)
            out = model.loss(tokens, targets, is_image=image_mask[targets])
            for kind, loss, n in (
                ("text", out.text_loss, out.n_text_tokens),
                ("image", out.image_loss, out.n_image_tokens),
            ):
                sums[kind] += float(loss) * int(n)
                counts[kind] += int(n)
    result = {}
    for kind in ("text", "image"):
        mean = sums[kind] / max(counts[kind], 1)
        result[f"{kind}_loss"] = mean
        result[f"{kind}_perplexity"] = math.exp(min(mean, 50.0))
        result[f"{kind}_tokens"] = counts[kind]
    return result


@torch.no_grad()
def eval_vqgan(pipe, cfg: EvalConfig, n: int = 64) -> dict:
    """VQ-GAN PSNR and codebook usage on held-out images, and the analyser's scores of the
    reconstructions: what a perfect transformer could reach at text->image through these codes."""
    world = _world(pipe, cfg)
    vq = pipe.vqgan
    offset = 30 * max(cfg.n_draw, cfg.n_caption, 1)
    pairs = [world.pair(offset + i) for i in range(n)]
    x = torch.stack([load_image(image, vq.config.resolution) for image, _, _ in pairs]).to(vq.device)
    codes = vq.encode(x)
    recon = vq.decode_code(codes)
    roundtrip = mean_scores(score_image(to_pil(r), scene) for r, (_, _, scene) in zip(recon, pairs))
    return {
        "psnr": float(psnr(recon, x).mean()),
        **code_stats(codes, vq.config.n_embed),
        "n": n,
        "roundtrip": roundtrip,
    }


def evaluate(pipe, cfg: EvalConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every measurement; return the report as a dict."""
    cfg.validate()
    if cfg.n_draw or cfg.n_story:  # what only the model can refuse (a window beyond an image), before any work
        check_pipe(pipe, [_drawing("", cfg, s, 0) for s in cfg.cfg_scales])
    start = time.time()
    report: dict = {"config": asdict(cfg)}
    report["vqgan"] = eval_vqgan(pipe, cfg)
    report["loss"] = eval_loss(pipe, cfg, progress) if cfg.n_loss else {}
    report["text_to_image"] = [eval_draw(pipe, cfg, s, progress) for s in cfg.cfg_scales] if cfg.n_draw else []
    report["image_to_text"] = eval_caption(pipe, cfg, progress) if cfg.n_caption else {}
    report["story"] = eval_story(pipe, cfg, cfg.cfg_scales[0], progress) if cfg.n_story and cfg.cfg_scales else {}
    report["seconds"] = time.time() - start
    return report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def format_report(report: dict) -> str:
    """A table a person can read."""
    keys = ("colour", "shape", "size", "position", "count", "exact")

    def row(task: str, scores: dict) -> str:
        return f"{task:<24}" + "".join(f"{_pct(scores.get(k)):>10}" for k in keys)

    lines = [f"{'task':<24}" + "".join(f"{k:>10}" for k in keys)]
    lines += [row(f"text->image cfg {r['cfg_scale']:g}", r) for r in report.get("text_to_image", [])]
    if report.get("image_to_text"):
        lines.append(row("image->text", report["image_to_text"]))
    story = report.get("story")
    if story:  # interleaved: the next scene of a story, against leaving the scene as it was
        lines.append(row(f"story step cfg {story['cfg_scale']:g}", story))
        lines.append(row("  scene left unchanged", story["unchanged"]))
    r = (report.get("vqgan") or {}).get("roundtrip")
    if r:  # the ceiling of text->image: drawings are read back through the VQ-GAN's decoder
        lines.append(row("vq-gan round trip", r))
    loss = report.get("loss") or {}
    if loss:
        lines.append(
            f"held-out loss: text {loss['text_loss']:.3f} (ppl {loss['text_perplexity']:.2f}), "
            f"image {loss['image_loss']:.3f} (ppl {loss['image_perplexity']:.2f})"
        )
    vq = report.get("vqgan") or {}
    if vq:
        lines.append(
            f"vq-gan: PSNR {vq['psnr']:.2f} dB, codebook usage {vq['usage']:.1f}%, perplexity {vq['perplexity']:.1f}"
        )
    if story:
        lines.append(
            f"story steps: {_pct(story['exact']).strip()} drawn as the text says, "
            f"{_pct(story['copied']).strip()} the scene before the change again"
        )
    lines.append(f"evaluated in {report.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def run_eval(model_dir: str | Path, cfg: EvalConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Load a model directory, evaluate it, write the JSON report (if `out`) and return it."""
    cfg.validate()
    if out is not None:
        check_writable(out, "report", folder=False)
    torch.manual_seed(cfg.seed)
    pipe = interleaf.load(model_dir)
    report = evaluate(pipe, cfg, progress)
    report["model_dir"] = str(model_dir)
    if out is not None:
        write_json(out, report)
    return report


def summary_line(report: dict) -> str:
    """One line with the headline numbers: drawing at each CFG scale, captioning."""
    cap = report.get("image_to_text") or {}
    attrs = [cap.get(k) for k in ("colour", "shape", "size", "position")]
    attr = sum(attrs) / len(attrs) if all(a is not None for a in attrs) else None
    draws = [
        f"text->image (cfg {d.get('cfg_scale', 0):g}): colour {_pct(d.get('colour'))}, shape {_pct(d.get('shape'))}"
        for d in report.get("text_to_image") or []
    ]
    story = report.get("story") or {}
    steps = [f"story step: exact {_pct(story.get('exact'))}"] if story else []
    return "; ".join([*draws, f"image->text: attributes {_pct(attr)}, exact {_pct(cap.get('exact'))}", *steps])


def parse_scales(values: Sequence[str]) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise InterleafError(f"cfg scales must be numbers, got {' '.join(values)}") from None

"""`interleaf demo` / `make demo`: the whole pipeline on the built-in shapes world, on a CPU.

    shards -> BPE -> VQ-GAN -> tokenizer dir -> tokenize -> train -> export -> generate -> eval

Every stage writes into `RUN_DIR/<stage>` and marks itself finished with a `DONE` file only once
its output is complete, so running the demo again reuses finished stages and redoes an
interrupted one (the VQ-GAN and transformer stages resume from their last checkpoint). Every
stage's length is a count (documents, steps), never a time, so the demo trains the same on any
machine; a VQ-GAN cut by a `time_limit_min` override is a warning in the summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import interleaf
from interleaf.config import CONFIG_DIR, load_config, save_config
from interleaf.data.corpus import BPEConfig, run_train_bpe
from interleaf.data.shapes import ShapesWorld
from interleaf.errors import ConfigError
from interleaf.evaluate import EvalConfig, format_report, run_eval, summary_line
from interleaf.sampling import render
from interleaf.tokenizer.vqgan_train import format_summary, time_limit_note, train_vqgan
from interleaf.tokenizer.vqgan_train import load_train_config as load_vqgan_config
from interleaf.training.export import export
from interleaf.training.shards import shapes_documents, write_documents
from interleaf.training.tokenize import build_tokenizer_dir, tokenize_shards
from interleaf.training.train import load_train_config, run_training
from interleaf.utils import get_logger, write_json

log = get_logger("interleaf.demo")
DEFAULT_CONFIG = CONFIG_DIR / "demo" / "shapes-tiny.yaml"


@dataclass
class DemoConfig:
    """Sizes and configs of each demo stage (`configs/...` paths name the shipped configs)."""

    resolution: int = 64
    max_shapes: int = 3
    world_seed: int = 0
    train_documents: int = 6_000  # the world's mix: caption-image pairs, interleaved stories, text
    train_pairs: int = 24_000  # extra caption-image pairs (what drawing and captioning learn from)
    pair_weight: float = 0.7  # share of training documents drawn from the extra pairs
    val_documents: int = 300
    bpe_config: str = "configs/bpe/shapes-tiny.yaml"
    bpe: list[str] = field(default_factory=list)  # dotted overrides
    vqgan_config: str = "configs/vqgan/shapes-tiny.yaml"
    vqgan: list[str] = field(default_factory=list)
    train_config: str = "configs/train/shapes-tiny.yaml"
    train: list[str] = field(default_factory=list)
    draw_prompt: str = "a large red circle at the top left and a small blue square at the bottom right"
    story_index: int = 4  # the interleaved sample continues this held-out story from its first scene
    caption_image_index: int = 7
    cfg_scale: float = 1.0  # guidance of the samples, also written to the model's sampling.yaml
    image_temperature: float = 1.0  # of the samples' image codes (and sampling.yaml)
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True

    def validate(self) -> None:
        if self.train_documents < 1 or self.val_documents < 1 or self.train_pairs < 0:
            raise ConfigError("demo: train_documents and val_documents must be >= 1, train_pairs >= 0")
        if self.train_pairs and not 0.0 < self.pair_weight < 1.0:
            raise ConfigError(f"demo: pair_weight must be in (0, 1), got {self.pair_weight}")


class Stages:
    """Runs named stages once each; a stage's folder holds DONE when it finished."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.times: dict[str, float] = {}
        self.total = 9

    def run(self, name: str, fn: Callable[[Path], None]) -> Path:
        out = self.run_dir / name
        n = len(self.times) + 1
        if (out / "DONE").is_file():
            print(f"[{n}/{self.total}] {name}: done earlier, reusing {out}")
            self.times[name] = 0.0
            return out
        print(f"[{n}/{self.total}] {name} ...", flush=True)
        start = time.time()
        out.mkdir(parents=True, exist_ok=True)
        fn(out)
        (out / "DONE").write_text(f"{time.time() - start:.1f}\n")
        self.times[name] = time.time() - start
        print(f"[{n}/{self.total}] {name}: finished in {self.times[name]:.0f} s", flush=True)
        return out


def stage_shards(cfg: DemoConfig, out: Path) -> None:
    """Document shards of the shapes world: a training split and a held-out split."""
    common = dict(resolution=cfg.resolution, max_shapes=cfg.max_shapes, seed=cfg.world_seed)
    write_documents(shapes_documents(cfg.train_documents, **common), out / "train")
    if cfg.train_pairs:
        pairs = shapes_documents(cfg.train_pairs, kind="pairs", start=20_000_000, **common)
        write_documents(pairs, out / "pairs")
    write_documents(shapes_documents(cfg.val_documents, start=10_000_000, **common), out / "val")


def stage_bpe(cfg: DemoConfig, shards: Path, out: Path) -> None:
    """Byte-level BPE on the text of the training shards."""
    bpe = load_config(BPEConfig, cfg.bpe_config, [*cfg.bpe, f"out={out}"])
    bpe.inputs = [str(shards / "train")]
    bpe.shapes.samples = 0
    bpe.validate()
    result = run_train_bpe(bpe, show_progress=cfg.progress)
    print(f"    BPE: {result.vocab_size} tokens from {result.n_texts:,} texts")


def stage_vqgan(cfg: DemoConfig, out: Path) -> dict:
    """The image tokenizer, trained on shapes-world images (resumes an interrupted run)."""
    vq = load_vqgan_config(cfg.vqgan_config, [*cfg.vqgan, f"run_dir={out}"])
    resume = any(out.glob("checkpoints/*"))
    metrics = train_vqgan(vq, resume=resume, progress=cfg.progress)
    print("    " + format_summary(metrics, out).replace("\n", "\n    "))
    return metrics


def stage_tokenizer(cfg: DemoConfig, bpe: Path, vq_run: Path, out: Path) -> None:
    """The tokenizer directory: text tokenizer, VQ-GAN and the shared vocabulary (`interleaf build-tokenizer`)."""
    build_tokenizer_dir(bpe, vq_run, out)


def stage_tokenize(cfg: DemoConfig, shards: Path, tokenizer: Path, out: Path) -> None:
    """Images through the VQ-GAN once, text through BPE: token shards for training."""
    for split in ("train", "pairs", "val") if cfg.train_pairs else ("train", "val"):
        s = tokenize_shards([str(shards / split)], out / split, tokenizer, progress=cfg.progress)
        print(f"    {split}: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['image_tokens']:,} image)")


def stage_train(cfg: DemoConfig, tokenizer: Path, tokens: Path, out: Path) -> dict:
    """The transformer (one process; resumes an interrupted run)."""
    mix_weight = 1 - cfg.pair_weight if cfg.train_pairs else 1.0
    sources = [f"{{name: shapes, paths: [{tokens / 'train'}], weight: {mix_weight}}}"]
    if cfg.train_pairs:
        sources.append(f"{{name: pairs, paths: [{tokens / 'pairs'}], weight: {cfg.pair_weight}}}")
    overrides = [
        f"run_dir={out}",
        f"tokenizer={tokenizer}",
        f"data.sources=[{', '.join(sources)}]",
        f"data.eval_sources=[{{name: shapes-val, paths: [{tokens / 'val'}]}}]",
        *cfg.train,
    ]
    train = load_train_config(cfg.train_config, overrides)
    resume = (out / "checkpoints" / "latest").exists()
    return run_training(train, resume=resume, progress=cfg.progress)


def stage_export(cfg: DemoConfig, train: Path, tokenizer: Path, out: Path) -> None:
    """The model directory, with the guidance and image temperature the demo draws with as its
    sampling defaults (so `interleaf draw` and the viewer draw as the evaluation did)."""
    export(
        train,
        out / "model",
        tokenizer=tokenizer,
        sampling={"cfg_scale": cfg.cfg_scale, "image_temperature": cfg.image_temperature},
    )


def stage_generate(cfg: DemoConfig, model_dir: Path, out: Path) -> list[str]:
    """A drawing, a caption and a story continued from its first scene, rendered to Markdown/HTML + PNGs."""
    pipe = interleaf.load(model_dir)
    world = ShapesWorld(resolution=cfg.resolution, max_shapes=cfg.max_shapes, seed=cfg.eval.world_seed)
    image, truth, _ = world.pair(cfg.caption_image_index)
    story, _ = world.document(cfg.story_index)  # [caption, image, change, image, ...]
    drawing = dict(cfg_scale=cfg.cfg_scale, image_temperature=cfg.image_temperature)
    jobs = {
        "draw": (cfg.draw_prompt, dict(mode="image", **drawing)),
        "caption": ([image], dict(mode="text", temperature=0.0, max_new_tokens=64)),
        "interleaved": (story[:2], dict(mode="interleaved", max_images=3, **drawing)),
    }
    written = []
    for name, (prompt, options) in jobs.items():
        doc = pipe.generate(prompt, seed=cfg.seed, **options)
        rendered = render.write_documents(out / name, [doc])
        written.append(str(rendered.html))
        shown = doc.text.strip().replace("\n", " ")
        print(f"    {name}: {shown[:100]!r}, {len(doc.images)} image(s) -> {rendered.html}")
        if name == "caption":
            print(f"    caption truth: {truth!r}")
    return written


def stage_eval(cfg: DemoConfig, model_dir: Path, out: Path) -> dict:
    report = run_eval(model_dir, cfg.eval, out / "eval.json", progress=cfg.progress)
    print("    " + format_report(report).replace("\n", "\n    "))
    return report


def run_demo(run_dir: str | Path = "runs/demo", config: str | Path | None = None, overrides=()) -> dict:
    """Run (or finish) every stage of the demo; print where the results are."""
    cfg = load_config(DemoConfig, config or DEFAULT_CONFIG, overrides)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "demo.yaml")
    start = time.time()
    st = Stages(run_dir)
    shards = st.run("shards", lambda o: stage_shards(cfg, o))
    bpe = st.run("bpe", lambda o: stage_bpe(cfg, shards, o))
    vq = st.run("vqgan", lambda o: stage_vqgan(cfg, o))
    tok = st.run("tokenizer", lambda o: stage_tokenizer(cfg, bpe, vq, o))
    tokens = st.run("tokens", lambda o: stage_tokenize(cfg, shards, tok, o))
    train = st.run("train", lambda o: stage_train(cfg, tok, tokens, o))
    export_dir = st.run("export", lambda o: stage_export(cfg, train, tok, o))
    model_dir = export_dir / "model"
    samples = st.run("samples", lambda o: stage_generate(cfg, model_dir, o))
    evaluation = st.run("eval", lambda o: stage_eval(cfg, model_dir, o))

    report = json.loads((evaluation / "eval.json").read_text())
    vq_metrics = json.loads((vq / "metrics.json").read_text())
    note = time_limit_note(vq_metrics)  # only with a time_limit_min override: the demo's stages are step counts
    warnings = [f"the VQ-GAN {note}"] if note else []
    summary = {
        "seconds": time.time() - start,
        "stages": st.times,
        "vqgan_steps": vq_metrics["step"],
        "warnings": warnings,
        "model_dir": str(model_dir),
        "samples": [str(p) for p in sorted(samples.glob("*/document.html"))],
        "eval": str(evaluation / "eval.json"),
    }
    write_json(run_dir / "summary.json", summary)
    print()
    print(format_report(report))
    print(f"model:    {model_dir}")
    for p in summary["samples"]:
        print(f"sample:   {p}")
    print(f"report:   {evaluation / 'eval.json'}")
    for warning in warnings:
        print(f"WARNING:  {warning}")
    print(f"demo finished in {summary['seconds'] / 60:.1f} min — {summary_line(report)}")
    return summary

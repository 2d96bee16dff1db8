"""End to end on a real tiny model directory: cache vs full passes, batches, events, the CLI.

The fixture trains a tiny BPE, builds a tiny random VQ-GAN and a random 2-layer Transformer, and
writes them with `save_model_dir`. The output head is scaled up so that logits are spread out
(greedy choices are not near-ties) and <boi> is made likely, so interleaved documents hold images.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import interleaf
from interleaf.cli import main
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer
from interleaf.pipeline import save_model_dir
from interleaf.sampling import generate as G
from interleaf.sampling import logits as L
from interleaf.sampling.events import Done, ImageDone, ImageProgress, ImageStart, TextDelta
from interleaf.sampling.params import SamplingParams
from interleaf.sampling.state import SequenceState
from interleaf.tokenizer.text import train_bpe
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.tokenizer.vqgan import VQConfig, VQModel

SENTENCES = [
    "a red circle above a blue square",
    "two green triangles next to a small yellow circle",
    "the big purple square is left of the orange star",
    "héllo wörld, naïve café — 世界 👋",
]
MAX_LEN = 160


def build_model_dir(directory, seed=0):
    torch.manual_seed(seed)
    text = train_bpe(SENTENCES * 4, vocab_size=300, min_frequency=1)
    vq = VQModel(
        VQConfig(
            resolution=8,
            ch=8,
            ch_mult=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            mid_attn=False,
            z_channels=8,
            norm_groups=4,
            n_embed=48,
            embed_dim=4,
        )
    )
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)  # 4x4 = 16 codes per image
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab.size,
        multiple_of=32,
        max_seq_len=MAX_LEN,
        qk_norm="layernorm",
    )
    model = Transformer(args)
    with torch.no_grad():
        model.output.weight.mul_(40)  # logits with std ~ 5: no near-ties for greedy decoding
        # a shared direction in every embedding shows up in every hidden state: align <boi> with it
        direction = torch.randn(args.dim)
        model.tok_embeddings.weight.add_(0.01 * direction)
        model.output.weight[vocab.boi_id] = 0.6 * direction / direction.norm() * model.output.weight.norm(dim=1).mean()
    save_model_dir(directory, model, vocab, text, vq)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a tiny model is all per-op overhead: one thread is faster, and immune to a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return interleaf.load(model_dir)


@pytest.fixture(scope="module")
def picture():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    a[2:6, 2:6] = (220, 30, 30)
    return Image.fromarray(a)


# ---- reference: greedy decoding by full forward passes, no cache ----------------------------------
@torch.no_grad()
def full_logits(model, ids):
    return model(torch.tensor([ids]))[0, -1]  # (V,)


@torch.no_grad()
def full_pass_reference(pipe, prompt, mode, max_new_tokens, cfg_scale=1.0, max_images=1, temperature=0.0, seed=0):
    """The sampler's decisions recomputed from scratch every step (whole sequence each time)."""
    vocab, model = pipe.vocab, pipe.model
    ids = pipe.tokenizer.encode(G.prompt_segments(prompt), bos=True, eos=False)
    n = vocab.tokens_per_image
    state = SequenceState(mode, n, MAX_LEN, max_new_tokens, max_images, length=len(ids))
    masks = L.mask_table(vocab, model.args.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    out, codes = [], []
    while not state.finished:
        x = full_logits(model, ids + out)
        if state.in_image and cfg_scale != 1:
            u = full_logits(model, [vocab.bos_id, vocab.boi_id] + codes)
            x = u + cfg_scale * (x - u)
        x = x.masked_fill(~masks[state.allowed()], float("-inf"))
        t = int(L.sample(x[None], torch.tensor([temperature]), [gen])[0])
        kind = state.advance(t, vocab)
        codes = [] if kind == "boi" else codes + [t] if kind == "code" else codes
        out.append(t)
    return out


def ids_of(events):
    done = {e.row: e.document.token_ids for e in events if isinstance(e, Done)}
    return [done[i] for i in sorted(done)]


@pytest.mark.parametrize("mode, cfg, temperature", [("text", 1.0, 0.0), ("image", 3.0, 0.0), ("interleaved", 2.0, 1.0)])
def test_cached_decoding_equals_full_forward(pipe, picture, mode, cfg, temperature):
    """Greedy (and seeded sampling) through the KV cache and guidance rows == full passes each step."""
    prompt = [picture, "a red circle"] if mode == "text" else ["a red circle above"]
    max_new = 40 if mode != "interleaved" else 100
    got = G.generate(
        pipe,
        prompt,
        mode=mode,
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0,
        image_temperature=temperature,
        cfg_scale=cfg,
        max_images=2,
        seed=7,
    ).token_ids
    ref = full_pass_reference(pipe, prompt, mode, max_new, cfg, max_images=2, temperature=temperature, seed=7)
    assert got == ref
    if mode != "text":
        assert pipe.vocab.eoi_id in got  # the comparison covered a whole guided image


def test_cfg_scale_one_equals_no_cfg(pipe, monkeypatch):
    """Running the unconditional stream at scale 1 changes nothing; a larger scale does."""
    opts = dict(mode="image", seed=3, image_temperature=1.0)
    plain = G.generate(pipe, "a blue square", cfg_scale=1.0, **opts)
    real = G.guidance_contexts
    monkeypatch.setattr(G, "guidance_contexts", lambda r, ids, v: [[v.bos_id, v.boi_id]])
    forced = G.generate(pipe, "a blue square", cfg_scale=1.0, **opts)
    monkeypatch.setattr(G, "guidance_contexts", real)
    guided = G.generate(pipe, "a blue square", cfg_scale=5.0, **opts)
    assert forced.token_ids == plain.token_ids
    assert np.array_equal(forced.codes[0], plain.codes[0])
    assert np.array_equal(np.asarray(forced.images[0]), np.asarray(plain.images[0]))
    assert guided.token_ids != plain.token_ids


def test_two_scale_guidance_reduces_to_plain(pipe, picture):
    """With an image in the prompt, image_cfg == cfg is plain guidance (one extra stream)."""
    base = dict(mode="image", seed=4, temperature=0, image_temperature=0)
    one = G.generate(pipe, [picture, "same shape"], cfg_scale=2.5, **base)
    two = G.generate(pipe, [picture, "same shape"], cfg_scale=2.5, image_cfg_scale=2.5, **base)
    other = G.generate(pipe, [picture, "same shape"], cfg_scale=2.5, image_cfg_scale=1.0, **base)
    assert one.token_ids == two.token_ids
    assert len(one.codes) == len(other.codes) == 1
    assert other.token_ids != one.token_ids


@pytest.mark.parametrize("mode", ["text", "image"])
def test_min_p_one_keeps_only_the_best_token_and_zero_is_off(pipe, mode):
    """min_p = 1 leaves only the most likely id: sampling at any temperature is then greedy decoding,
    for text (min_p) and image codes (image_min_p) alike; min_p = 0 is no filter at all."""
    base = dict(mode=mode, max_new_tokens=40, seed=9, cfg_scale=2.0)
    hot = dict(temperature=1.5, image_temperature=1.5)
    greedy = G.generate(pipe, "a red", temperature=0, image_temperature=0, **base)
    cut = G.generate(pipe, "a red", min_p=1.0, image_min_p=1.0, **hot, **base)
    assert cut.token_ids == greedy.token_ids and len(cut.images) == (mode == "image")
    sampled = G.generate(pipe, "a red", **hot, **base)
    assert sampled.token_ids != greedy.token_ids  # the control: without the cut, this temperature samples
    off = G.generate(pipe, "a red", min_p=0.0, image_min_p=0.0, **hot, **base)
    assert off.token_ids == sampled.token_ids
    # each modality's cut is its own option: the other one's leaves this mode sampling
    other = {"text": dict(image_min_p=1.0), "image": dict(min_p=1.0)}[mode]
    assert G.generate(pipe, "a red", **other, **hot, **base).token_ids == sampled.token_ids


def test_batch_mixing_caption_and_drawing_equals_alone(pipe, picture):
    reqs = [
        G.Request([picture], SamplingParams(mode="text", max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1)),
        G.Request("a red circle", SamplingParams(mode="image", cfg_scale=3.0, seed=2, image_top_k=20)),
        G.Request(
            "two green",
            SamplingParams(
                mode="interleaved", max_new_tokens=60, max_images=2, cfg_scale=2.0, seed=3, repetition_penalty=1.3
            ),
        ),
    ]
    together = ids_of(G.stream_requests(pipe, reqs))
    alone = [ids_of(G.stream_requests(pipe, [r]))[0] for r in reqs]
    assert together == alone
    assert len(together[1]) == pipe.vocab.tokens_per_image + 2
    # num=N is the same as N requests with seeds seed..seed+N-1
    docs = G.generate(pipe, "a red circle", mode="image", cfg_scale=3.0, seed=2, image_top_k=20, num=2)
    assert docs[0].token_ids == together[1] and docs[1].token_ids != together[1]


def test_streamed_events_concatenate_to_the_document(pipe):
    events = list(
        pipe.stream(
            "a red", mode="interleaved", max_new_tokens=120, max_images=3, seed=5, temperature=1.0, preview_every=4
        )
    )
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and events[-1] is done[0]
    doc = done[0].document
    segments, text = [], ""
    for e in events:
        if isinstance(e, TextDelta):
            text += e.text
        elif isinstance(e, ImageStart):
            segments += [text] if text else []
            text = ""
        elif isinstance(e, ImageDone):
            segments.append(e.image)
    segments += [text] if text else []
    assert len(doc.images) >= 1, "the fixture model should draw in interleaved mode"
    assert segments == doc.segments
    # text segments are what the tokenizer makes of the ids between images
    vocab, runs, cur = pipe.vocab, [], []
    for t in doc.token_ids:
        if t == vocab.boi_id:
            runs.append(cur)
            cur = None
        elif t == vocab.eoi_id:
            cur = []
        elif cur is not None and vocab.is_text(t):
            cur.append(t)
    runs.append(cur or [])
    assert [s for s in doc.segments if isinstance(s, str)] == [pipe.text.decode(r) for r in runs if r]
    progress = [e for e in events if isinstance(e, ImageProgress)]
    previews = [e for e in progress if e.preview is not None]
    assert len(progress) == 16 * len(doc.images) and len(previews) == 3 * len(doc.images)
    assert done[0].n_generated_tokens == len(doc.token_ids) and done[0].tokens_per_s > 0


# ---- the command line ------------------------------------------------------------------------------
def prompt_of_length(pipe, n_tokens):
    """Text whose prompt (with <bos>) is exactly n_tokens long."""
    words = []
    while 1 + len(pipe.text.encode(" ".join(words))) < n_tokens:
        words.append("q")
    text = " ".join(words)
    assert 1 + len(pipe.text.encode(text)) == n_tokens
    return text


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_caption_draw(model_dir, tmp_path, picture, capsys):
    img = tmp_path / "in.png"
    picture.save(img)
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "generate",
        model_dir,
        "--prompt",
        "a red",
        "--image",
        img,
        "--mode",
        "interleaved",
        "--max-images",
        "2",
        "--seed",
        "5",
        "--out",
        out,
    )
    assert code == 0, err
    md = (out / "document.md").read_text()
    assert str(out / "document.md") in stdout and str(out / "document.html") in stdout
    assert "![prompt-0.png](prompt-0.png)" in md and (out / "prompt-0.png").is_file()
    for png in re.findall(r"\((image-0-\d\.png)\)", md):
        assert str(out / png) in stdout and Image.open(out / png).size == (8, 8)
    assert "data:image/png;base64," in (out / "document.html").read_text()
    # an <image> marker puts the image where it stands in the text
    code, stdout, err = run_cli(
        capsys,
        "generate",
        model_dir,
        "--prompt",
        "a red <image> then",
        "--image",
        img,
        "--max-new-tokens",
        "4",
        "--out",
        tmp_path / "marked",
    )
    assert code == 0, err
    prompt_md = (tmp_path / "marked" / "document.md").read_text().split("## Output")[0]
    assert prompt_md.index("a red") < prompt_md.index("prompt-1.png") < prompt_md.index("then")
    code, stdout, err = run_cli(capsys, "draw", model_dir, "a red circle", "--out", tmp_path / "d", "--cfg", "2")
    assert code == 0, err
    assert (tmp_path / "d" / "image-0-0.png").is_file() and "image 1" in err
    code, stdout, err = run_cli(capsys, "caption", model_dir, img, "--max-new-tokens", "12")
    assert code == 0, err
    caption = G.generate(interleaf.load(model_dir), [interleaf.Image(img)], max_new_tokens=12, temperature=0).text
    assert stdout.startswith(caption)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{missing}", "--prompt", "x"], "model directory not found"),
        (["generate", "{empty}", "--prompt", "x"], "not a model directory"),
        (["caption", "{model}", "{bad_image}"], "cannot read image"),
        (["generate", "{model}", "--prompt", "{too_long}"], "context"),
        (["generate", "{model}", "--prompt", "x", "--cfg", "-1"], "cfg"),
        (["generate", "{model}", "--prompt", "x", "--top-p", "0"], "top-p"),
        (["generate", "{model}", "--prompt", "x", "--top-p", "1.5"], "top-p"),
        (["draw", "{model}", "{no_room}"], "an image needs"),
        (["generate", "{model}", "--prompt", "x", "--num", "0"], "num"),
        (
            ["generate", "{model}", "--prompt", "x <image> <image>", "--image", "{image}"],
            "2 <image> markers but 1 images",
        ),
        (["draw", "{model}", "  "], "the prompt is empty"),
        (["generate", "{model}", "--prompt", "x", "--temperature", "inf"], "--temperature must be a number in"),
        (["generate", "{model}", "--prompt", "x", "--temperature", "1e39"], "--temperature must be a number in"),
        (["generate", "{model}", "--prompt", "x", "--repetition-penalty", "1e-300"], "--repetition-penalty must be"),
        (["draw", "{model}", "a red circle", "--cfg", "1e39"], "--cfg must be a number in [0, 1000], got 1e+39"),
        (["draw", "{model}", "a red circle", "--image-temperature", "nan"], "--image-temperature must be a number"),
        (["generate", "{model}", "--prompt", "x", "--seed", str(10**23)], "--seed must be an integer in"),
        (["draw", "{model}", "a red circle", "--max-new-tokens", "5"], "--max-new-tokens must be at least 18"),
        (["generate", "{model}", "--prompt", "x", "--out", "/proc/interleaf-out"], "cannot write in /proc"),
        (["generate", "{model}", "--prompt", "x", "--out", "{image}/sub"], "is a file, not a folder"),
        (["generate", "{model}", "--prompt", "x", "--dtype", "int8"], "unknown dtype"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(model_dir, pipe, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_text("not a png")
    picture_path = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(picture_path)
    paths = dict(
        missing=tmp_path / "nope",
        empty=tmp_path / "empty",
        model=model_dir,
        bad_image=tmp_path / "bad.png",
        image=picture_path,
        too_long=prompt_of_length(pipe, MAX_LEN),
        no_room=prompt_of_length(pipe, MAX_LEN - 10),
    )
    argv = [a.format(**paths) for a in argv]
    argv += [] if "--out" in argv else ["--out", tmp_path / "out"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert stdout == "" and not (tmp_path / "out").exists()  # refused before generating anything


def test_incompatible_model_directory(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    text = (broken / "model.yaml").read_text()
    (broken / "model.yaml").write_text(re.sub(r"vocab_size: \d+", "vocab_size: 128", text))
    code, _, err = run_cli(capsys, "generate", broken, "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_ctrl_c_while_streaming_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    real = G.stream_requests

    def interrupted(pipe, requests):
        for i, event in enumerate(real(pipe, requests)):
            if i == 10:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(G, "stream_requests", interrupted)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "generate", model_dir, "--prompt", "a red", "--mode", "interleaved", "--out", out)
    assert code == 130 and "interrupted" in err
    assert not out.exists() or not any(out.iterdir())


def test_sigint_while_streaming_leaves_no_output_file(model_dir, tmp_path):
    """A real Ctrl-C (SIGINT) to the running command: exit 130, nothing half-written."""
    import os
    import selectors
    import shutil
    import signal
    import subprocess
    import sys
    import time

    # a long context (RoPE: same weights) so that generation cannot end before the signal arrives
    long_dir = tmp_path / "long"
    shutil.copytree(model_dir, long_dir)
    yaml = (long_dir / "model.yaml").read_text()
    (long_dir / "model.yaml").write_text(re.sub(r"max_seq_len: \d+", "max_seq_len: 8192", yaml))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "interleaf.cli",
        "generate",
        str(long_dir),
        "--prompt",
        "a red",
        "--mode",
        "interleaved",
        "--max-images",
        "100",
        "--max-new-tokens",
        "8000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.time() + 60
        while time.time() < deadline and not sel.select(timeout=1):  # wait for the first streamed output
            pass
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()[-500:]
    assert b"interrupted" in err and b"Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


# ---- the model's own sampling defaults (DIR/sampling.yaml) ------------------------------------------
@pytest.fixture()
def model_with_defaults(model_dir, tmp_path):
    import shutil

    from interleaf.pipeline import write_sampling_defaults

    d = tmp_path / "with-defaults"
    shutil.copytree(model_dir, d)
    write_sampling_defaults(d, cfg_scale=1.0, image_temperature=0.5)
    return d


def test_model_sampling_defaults_fill_what_the_caller_leaves_out(model_with_defaults, model_dir):
    pipe = interleaf.load(model_with_defaults)
    assert pipe.sampling_defaults == {"cfg_scale": 1.0, "image_temperature": 0.5}
    plain = interleaf.load(model_dir)
    assert plain.sampling_defaults == {}
    # the same function of the same weights: defaults from the file == the options given by hand
    by_file = pipe.generate("a red", mode="image", seed=3)
    by_hand = plain.generate("a red", mode="image", seed=3, cfg_scale=1.0, image_temperature=0.5)
    sampler_default = plain.generate("a red", mode="image", seed=3)  # cfg 3, image temperature 1
    ids = [np.asarray(d.images[0]) for d in (by_file, by_hand, sampler_default)]
    assert np.array_equal(ids[0], ids[1]) and not np.array_equal(ids[0], ids[2])
    # an option the caller gives wins over the file
    given = pipe.generate("a red", mode="image", seed=3, cfg_scale=3.0, image_temperature=1.0)
    assert np.array_equal(np.asarray(given.images[0]), ids[2])


def test_cli_uses_the_models_sampling_defaults_unless_flags_say_otherwise(model_with_defaults, tmp_path, capsys):
    def draw(*flags):
        out = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        code, _, err = run_cli(capsys, "draw", model_with_defaults, "a red circle", "--seed", "4", "--out", out, *flags)
        assert code == 0, err
        return np.asarray(Image.open(out / "image-0-0.png"))

    by_file = draw()
    assert np.array_equal(by_file, draw("--cfg", "1", "--image-temperature", "0.5"))
    assert not np.array_equal(by_file, draw("--cfg", "3", "--image-temperature", "1"))
    code, stdout, _ = run_cli(capsys, "info", model_with_defaults)
    assert code == 0 and "sampling defaults (sampling.yaml): image_temperature 0.5, cfg_scale 1\n" in stdout


@pytest.mark.parametrize(
    "text, message",
    [
        ("cfg_scale: -1\n", "cfg_scale must be a number in [0, 1000], got -1"),
        ("guidance: 2\n", "unknown sampling option 'guidance'"),
        ("seed: 2\n", "unknown sampling option 'seed'"),  # a request's own, not a model's
        ("top_k: 2.5\n", "top_k must be an integer"),
        ("- 1\n", "mapping"),
        ("image_temperature: .inf\n", "image_temperature must be a number in"),
    ],
)
def test_bad_sampling_yaml_is_one_line_naming_the_file(model_with_defaults, tmp_path, capsys, text, message):
    (model_with_defaults / "sampling.yaml").write_text(text)
    code, _, err = run_cli(capsys, "draw", model_with_defaults, "a red circle", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and "sampling.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_given_options_win_and_a_given_cfg_also_guides_toward_images():
    from interleaf.sampling.params import merge_options

    model = {"cfg_scale": 1.5, "image_cfg_scale": 1.2, "image_temperature": 0.3}
    assert merge_options(model, {}) == model
    assert merge_options(model, {"image_temperature": 1.0}) == {**model, "image_temperature": 1.0}
    # as without a file, --cfg alone sets both scales: the file's image scale does not linger
    assert merge_options(model, {"cfg_scale": 5.0}) == {"cfg_scale": 5.0, "image_temperature": 0.3}
    assert merge_options(model, {"cfg_scale": 5.0, "image_cfg_scale": 2.0})["image_cfg_scale"] == 2.0

"""VQ-GAN training: a few steps on tiny sizes, exact resume, seeded reproducibility, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from interleaf.cli import main
from interleaf.config import load_config
from interleaf.errors import InterleafError
from interleaf.tokenizer.vqgan import VQModel
from interleaf.tokenizer.vqgan_train import (
    DataConfig,
    TrainVQConfig,
    folder_source,
    format_summary,
    time_limit_note,
    train_vqgan,
)

TINY = [
    "model.resolution=16",
    "model.ch=8",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.z_channels=8",
    "model.norm_groups=4",
    "model.n_embed=16",
    "model.embed_dim=4",
    "model.attn_resolutions=[8]",
    "threads=1",
    "batch_size=4",
    "data.val_images=8",
    "val_batch_size=8",
    "log_every=1",
    "save_every=2",
    "optim.warmup_steps=2",
    "loss.disc_weight=0.5",
    "loss.disc_start=100",
    "loss.disc_channels=8",
    "loss.disc_layers=1",
    "model.l2_norm=false",
    "model.restart_dead=false",
    "model.mid_attn=true",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def blobs(i: int) -> Image.Image:
    """Training image number i: a coloured rectangle on white, deterministic."""
    rng = np.random.default_rng(i)
    a = np.full((16, 16, 3), 255, np.uint8)
    x, y = rng.integers(0, 10, 2)
    a[y : y + 6, x : x + 6] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


def cfg(tmp_path, *extra) -> TrainVQConfig:
    return load_config(TrainVQConfig, "configs/vqgan/shapes-tiny.yaml", TINY + [f"run_dir={tmp_path}", *extra])


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shipped_config_loads():
    c = load_config(TrainVQConfig, "configs/vqgan/shapes-tiny.yaml")
    assert c.data.source == "shapes" and c.model.resolution == 64 and c.model.grid == (8, 8)
    assert c.model.l2_norm and c.model.restart_dead


def test_few_steps_write_run_dir(tmp_path):
    # GAN from step 1, dead-code restarts, dropout: every part of the loop runs
    c = cfg(tmp_path, "steps=4", "loss.disc_start=1", "model.restart_dead=true", "restart_every=2", "model.dropout=0.1")
    result = train_vqgan(c, images=blobs, progress=False)
    log = rows(tmp_path)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert "d_loss" not in log[0] and "d_loss" in log[1] and "g_loss" in log[1]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == result and result["step"] == 4 and result["grid"] == [8, 8]
    assert 0 < result["val_usage"] <= 100 and 1 <= result["val_perplexity"] <= 16 and result["val_psnr"] > 0
    assert (tmp_path / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"]
    for f in ("model.safetensors", "disc.safetensors", "optim.pt", "train_state.json", "config.yaml"):
        assert (tmp_path / "checkpoints" / "step_00000004" / f).is_file()
    m = VQModel.load(tmp_path / "vqgan")
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())


class Crash(Exception):
    pass


def crash_after(n: int):
    def images(i):
        if i >= n:
            raise Crash
        return blobs(i)

    return images


def test_resume_continues_exactly(tmp_path):
    extra = ["steps=6", "loss.disc_start=2", "model.restart_dead=true", "restart_every=3", "model.dropout=0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_vqgan(cfg(a, *extra), images=blobs, progress=False)
    with pytest.raises(Crash):  # dies while building batch 5 (samples 16..19); checkpoint at step 4
        train_vqgan(cfg(b, *extra), images=crash_after(16), progress=False)
    with pytest.raises(InterleafError, match="--resume"):
        train_vqgan(cfg(b, *extra), images=blobs, progress=False)
    train_vqgan(cfg(b, *extra), resume=True, images=blobs, progress=False)
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicated log lines
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "elapsed"} == {k: v for k, v in y.items() if k != "elapsed"}
    wa = load_file(str(a / "vqgan" / "vqgan.safetensors"))
    wb = load_file(str(b / "vqgan" / "vqgan.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_seeded_runs_reproduce_and_seeds_differ(tmp_path):
    r1 = train_vqgan(cfg(tmp_path / "1", "steps=2"), images=blobs, progress=False)
    r2 = train_vqgan(cfg(tmp_path / "2", "steps=2"), images=blobs, progress=False)
    train_vqgan(cfg(tmp_path / "3", "steps=2", "seed=1"), images=blobs, progress=False)
    w = [load_file(str(tmp_path / n / "vqgan" / "vqgan.safetensors")) for n in "123"]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]) and r1["val_psnr"] == r2["val_psnr"]
    assert not torch.equal(w[0]["encoder.conv_in.weight"], w[2]["encoder.conv_in.weight"])


def test_time_limit_is_a_guard_that_says_it_cut_the_run(tmp_path, caplog):
    limited = train_vqgan(cfg(tmp_path / "cut", "steps=4", "time_limit_min=1e-9"), images=blobs, progress=False)
    assert limited["stopped_by_time_limit"] and (limited["step"], limited["steps"]) == (1, 4)
    note = "stopped by its time limit at step 1 of 4: what it learned depends on the machine's speed"
    assert note in caplog.text  # the log line
    assert format_summary(limited, tmp_path / "cut").endswith("WARNING: " + note)  # the summary line
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["stopped_by_time_limit"]
    caplog.clear()
    full = train_vqgan(cfg(tmp_path / "full", "steps=2"), images=blobs, progress=False)  # control: no limit
    assert not full["stopped_by_time_limit"] and full["step"] == 2
    assert time_limit_note(full) == "" and "WARNING" not in format_summary(full, tmp_path) and not caplog.text


def test_cli_shapes_source(tmp_path, capsys):
    status = main(
        [
            "train-vqgan",
            "configs/vqgan/shapes-tiny.yaml",
            *TINY,
            "model.resolution=32",
            "model.ch_mult=[1,2,2]",
            "steps=2",
            f"run_dir={tmp_path}",
            "--no-progress",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "val PSNR" in out and "codebook usage" in out and "perplexity" in out
    assert VQModel.load(tmp_path / "vqgan").grid == (8, 8)


def save_pngs(folder, n, size):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blobs(i).resize((size, size)).save(folder / f"{i:03d}.png")


def test_folder_source(tmp_path):
    save_pngs(tmp_path / "imgs", 12, 20)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, and not an image extension: ignored")
    r = train_vqgan(
        cfg(tmp_path / "run", "steps=2", "data.source=folder", f"data.path={tmp_path / 'imgs'}"), progress=False
    )
    assert r["val_images"] == 1 and r["step"] == 2  # 12 images: 1 held out


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["configs/vqgan/missing.yaml"], "config file not found"),
        ("empty", [], "no image files in"),
        ("broken", [], "cannot read image .*broken.png: not an image file"),
        ("small", [], "is 8x8, smaller than the training resolution 16"),
        (None, ["model.resolution=17"], "multiple of the downsampling factor"),
        (None, ["data.source=folder", "data.path=null"], "data.path is not set"),
        (None, ["loss.perceptual_weight=1"], "lpips_weights"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, setup, args, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    if setup == "broken":
        save_pngs(folder, 3, 16)
        (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    elif setup == "small":
        save_pngs(folder, 3, 8)
    config = args[0] if args and args[0].endswith(".yaml") else "configs/vqgan/shapes-tiny.yaml"
    overrides = [a for a in args if not a.endswith(".yaml")]
    if setup:
        overrides += ["data.source=folder", f"data.path={folder}"]
    status = main(["train-vqgan", config, *TINY, f"run_dir={tmp_path / 'run'}", "steps=1", *overrides, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("interleaf train-vqgan: error:")
    import re

    assert re.search(message, err), err


def photo(i: int, size: int = 48) -> Image.Image:
    """A noisy image: its compressed pixel data is most of the file, so a cut lands in it."""
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))


def save_cut(path, keep: float = 0.7) -> None:
    """A real image file that lost its tail, as an interrupted copy or download leaves it."""
    photo(len(path.name)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    if path.suffix != ".webp":  # the header still reads, only a deeper check finds the cut (WebP's open parses it all)
        with Image.open(path) as f:
            assert f.size == (48, 48)


@pytest.mark.parametrize("with_note", [False, True])
def test_bad_images_are_refused_before_training(tmp_path, capsys, monkeypatch, with_note):
    import interleaf.tokenizer.vqgan_train as vqgan_train

    folder, run = tmp_path / "imgs", tmp_path / "run"
    save_pngs(folder, 6, 16)
    photo(0).save(folder / "photo.jpg")
    save_cut(folder / "cut.png")
    if with_note:
        (folder / "notes.jpg").write_text("a note saved with an image extension")
    monkeypatch.setattr(vqgan_train, "build_trainer", lambda cfg: pytest.fail("training started"))
    status = main(
        [
            "train-vqgan",
            "configs/vqgan/shapes-tiny.yaml",
            *TINY,
            f"run_dir={run}",
            "steps=1",
            "data.source=folder",
            f"data.path={folder}",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"interleaf train-vqgan: error: cannot read image {folder / 'cut.png'}: "), err
    if with_note:
        assert err.endswith(f"(1 more unreadable: {folder / 'notes.jpg'})"), err
    assert not run.exists()  # nothing written: not even config.yaml


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "gif", "bmp", "tiff"])
def test_cut_image_of_each_format_is_found(tmp_path, ext):
    folder = tmp_path / "imgs"
    save_pngs(folder, 2, 16)
    save_cut(folder / f"cut.{ext}")
    with pytest.raises(InterleafError, match=f"cannot read image .*cut.{ext}: "):
        folder_source(DataConfig(source="folder", path=str(folder)), 16, seed=0)


def test_good_images_of_each_format_pass_the_check(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, ext in enumerate(["png", "jpg", "webp", "gif", "bmp", "tiff", "ppm"]):
        photo(i, 20).save(folder / f"{i}.{ext}")
    source = folder_source(DataConfig(source="folder", path=str(folder)), 16, seed=0)
    assert source.batch(0, 6).shape == (6, 3, 16, 16)
    photo(9, 8).save(folder / "small.jpg")  # sizes come from the header, not the 1/8-scale JPEG check
    with pytest.raises(InterleafError, match="small.jpg is 8x8"):
        folder_source(DataConfig(source="folder", path=str(folder)), 16, seed=0)


def test_many_unreadable_images_stay_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(b"")
    with pytest.raises(InterleafError) as e:
        folder_source(DataConfig(source="folder", path=str(folder)), 16, seed=0)
    assert str(e.value) == (
        f"cannot read image {folder / '0.png'}: not an image file (5 more unreadable: "
        f"{folder / '1.png'}, {folder / '2.png'}, {folder / '3.png'}, ...)"
    )

"""README's "Train on your own images", run as written: its commands are read from README.md (so the
section cannot drift from what works), each with small overrides appended to make it fast, on a
folder of image + caption pairs. Then the mistakes a user can make on that path, each one line."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from interleaf.cli import main
from interleaf.data.shapes import ShapesWorld
from interleaf.tokenizer.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Train on your own images"
# appended to the README's commands (a later override wins): seconds instead of minutes
TINY = {
    "train-vqgan": ["steps=3", "batch_size=4", "data.val_images=4", "log_every=1", "save_every=3", "--no-progress"],
    "tokenize": ["--quiet"],
    "train": ["steps=2", "save_every=2", "eval_every=0", "log_every=1", "model_size=debug", "threads=1", "--quiet"],
}
STEPS = ["shards", "train-bpe", "train-vqgan", "build-tokenizer", "tokenize", "train", "export", "draw"]


def readme_commands() -> list[list[str]]:
    """The `interleaf ...` commands of the section's first bash block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    commands = [shlex.split(line, comments=True) for line in lines]
    assert all(c[0] == "interleaf" for c in commands), commands
    return [c[1:] for c in commands]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(args)
    out = capsys.readouterr()
    return status, out.out, out.err


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def own(tmp_path_factory, one_thread):
    """A folder of 40 pairs, then every README command in a fresh folder; returns that folder."""
    home = tmp_path_factory.mktemp("own")
    (home / "configs").symlink_to(REPO / "configs")
    photos = home / "photos"
    photos.mkdir()
    world = ShapesWorld(resolution=64, max_shapes=3, seed=5)
    for i in range(40):
        image, caption, _ = world.pair(i)
        image.save(photos / f"{i:03d}.png")
        (photos / f"{i:03d}.txt").write_text(caption)
    here = os.getcwd()
    os.chdir(home)
    try:
        commands = readme_commands()
        assert [c[0] for c in commands] == STEPS  # the whole path, in order, and nothing else
        for args in commands:
            if args[0] == "train":  # its own process, as on the command line: DeepSpeed keeps state per process
                done = subprocess.run([sys.executable, "-m", "interleaf", *args, *TINY["train"]], capture_output=True)
                assert done.returncode == 0, done.stderr.decode()[-2000:]
            else:
                assert main(args + TINY.get(args[0], [])) == 0, args
    finally:
        os.chdir(here)
    return home


def test_readme_path_ends_in_a_drawing(own):
    mine = own / "runs" / "mine"
    vocab = Vocabulary.load(mine / "tokenizer")
    assert Vocabulary.load(mine / "model").to_dict() == vocab.to_dict()  # the model speaks the tokenizer's ids
    assert json.loads((mine / "tokens" / "index.json").read_text())["vocab"] == vocab.to_dict()
    drawn = sorted((own / "interleaf-out").glob("*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (64, 64)


def refused(args: list[str], capsys, *phrases: str) -> None:
    status, _, err = run(args, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert all(p in err for p in phrases), err


def test_unfinished_or_wrong_vqgan_run_is_one_line(own, tmp_path, capsys):
    mine = own / "runs" / "mine"
    unfinished = tmp_path / "vq"
    shutil.copytree(mine / "vqgan", unfinished)
    shutil.rmtree(unfinished / "vqgan")  # checkpoints, but the run never wrote its model
    out = tmp_path / "tok"
    args = ["build-tokenizer", "--bpe", str(mine / "bpe"), "-o", str(out)]
    refused([*args, "--vqgan", str(unfinished)], capsys, "has not finished", "step 3 of 3", "--resume")
    refused([*args, "--vqgan", str(mine / "bpe")], capsys, "is neither a VQ-GAN run")
    refused([*args, "--vqgan", str(tmp_path / "nothing")], capsys, "VQ-GAN run not found")
    assert not out.exists()
    # control: the finished run's model folder itself is accepted too
    assert run([*args, "--vqgan", str(mine / "vqgan" / "vqgan")], capsys)[0] == 0
    assert Vocabulary.load(out).to_dict() == Vocabulary.load(mine / "tokenizer").to_dict()


def test_vqgan_cut_by_its_time_limit_is_used_with_a_warning(own, tmp_path, capsys, caplog):
    mine = own / "runs" / "mine"
    cut = tmp_path / "vq"
    shutil.copytree(mine / "vqgan", cut)
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["stopped_by_time_limit"] is False  # the README's run took all its steps
    (cut / "metrics.json").write_text(json.dumps({**metrics, "stopped_by_time_limit": True, "step": 2}))
    args = ["build-tokenizer", "--bpe", str(mine / "bpe"), "-o", str(tmp_path / "tok"), "--vqgan"]
    assert run([*args, str(cut)], capsys)[0] == 0
    assert "stopped by its time limit at step 2 of 3" in caplog.text
    caplog.clear()
    assert run([*args, str(mine / "vqgan")], capsys)[0] == 0 and "time limit" not in caplog.text  # control


def test_bpe_folder_that_is_not_one_is_one_line(own, tmp_path, capsys):
    mine = own / "runs" / "mine"
    args = ["build-tokenizer", "--vqgan", str(mine / "vqgan"), "-o", str(tmp_path / "tok")]
    refused([*args, "--bpe", str(mine / "pairs")], capsys, "no tokenizer.json")
    assert not (tmp_path / "tok").exists()


def test_output_folder_is_only_ever_a_tokenizer_directory(own, tmp_path, capsys):
    mine = own / "runs" / "mine"
    args = ["build-tokenizer", "--bpe", str(mine / "bpe"), "--vqgan", str(mine / "vqgan"), "-o"]
    refused([*args, str(mine / "model")], capsys, "holds more than a tokenizer directory")
    assert (mine / "model" / "model.safetensors").is_file()
    refused([*args, str(mine)], capsys, "holds more than a tokenizer directory")
    copy = tmp_path / "tok"
    shutil.copytree(mine / "tokenizer", copy)
    assert run([*args, str(copy)], capsys)[0] == 0  # an earlier tokenizer directory is replaced


def test_mismatched_vocabularies_are_one_line(own, tmp_path, capsys):
    mine = own / "runs" / "mine"
    # another BPE (smaller), and a tokenizer directory built from it
    assert (
        run(["train-bpe", "-i", str(mine / "pairs"), "-o", str(tmp_path / "bpe"), "--vocab-size", "280"], capsys)[0]
        == 0
    )
    other = tmp_path / "other"
    build = ["build-tokenizer", "--bpe", str(tmp_path / "bpe"), "--vqgan", str(mine / "vqgan"), "-o", str(other)]
    assert run(build, capsys)[0] == 0
    assert Vocabulary.load(other).to_dict() != Vocabulary.load(mine / "tokenizer").to_dict()
    # training with it on token shards made with the first one
    train = [
        "train",
        str(REPO / "configs/train/shapes-tiny.yaml"),
        f"run_dir={tmp_path / 'train'}",
        f"tokenizer={other}",
        f"data.sources=[{{name: mine, paths: [{mine / 'tokens'}]}}]",
        "data.eval_sources=[]",
    ]
    refused(train, capsys, "made with another vocabulary", "interleaf tokenize")
    assert not (tmp_path / "train").exists()
    # a tokenizer directory whose vocab.json belongs to other parts (the smaller BPE's)
    stale = tmp_path / "stale"
    shutil.copytree(mine / "tokenizer", stale)
    shutil.copy(other / "vocab.json", stale / "vocab.json")
    tokenize = ["tokenize", str(mine / "pairs"), "-o", str(tmp_path / "tokens"), "--tokenizer", str(stale)]
    refused(tokenize, capsys, f"tokenizer directory {stale}", "room for", "interleaf build-tokenizer")
    assert not (tmp_path / "tokens").exists()
    refused([*train[:3], f"tokenizer={stale}", *train[4:]], capsys, f"tokenizer directory {stale}", "room for")
    assert not (tmp_path / "train").exists()

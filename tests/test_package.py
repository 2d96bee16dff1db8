"""A packaged install works from anywhere.

The wheel is built from the repository's files as a clone has them (the top-level configs/ is a
link into the package), installed into a fresh virtual environment that reuses this environment's
torch and other dependencies through a .pth file (so it takes seconds and no network), and run from
a folder that has nothing of the repository: `interleaf info chameleon-7b`, the demo's configs,
and a short `interleaf train` of the shipped configs/train/debug.yaml (a named size,
`deepspeed: auto`).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from training_helpers import make_tokenizer_dir, write_token_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def repository_files(dst: Path) -> None:
    """Copy what a clone of the repository (with this working tree's changes) holds, links as links."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        src, out = REPO / name, dst / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    repository_files(root / "src")
    assert (root / "src" / "configs").is_symlink()
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(root / "src")]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = dist.glob("interleaf-*.whl")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this environment's packages (torch, deepspeed, ...) after the fresh environment's own
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(pip + ["--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return wheel, env_dir, elsewhere


def run(env_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_carries_every_shipped_config(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "interleaf" / "configs").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")} == {
        p.relative_to(REPO / "interleaf" / "configs") for p in (REPO / "interleaf" / "configs").rglob("*.yaml")
    }  # the repository's configs/ is the package's folder, not a copy


def test_the_installed_package_runs_from_an_unrelated_folder(installed, tmp_path):
    _, env_dir, elsewhere = installed
    where = run(env_dir, elsewhere, "python", "-c", "import interleaf, sys; print(interleaf.__file__)")
    assert where.stdout.strip().startswith(str(env_dir)), where  # the wheel, not the source tree
    info = run(env_dir, elsewhere, "interleaf", "info", "chameleon-7b", "--world", "8")
    assert info.returncode == 0 and "parameters: 7,013,666,816" in info.stdout, info.stderr
    assert "memory per process: 8 processes, ZeRO-3" in info.stdout
    # the demo finds its configs (and those of its stages) through the package
    demo = run(
        env_dir,
        elsewhere,
        "python",
        "-c",
        "from interleaf.config import load_config; from interleaf.demo import DEFAULT_CONFIG, DemoConfig; "
        "from interleaf.training.train import load_train_config; from interleaf.tokenizer.vqgan_train import "
        "load_train_config as vq; c = load_config(DemoConfig, DEFAULT_CONFIG); "
        "print(load_train_config(c.train_config).model_size, vq(c.vqgan_config).model.resolution)",
    )
    assert demo.returncode == 0 and demo.stdout.split() == ["shapes-tiny", "64"], demo.stderr

    vocab = make_tokenizer_dir(tmp_path / "tok")
    write_token_shards(tmp_path / "data", vocab, n_docs=12, per_shard=6)
    assert not (elsewhere / "configs").exists()
    res = run(
        env_dir,
        elsewhere,
        "interleaf",
        "train",
        "configs/train/debug.yaml",  # the shipped file: model_size debug, deepspeed auto
        f"tokenizer={tmp_path / 'tok'}",
        f"data.sources=[{{name: a, paths: [{tmp_path / 'data'}]}}]",
        "run_dir=run",
        "steps=2",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    saved = yaml.safe_load((elsewhere / "run" / "config.yaml").read_text())
    assert (saved["model_size"], saved["deepspeed"]) == ("debug", "auto")
    assert (elsewhere / "run" / "checkpoints" / "step_00000002" / "trainer.json").is_file()

import subprocess
import sys

import pytest

from interleaf.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in (
        "shards",
        "tokenize",
        "train-bpe",
        "train-vqgan",
        "train",
        "export",
        "convert",
        "info",
        "generate",
        "caption",
        "draw",
        "serve",
        "eval",
        "demo",
    ):
        assert cmd in out, cmd


def test_overrides_after_flags_and_local_rank(tmp_path, capsys):
    # `--local_rank` (DeepSpeed's launcher) is accepted; an override after a flag still applies
    out = tmp_path / "bpe"
    code = main(["--local_rank=0", "train-bpe", "--shapes", "30", "-o", str(out), "vocab_size=300"])
    assert code == 0 and (out / "tokenizer.json").is_file()
    assert "vocab_size: 300" in (out / "bpe.yaml").read_text()


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit) as e:
        main(["train-bpe", "--no-such-flag"])
    assert e.value.code == 2


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "interleaf", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "interleaf" in r.stdout


def test_an_unforeseen_os_error_is_one_line(monkeypatch, capsys):
    from interleaf.commands import model

    def full_disk(args):
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    monkeypatch.setattr(model, "info_command", full_disk)
    assert main(["info", "debug"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interleaf info: error: No space left on device: /data/out/model.safetensors"]

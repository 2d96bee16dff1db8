"""Output folders replaced as a whole: atomic_dir, check_replaceable, check_writable."""

import os

import pytest

from interleaf.errors import InterleafError
from interleaf.utils import atomic_dir, check_replaceable


def _fill(folder, name):
    (folder / name).write_text(name)


def test_atomic_dir_replaces_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out, "out") as tmp:
        _fill(tmp, "first")
    assert sorted(p.name for p in out.iterdir()) == ["first"]
    with pytest.raises(RuntimeError):  # the work fails: the earlier folder stays as it was
        with atomic_dir(out, "out") as tmp:
            _fill(tmp, "second")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["first"]
    # the rename into place fails after the old folder was moved aside: it is put back
    real = os.replace

    def fail_second(a, b):
        if str(a).find(".tmp-out.") >= 0:
            raise OSError(16, "Device or resource busy", str(b))
        return real(a, b)

    def fail_first(a, b):  # the old folder cannot be moved aside (a mount point, a busy folder)
        if str(a) == str(out):
            raise OSError(16, "Device or resource busy", str(a))
        return real(a, b)

    for failing in (fail_second, fail_first):
        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(OSError):
            with atomic_dir(out, "out") as tmp:
                _fill(tmp, "third")
        monkeypatch.undo()
        assert sorted(p.name for p in out.iterdir()) == ["first"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or moved-aside folders left


def test_two_writers_do_not_share_a_temp_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "out") as a, atomic_dir(out, "out") as b:
        assert a != b
        _fill(a, "a")
        _fill(b, "b")
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # the last to finish wins, whole


def test_symlinks_and_the_current_folder(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    _fill(real, "old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_dir(link, "out") as tmp:  # the link's target is replaced; the link stays
        _fill(tmp, "new")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new"]
    here = real / "sub"
    here.mkdir()
    monkeypatch.chdir(here)
    for path in (".", "..", link, link / "sub"):  # also when spelled through the link
        with pytest.raises(InterleafError, match="is the current folder or holds it"):
            check_replaceable(path, "out")
    with pytest.raises(InterleafError, match="cannot write in"):
        check_replaceable("/proc/interleaf-x", "out")


def test_check_device_names_and_default(monkeypatch):
    import torch

    from interleaf.pipeline import check_device

    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device(None) == torch.device("cpu")
    with pytest.raises(InterleafError, match="--device 'gpu0' is not a device"):
        check_device("gpu0", "--device")
    with pytest.raises(InterleafError, match="--device cuda: no CUDA device is available"):
        check_device("cuda", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device(None) == torch.device("cuda")

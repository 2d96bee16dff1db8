"""Small shared helpers: atomic file writes, seeding, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in path's folder, with the permissions a new file there would get (mkstemp's
    are 0600, which the rename would keep)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a filename; rename on success."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; one that is not UTF-8 text is an InterleafError naming it."""
    from interleaf.errors import InterleafError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InterleafError(f"{path} is not a UTF-8 text file") from None


def check_writable(path: str | os.PathLike, what: str, folder: bool = True) -> Path:
    """Fail fast on an output path the work would only fail on at its end.

    `folder`: a folder that exists or can be created, to write in; else a file whose folder
    can be. Raises InterleafError naming `what`; leaves nothing behind.
    """
    from interleaf.errors import InterleafError

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise InterleafError(f"{what} {path} exists and is not a folder")
    if not folder and path.is_dir():
        raise InterleafError(f"{what} {path} is a folder, not a file")
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InterleafError(f"{what} {path}: {base} is a file, not a folder")
    try:  # a real test: permission bits say nothing for root or on special file systems
        os.rmdir(tempfile.mkdtemp(prefix=".interleaf-check-", dir=base))
    except OSError as e:
        raise InterleafError(f"{what} {path}: cannot write in {base} ({e.strerror})") from None
    return path


def check_replaceable(path: str | os.PathLike, what: str) -> Path:
    """`path` as an absolute path, unless it is the current folder or holds it (replacing that
    would pull the folder from under the shell): then an InterleafError."""
    from interleaf.errors import InterleafError

    path = Path(os.path.abspath(path))  # "." and ".." spelled out, so that the check sees them
    here = Path.cwd()
    if path == here or path in here.parents:
        raise InterleafError(f"{what} {path} is the current folder or holds it: give a folder of its own")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a temp folder beside `path` to fill; on success it replaces `path` (an existing
    folder there is removed), on failure it is removed. Not the current folder or one above it."""
    import shutil

    path = check_replaceable(path, what)
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_logger(name: str) -> logging.Logger:
    """A logger that prints `name: message` once logging is configured by the CLI."""
    return logging.getLogger(name)


def setup_logging(verbose: bool = False) -> None:
    """Human-readable logs on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

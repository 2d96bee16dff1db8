"""Small shared helpers: atomic file writes, seeding, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from interleaf.errors import InterleafError

# the `interleaf` command imports this module at start-up: seed_everything imports torch when it runs


def _read_umask() -> int:
    """The process umask (read once, at import: setting it to read it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in path's folder, with the permissions a new file there would get (mkstemp's
    are 0600, which the rename would keep)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)
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
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InterleafError(f"{path} is not a UTF-8 text file") from None


def check_writable(path: str | os.PathLike, what: str, folder: bool = True) -> Path:
    """Fail fast on an output path the work would only fail on at its end.

    `folder`: a folder that exists or can be created, to write in; else a file whose folder
    can be. Raises InterleafError naming `what`; leaves nothing behind.
    """
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
    """The real path of an output folder to replace as a whole (a symlink's target).

    Refused: what `check_writable` refuses, the current folder or one above it (replacing it would
    pull it from under the shell) and a mount point (it cannot be renamed).
    """
    path = check_writable(path, what).resolve()
    here = Path.cwd().resolve()
    if path == here or path in here.parents:
        raise InterleafError(f"{what} {path} is the current folder or holds it: give a folder of its own")
    if path.is_dir() and os.path.ismount(path):
        raise InterleafError(f"{what} {path} is a mount point, which cannot be replaced: give a folder inside it")
    check_writable(path.parent, what)  # the new folder is built beside it
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a new temp folder beside `path` to fill; on success it takes the place of `path`.

    An existing folder at `path` is moved aside first and removed only once the new one is in
    place (put back if that fails). On failure the temp folder is removed and `path` is untouched.
    """
    path = check_replaceable(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}.", dir=path.parent))
            try:
                os.replace(path, old / path.name)
            except BaseException:
                old.rmdir()
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
                old.rmdir()
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import torch  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def get_logger(name: str) -> logging.Logger:
    """A logger that prints `name: message` once logging is configured by the CLI."""
    return logging.getLogger(name)


def setup_logging(verbose: bool = False) -> None:
    """Human-readable logs on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )

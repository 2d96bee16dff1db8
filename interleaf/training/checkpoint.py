"""Checkpoints: DeepSpeed engine state + loader position + RNG + config, written atomically.

Layout of a run directory:

    RUN/config.yaml  model.yaml  vocab.json  tokenizer/  vqgan/  metrics.jsonl
    RUN/checkpoints/latest                      name of the newest complete checkpoint (written last)
    RUN/checkpoints/step_00000400/
        ds/state/...                            engine.save_checkpoint (ZeRO shards, one per rank)
        ds/state_universal/...                  made on demand to resume on another world size
        trainer.json                            step, tokens, skip counters, world size, held-out loss, ...
        loader.json                             every loader stream's position (any world size)
        rng/rank_00000.json                     python / numpy / torch RNG state per rank
        config.yaml  model.yaml

Every rank writes into `checkpoints/.tmp-step_...`; after a barrier rank 0 adds its files, renames
the folder to its final name and only then rewrites `latest`. A run killed at any moment leaves
either the previous checkpoint or the new one as `latest`, never a partial one; leftovers of an
interrupted write are removed when the next run starts. `keep_last` prunes older checkpoints, but
never the one with the lowest held-out loss (`best_checkpoint`; every checkpoint is evaluated on the
run's data.eval_sources): `interleaf export --best` picks it.

DeepSpeed's checkpoint files are pickles (torch.load with weights_only=False): load checkpoints
from trusted sources only. Exports (`interleaf export`) are safetensors.

Resuming on a different number of processes converts the engine state once with DeepSpeed's
universal checkpoint tool (`deepspeed.checkpoint.ds_to_universal`, fp32 weights and optimizer
moments per parameter, unpartitioned) and loads it with `load_universal`; the loader re-splits
its streams over the new ranks (see loader.py).
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from interleaf.errors import InterleafError
from interleaf.training.loader import full_state
from interleaf.utils import atomic_write, get_logger, read_text, write_json

log = get_logger(__name__)

CKPT_DIR = "checkpoints"
LATEST = "latest"
DS_TAG = "state"
UNIVERSAL_TAG = "state_universal"
TMP_PREFIX = ".tmp-"
SHARED_MARKER = ".shared-check"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- RNG -----------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy and torch (CPU, CUDA) generator states as JSON."""
    st = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuples(st["python"]))
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["cuda"])), dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# ---- the run folder -------------------------------------------------------------------------
def check_shared_run_dir(run_dir: Path) -> None:
    """Collective: every rank must see the run folder rank 0 sees, since every rank writes its part of
    each checkpoint there and reads it back on resume. Rank 0 writes a random token into it; a rank
    that cannot read it back is named (with its host) in one InterleafError raised on every rank."""
    world = dist.get_world_size()
    if world == 1:
        return
    rank, marker, made = dist.get_rank(), run_dir / SHARED_MARKER, False
    token = [secrets.token_hex(8) if rank == 0 else None]
    if rank == 0:
        made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    sees = marker.is_file() and marker.read_text() == token[0]
    views = [None] * world
    dist.all_gather_object(views, (sees, socket.gethostname()))
    blind = [(r, host) for r, (ok, host) in enumerate(views) if not ok]
    if rank == 0:
        marker.unlink()
        if blind and made:
            run_dir.rmdir()
    if blind:
        hosts = sorted({host for _, host in blind})
        raise InterleafError(
            f"run_dir {run_dir} is not shared between the processes: rank{'s' if len(blind) > 1 else ''} "
            f"{', '.join(str(r) for r, _ in blind)} (on {', '.join(hosts)}) cannot see the file rank 0 "
            f"(on {views[0][1]}) wrote there; put run_dir on a filesystem every node mounts at the same path"
        )


# ---- saving --------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path, step: int, engine, trainer_state: dict, loader_state_fn, files: dict, keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    `loader_state_fn()` returns this rank's stream states; they are gathered to rank 0. `files`
    maps file names to paths copied into the checkpoint (resolved config, model args). The run
    directory must be on a filesystem every node sees (as DeepSpeed's own checkpoints assume).
    """
    rank = dist.get_rank()
    root = run_dir / CKPT_DIR
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=False)
    states = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(loader_state_fn(), states, dst=0)
    write_json(tmp / "rng" / f"rank_{rank:05d}.json", rng_state())
    dist.barrier()
    if rank == 0:
        write_json(tmp / "loader.json", full_state(states, trainer_state["n_streams"]))
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        write_json(tmp / "trainer.json", trainer_state)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        with atomic_write(root / LATEST) as f:
            f.write(final.name + "\n")
        prune(root, keep_last)
    dist.barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything) and the best one
    (`best_checkpoint`), which is kept beside them."""
    if keep_last <= 0:
        return
    best = best_checkpoint(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)


# ---- finding -------------------------------------------------------------------------------
def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders (with trainer.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def best_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the lowest held-out loss (trainer.json's eval_loss; the earliest
    of equals); None when none has one. `prune` never deletes it, so it is the best of the whole run."""
    scored = []
    for ckpt in complete_checkpoints(root):
        loss = read_trainer_state(ckpt).get("eval_loss")
        if isinstance(loss, (int, float)) and loss == loss:  # not None, not NaN
            scored.append((loss, ckpt.name, ckpt))
    return min(scored)[2] if scored else None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; the newest complete one if `latest` is missing or stale."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / "trainer.json").is_file():
            return named
        log.warning("checkpoints/latest names %s, which is incomplete; using the newest complete one", named.name)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def clean_partial(run_dir: Path) -> int:
    """Remove folders of interrupted checkpoint writes; returns how many."""
    root = Path(run_dir) / CKPT_DIR
    stale = list(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def read_trainer_state(ckpt: Path) -> dict:
    try:
        state = json.loads(read_text(ckpt / "trainer.json"))
    except (OSError, json.JSONDecodeError) as e:
        raise InterleafError(f"checkpoint {ckpt} is unreadable: {e}") from None
    if not isinstance(state, dict):
        raise InterleafError(f"checkpoint {ckpt}: trainer.json does not hold a JSON object")
    return state


# ---- loading -------------------------------------------------------------------------------
def ensure_universal(ckpt: Path) -> None:
    """Convert the engine state to DeepSpeed's universal format (rank 0 only, once, atomically)."""
    out = ckpt / "ds" / UNIVERSAL_TAG
    if out.is_dir():
        return
    tmp = ckpt / "ds" / f"{TMP_PREFIX}{UNIVERSAL_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt / "ds" / DS_TAG),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    log.info("converting %s to a universal checkpoint to resume on another number of processes", ckpt.name)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        raise InterleafError(f"converting {ckpt} to a universal checkpoint failed: {tail[0]}")
    os.replace(tmp, out)


def load_engine_state(engine, ckpt: Path, universal: bool) -> None:
    """Engine weights + optimizer state from a checkpoint folder."""
    tag = UNIVERSAL_TAG if universal else DS_TAG
    path, _ = engine.load_checkpoint(
        str(ckpt / "ds"), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise InterleafError(f"DeepSpeed could not load the engine state of {ckpt}")


def load_rng(ckpt: Path, rank: int) -> bool:
    """Restore this rank's RNG state if the checkpoint has it; False when it does not."""
    f = ckpt / "rng" / f"rank_{rank:05d}.json"
    if not f.is_file():
        return False
    set_rng_state(json.loads(f.read_text()))
    return True

"""DeepSpeed around the model: process group, engine, optimizer, schedule, skipped steps.

The model stays a plain `Transformer`; DeepSpeed wraps it from outside (ZeRO 1/2/3 from the JSON
files in the shipped `configs/deepspeed/`, bf16 on GPU, fp32 on CPU) with a torch AdamW as client optimizer.
The learning rate is set on the optimizer's param groups before every step from
`lr_at(step)`, so a resumed or re-sharded run needs no scheduler state.

Under ZeRO-3 the model is built straight into its partitions (`build_model`). The CPU ZeRO-3 config
bounds DeepSpeed's working buffers to 1e7 values each (gradient bucket, optimizer sub-groups,
prefetched, live and kept-for-reuse gathered parameters): its defaults (up to 1e9) would keep a
whole model of a billion parameters or fewer gathered between forward and backward, and step the
optimizer over a rank's whole partition at once (bench/memory.py).

A step whose loss is not finite on any rank is skipped: every rank still runs its backward passes
(ZeRO's collectives must line up), then the optimizer's update is replaced by a no-op for that one
`engine.step()` and ZeRO discards the gradients as usual. Weights and optimizer moments stay
exactly as they were (DeepSpeed itself only skips overflowing steps for fp16).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import re
import socket
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from interleaf.config import CONFIG_DIR, config_file
from interleaf.errors import ConfigError, InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.fast import apply_training_fast_paths
from interleaf.model.init import TensorSource
from interleaf.model.transformer import Transformer
from interleaf.utils import first_line, get_logger, read_text

# deepspeed is imported inside the functions that use it: it picks its accelerator when first imported,
# so cpu_accelerator_env() (init_distributed, first in every process) must have told it about a CPU run

log = get_logger(__name__)


# ---- processes -----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / deepspeed / SLURM variables; (0, 1, 0) alone."""
    env = dict(os.environ)
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local = int(env.get("LOCAL_RANK", rank if world > 1 else 0))
    return rank, world, local


def cpu_accelerator_env() -> None:
    """Tell DeepSpeed up front that a machine without CUDA is a CPU run (it warns when it guesses)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class LostContact(InterleafError):
    """The processes of a run did not meet, or one stopped answering (it died, its node did, or the
    network failed). Every process sees its own side of it, so the first process of each node reports it."""


def lost_contact(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process is gone or silent: torch's
    distributed errors (store, network, NCCL) and gloo's transport errors (plain RuntimeErrors)."""
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


def contact_error(e: BaseException) -> str:
    """The gist of a failed collective: its first line without gloo's source location and advice."""
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(e)).split(". ")[0]


def init_distributed(device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Start the process group (nccl on GPU, gloo on CPU) through DeepSpeed; returns (rank, world).

    Every collective, the first meeting included, gives up after `timeout_s` seconds of silence."""
    cpu_accelerator_env()
    import deepspeed  # noqa: PLC0415

    rank, world, local = dist_env()  # torch.distributed reads them from the environment
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise InterleafError(
                "MASTER_PORT is not set: start several processes with --nproc, torchrun, "
                "deepspeed or srun (with MASTER_ADDR/MASTER_PORT exported)"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    if device.type == "cpu":
        # DeepSpeed would JIT-compile a shared-memory all-reduce kernel for CPU (minutes, needs a C++
        # compiler); gloo's collectives are enough for CPU runs, so declare that kernel unavailable.
        import deepspeed.ops  # noqa: PLC0415

        vars(deepspeed.ops).setdefault("__compatible_ops__", {})
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    except RuntimeError as e:
        if not lost_contact(e):
            raise
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise LostContact(
            f"rank {rank}: the {world} processes of the run did not all meet at {where} within "
            f"dist_timeout_s={timeout_s:g} ({contact_error(e)}); start every rank (each node's launcher, every srun "
            f"task) and check that every node reaches that address"
        ) from None
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def pick_device() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        _, _, local = dist_env()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ---- configuration -------------------------------------------------------------------------
def ds_config_path(spec: str, zero_stage: int, device: torch.device) -> Path:
    """`auto` -> the shipped configs/deepspeed/zero{stage}-{gpu-bf16|cpu-fp32}.json; else a path."""
    if spec == "auto":
        flavour = "gpu-bf16" if device.type == "cuda" else "cpu-fp32"
        return CONFIG_DIR / "deepspeed" / f"zero{zero_stage}-{flavour}.json"
    return config_file(spec)


def read_ds_json(path: Path) -> dict:
    """A DeepSpeed JSON file as it is; a missing or malformed one is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


def ds_config(
    path: Path,
    global_batch: int,
    micro_batch: int,
    world: int,
    grad_clip: float,
    device: torch.device,
    load_universal: bool = False,
) -> dict:
    """The DeepSpeed JSON with batch sizes, clipping and precision filled in from the train config."""
    cfg = read_ds_json(path)
    cfg.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=global_batch // (micro_batch * world),
        gradient_clipping=grad_clip,
        steps_per_print=cfg.get("steps_per_print", 10**9),
    )
    if device.type == "cpu" and (cfg.get("bf16", {}).get("enabled") or cfg.get("fp16", {}).get("enabled")):
        raise ConfigError(f"{path} enables bf16/fp16, which DeepSpeed does not run on CPU; use a cpu-fp32 config")
    cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    cfg.pop("optimizer", None)  # the optimizer is ours (AdamW below); the schedule too
    cfg.pop("scheduler", None)
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def precision(cfg: dict) -> torch.dtype:
    """Parameter dtype DeepSpeed trains with under this config."""
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


# ---- optimizer and schedule ----------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: Collection[str] = ()) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on norms and biases nor on the
    parameters named in `no_decay`; frozen parameters are left out."""
    groups: dict[bool, list] = {True: [], False: []}
    for name, p in model.named_parameters():
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # a ZeRO-3 parameter's data is its partition
        if p.requires_grad:
            groups[len(shape) >= 2 and name not in no_decay].append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0}
        for decays, params in groups.items()
        if params
    ]


def freeze(model: torch.nn.Module, frozen: Collection[str], rows: Mapping[str, torch.Tensor]) -> None:
    """Stop `frozen` parameters from training; train matrix `name` of `rows` on its rows where
    `rows[name]` (bool (n_rows,)) is True only.

    The other rows' gradient is zeroed by a hook, on every micro-batch before it is accumulated (and
    before ZeRO reduces or partitions it), so AdamW's moments for them stay zero and so does its step
    (0 / (sqrt(0) + eps)); the matrix must also take no weight decay (`param_groups`' no_decay), which
    would shrink them.
    """
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    for name, keep in rows.items():
        p = params[name]
        n_rows = p.ds_shape[0] if hasattr(p, "ds_shape") else p.shape[0]
        drop = torch.ones(n_rows, 1, dtype=torch.bool)  # (n_rows, 1): rows past the vocabulary stay too
        drop[: len(keep), 0] = ~keep
        p.register_hook(functools.partial(_zero_rows, drop.to(p.device)))


def _zero_rows(drop: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(drop, 0.0)  # (n_rows, dim)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def frozen_update(engine):
    """Inside: the optimizer's parameter update is a no-op (a skipped step; ZeRO still clears grads)."""
    # DeepSpeed's ZeRO / bf16 optimizers hold the torch one as .optimizer; which wrapper depends on its config
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    saved = vars(inner).get("step")
    inner.step = lambda *args, **kwargs: None  # instance attribute, shadows the class method
    try:
        yield
    finally:
        if saved is None:
            del inner.step
        else:
            inner.step = saved


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block in backward instead of keeping its activations."""
    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---- the model ------------------------------------------------------------------------------
def build_model(
    args: ModelArgs, ds_cfg: dict, source: TensorSource, device: torch.device, zero_init: bool = True
) -> Transformer:
    """The model to train, every parameter written from `source` (`RandomInit(args, seed)` for new weights).

    ZeRO-3 (with `zero_init`): built inside `deepspeed.zero.Init`, which partitions each module's
    parameters as soon as that module exists (a module's full tensors live only while it is built),
    then every rank writes its own partition of each parameter: no rank ever holds the whole model.
    Otherwise (ZeRO-1/2 keep full weights on every rank anyway) each rank builds the whole model,
    once, and `deepspeed.initialize` partitions what its stage partitions.
    """
    if ds_cfg["zero_optimization"]["stage"] == 3 and zero_init:
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):  # partitions hold zero.Init's values until filled
            model = Transformer(args)
    else:
        with torch.device("meta"):  # no values yet: `source` writes each tensor once
            model = Transformer(args)
        model = model.to_empty(device=device)
        model.tie_weights()  # to_empty made the tied output weight a tensor of its own
    fill_parameters(model, source)
    if device.type != "cpu":  # q/k/v and w1/w3 as one product each: faster off CPU, slower on it
        apply_training_fast_paths(model)
    return model


def fill_parameters(model: torch.nn.Module, source: TensorSource) -> None:
    """Write every parameter of `model` from `source`, one tensor at a time (before deepspeed.initialize).

    A ZeRO-3 parameter (built under `deepspeed.zero.Init`) holds only its partition, `ds_tensor`:
    values [r * n, (r + 1) * n) of the flattened tensor on partition rank r, zero-padded past the
    end (DeepSpeed's `Init._partition_param`); only that range is read from the source.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not hasattr(p, "ds_tensor"):  # a plain parameter
                p.copy_(source.read(name, tuple(p.shape), 0, p.numel()).view(p.shape))
                continue
            assert p.ds_secondary_tensor is None, "hierarchical partitioning (zero_hpz_partition_size) is not used"
            part = p.ds_tensor  # (n,)
            start = part.ds_numel * p.ds_zero_partition_rank
            stop = min(start + part.ds_numel, p.ds_numel)
            part.zero_()
            if stop > start:
                part[: stop - start].copy_(source.read(name, tuple(p.ds_shape), start, stop))


def build_engine(
    model: torch.nn.Module,
    ds_cfg: dict,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    no_decay: Collection[str] = (),
):
    """deepspeed.initialize with a torch AdamW (fused on CUDA) over the parameters that train (no
    weight decay on those named in `no_decay`); returns the engine."""
    import deepspeed  # noqa: PLC0415

    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    groups = param_groups(model, weight_decay, no_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **fused)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    return engine


# ---- throughput ----------------------------------------------------------------------------
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: torch.device, configured: float) -> float | None:
    """Peak dense bf16 FLOP/s of one device (configured TFLOP/s, or guessed from the GPU name)."""
    if configured > 0:
        return configured * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None

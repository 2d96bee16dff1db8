"""`interleaf train` (one rank, or N local processes with --nproc) and `interleaf export`."""

from __future__ import annotations

import argparse
import os
import sys

from interleaf.commands.sampling import add_model_default_args, given_options, named_as_flags


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with DeepSpeed (one process, --nproc N, or under deepspeed/torchrun/srun)",
        description="Train from a YAML config with dotted overrides. Started alone it runs one process, "
        "with --nproc N it starts N local processes (gloo on CPU, nccl on GPU); under deepspeed, "
        "torchrun or srun each started process is one rank.",
    )
    p.add_argument("config", help="training config YAML (e.g. configs/train/shapes-tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=200 optim.lr=1e-3")
    p.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local processes")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--run-dir", default=None, help="override run_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=train_command)

    p = subparsers.add_parser(
        "export",
        help="turn a training run's checkpoint into a model directory (safetensors) for interleaf.load",
        description="Consolidate the latest (or --step, or --best: lowest held-out loss) checkpoint of RUN_DIR - "
        "any ZeRO stage - into "
        "OUT_DIR: model.safetensors, model.yaml, vocab.json, tokenizer/, vqgan/, the run's "
        "train.yaml, training.json (step, tokens) and, when set, sampling.yaml. OUT_DIR is new, "
        "empty or an earlier export (replaced as a whole once the new one is complete).",
    )
    p.add_argument("run_dir", help="a training run folder (its checkpoints/)")
    p.add_argument("out_dir", help="the model directory to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="export this step's checkpoint (default: latest)")
    which.add_argument(
        "--best", action="store_true", help="export the checkpoint with the lowest held-out loss (data.eval_sources)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if the run has none")
    add_model_default_args(p)
    p.set_defaults(func=export_command)


def _overrides(args) -> list[str]:
    return list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])


def train_command(args: argparse.Namespace) -> int:
    from interleaf.errors import InterleafError
    from interleaf.training.train import load_train_config, prepare, run_training

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_train_config(args.config, _overrides(args))
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if args.nproc is not None and args.nproc < 1:
        raise InterleafError("--nproc must be >= 1")
    if args.nproc and args.nproc > 1 and not launched:
        prepare(cfg, args.nproc, args.resume)  # one error line here rather than one per process
        return launch_local(args)
    from interleaf.training.engine import LostContact, dist_env

    rank, _, local = dist_env()
    try:
        run_training(cfg, resume=args.resume, progress=not args.quiet)
    except InterleafError as e:
        # rank 0 reports what every rank hits alike; a lost contact is seen differently on each node
        # (and rank 0 may be the one that is gone), so the first process of every node reports it
        if rank == 0 or (isinstance(e, LostContact) and local == 0):
            raise
        return 2
    return 0


def launch_local(args: argparse.Namespace) -> int:
    """Start `--nproc` copies of this command as ranks 0..N-1 on this machine; wait for all."""
    import subprocess
    import time

    from interleaf.training.engine import free_port

    n = args.nproc
    cmd = [
        sys.executable,
        "-c",
        "import sys; from interleaf.cli import main; sys.exit(main(sys.argv[1:]))",
        "train",
        args.config,
        *_overrides(args),
    ]
    cmd += ["--resume"] if args.resume else []
    cmd += ["--quiet"] if args.quiet else []
    port = str(free_port())
    threads = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for rank in range(n):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0] if failed[0] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        raise


def _stop(procs) -> None:
    """Terminate the still-running children (ours, by pid), then kill what is left."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def export_command(args: argparse.Namespace) -> int:
    from interleaf.training.export import export

    with named_as_flags():
        out = export(
            args.run_dir,
            args.out_dir,
            step=args.step,
            tokenizer=args.tokenizer,
            sampling=given_options(args),
            best=args.best,
        )
    print(f"exported {args.run_dir} -> {out}")
    return 0

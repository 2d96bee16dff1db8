"""ZeRO-3 construction: each rank's peak resident memory from start to its first optimizer step.

    python bench/memory.py [--size 350M] [--nproc 2] [--seq-len 64]

Starts the same ZeRO-3 run (the shipped configs/deepspeed/zero3-cpu-fp32.json) three times in one
invocation, on CPU (fp32, gloo) with --nproc processes:

    partitioned   the model built straight into its partitions (`zero_init=true`: deepspeed.zero.Init,
                  then each rank writes its own range of every parameter)
    whole         the whole model built on every rank first (`zero_init=false`, the path every run
                  took before)
    partitioned, glibc mmap threshold 128 KiB
                  as the first, with MALLOC_MMAP_THRESHOLD_ fixed: glibc otherwise raises that threshold
                  as large blocks are freed, so freed tensors of up to 32 MiB stay in the process's heap
                  (resident) instead of going back to the system

Each rank reads /proc/self/status (VmRSS, and the peak VmHWM) once torch, deepspeed and interleaf's
trainer are imported (idle), then after the model is built, after deepspeed.initialize, and after its
first forward, backward and optimizer step (micro_batch 1 x seq_len tokens), and compares the peaks
above idle with its share of parameters + gradients + optimizer state (what `interleaf info --world N
--zero 3 --dtype fp32` plans and DeepSpeed allocates) and with the full fp32 model's bytes. Goal: the
largest rank's first-step peak above idle < 1.3x its share; the build never holds a full copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1024**3


def status_bytes(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_token_data(out: Path) -> None:
    """A few random text documents as token shards (their index.json names the vocabulary)."""
    import numpy as np

    from interleaf.tokenizer.vocab import Vocabulary
    from interleaf.training.shards import ShardWriter
    from interleaf.training.tokenize import TEXT, TokenDoc

    vocab = Vocabulary.build(512, 16, (2, 2))
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, "t", max_count=16)
    for i in range(32):
        ids = [vocab.bos_id, *rng.integers(16, vocab.n_text, 200).tolist(), vocab.eos_id]
        doc = TokenDoc(np.asarray(ids, dtype=np.int32), np.asarray([(TEXT, 1, len(ids) - 1)], dtype=np.int32))
        writer.write(f"d{i:04d}", doc.members())
    writer.close({"vocab": vocab.to_dict()})


PHASES = ("built", "initialized", "forward", "backward", "step")


def worker(out: Path, overrides: list[str]) -> None:
    """One rank: measure idle, run the trainer to its first optimizer step, write the numbers, exit."""
    from interleaf.training.engine import cpu_accelerator_env

    cpu_accelerator_env()
    import deepspeed  # noqa: F401  (part of the idle process)
    import torch.distributed as dist

    from interleaf.training import engine, train

    record = {"idle": status_bytes("VmRSS")}

    def mark(phase: str) -> None:
        record.setdefault(phase, (status_bytes("VmRSS"), status_bytes("VmHWM")))

    def after(fn, phase):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            mark(phase)
            return result

        return wrapped

    build_engine = engine.build_engine

    def build(*args, **kwargs):
        mark("built")
        eng = build_engine(*args, **kwargs)
        mark("initialized")
        eng.forward, eng.backward = after(eng.forward, "forward"), after(eng.backward, "backward")
        return eng

    engine.build_engine = build
    first_step = train.Trainer.train_step

    def train_step(self, micro_batches):
        first_step(self, micro_batches)
        mark("step")
        out.write_text(json.dumps(record))
        dist.barrier()
        os._exit(0)  # nothing after the first step is measured

    train.Trainer.train_step = train_step
    train.run_training(train.load_train_config(None, overrides), progress=False)


def run_path(tmp: Path, args, zero_init: bool, malloc: dict) -> list[dict]:
    """Start --nproc ranks of one construction path (with `malloc` in their environment); their records."""
    from interleaf.training.engine import free_port

    overrides = [
        f"run_dir={tmp / f'run-{zero_init}-{len(malloc)}'}",
        f"model_size={args.size}",
        "model.vocab_size=32768",
        f"data.sources=[{{name: a, paths: [{tmp / 'data'}]}}]",
        f"data.seq_len={args.seq_len}",
        f"global_batch={args.nproc}",
        "micro_batch=1",
        "steps=10",
        "zero_stage=3",
        f"zero_init={str(zero_init).lower()}",
        "threads=1",
    ]
    port = str(free_port())
    procs, outs = [], []
    for rank in range(args.nproc):
        outs.append(tmp / f"rank{rank}-{zero_init}-{len(malloc)}.json")
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", **malloc)
        cmd = [sys.executable, __file__, "--worker", str(outs[-1]), "--", *overrides]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank of zero_init={zero_init} failed: exit codes {codes}")
    return [json.loads(o.read_text()) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="350M", help="named model size (vocabulary 32,768)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.overrides)

    from interleaf.config import CONFIG_DIR
    from interleaf.model.args import ModelArgs, count_params
    from interleaf.training.engine import read_ds_json
    from interleaf.training.memory import memory_plan

    margs = ModelArgs.from_name(args.size, vocab_size=32768)
    full = 4 * count_params(margs)
    zero = read_ds_json(CONFIG_DIR / "deepspeed" / "zero3-cpu-fp32.json")["zero_optimization"]
    share = memory_plan(margs, args.nproc, 3, "fp32", 1, args.seq_len, zero).model_states
    print(
        f"{args.size}: {count_params(margs) / 1e6:.0f}M parameters, full fp32 model {full / GIB:.2f} GiB; "
        f"ZeRO-3 over {args.nproc} processes: share of parameters + gradients + optimizer state "
        f"{share / GIB:.2f} GiB per rank"
    )
    variants = {
        "partitioned": (True, {}),
        "whole": (False, {}),
        "partitioned, mmap threshold 128 KiB": (True, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_token_data(tmp / "data")
        results = {name: run_path(tmp, args, *variant) for name, variant in variants.items()}
    print("\nresident memory above idle, GiB: now / peak so far, after each phase")
    print(f"| construction | rank | idle | {' | '.join(PHASES)} | first-step peak / share |")
    print("| --- " * (len(PHASES) + 4) + "|")
    for name, records in results.items():
        for rank, r in enumerate(records):
            idle = r["idle"]
            cells = [f"{(r[p][0] - idle) / GIB:.2f} / {(r[p][1] - idle) / GIB:.2f}" for p in PHASES]
            peak = r["step"][1] - idle
            print(f"| {name} | {rank} | {idle / GIB:.2f} | {' | '.join(cells)} | {peak / share:.2f}x |")

    def largest(name: str, phase: str) -> int:
        return max(r[phase][1] - r["idle"] for r in results[name])

    new, old, tuned = (largest(n, "step") for n in variants)
    built_new, built_old = largest("partitioned", "built"), largest("whole", "built")
    print(
        f"\nlargest rank's first-step peak above idle: partitioned {new / share:.2f}x its share "
        f"(goal < 1.3: {'met' if new < 1.3 * share else 'not met'}), whole {old / share:.2f}x, partitioned with "
        f"the mmap threshold fixed {tuned / share:.2f}x ({'met' if tuned < 1.3 * share else 'not met'})\n"
        f"peak while building: partitioned {built_new / GIB:.2f} GiB = {built_new / full:.2f}x the full model "
        f"({'below' if built_new < full else 'NOT below'} a full copy), whole {built_old / GIB:.2f} GiB = "
        f"{built_old / full:.2f}x"
    )


if __name__ == "__main__":
    main()

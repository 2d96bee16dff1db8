"""A benchmark of this tree against another revision's code, side by side in one run.

The other revision's tree is exported to a temporary folder (`git archive`: nothing is added to
the repository, nothing to clean up after an interrupted run). Then the same benchmark script
runs, each tree its own copy with its own `interleaf` package (PYTHONPATH, checked), in turns:
old, new, new, old, old, new, ... so that load from other processes and any drift over the run
hit both alike. Printed: every run's numbers, and per metric the median of the per-pair speed
ratios new/old (above 1: the new code is faster).

    python bench/against.py                              # both benchmarks against 122f7f0, 4 pairs each
    python bench/against.py --rev main --bench decode --pairs 6
    python bench/against.py --bench train --train-args "--no-hf --threads 1"

Metrics: train_step.py: interleaf's steps/s (median step of its run); decode.py: tokens/s at each
batch size (best of its repeats), whole images and whole captions per second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train": "bench/train_step.py", "decode": "bench/decode.py"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default="122f7f0", help="the revision to compare against (default: 122f7f0)")
    p.add_argument("--bench", default="train,decode", help="comma-separated: train, decode")
    p.add_argument("--pairs", type=int, default=4, help="runs of each tree per benchmark")
    p.add_argument("--train-args", default="--no-hf", help="arguments for bench/train_step.py")
    p.add_argument("--decode-args", default="--no-hf --tokens 64 --repeats 2", help="arguments for bench/decode.py")
    return p.parse_args(argv)


def export_tree(rev: str, directory: Path) -> Path:
    """The files of `rev` in `directory` (git archive | tar)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def environment(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    where = subprocess.run(
        [sys.executable, "-c", "import interleaf; print(interleaf.__file__)"],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"against: {tree} imports interleaf from {where}, not its own tree")
    return env


def run_train(tree: Path, env: dict, args: list[str]) -> dict:
    script = SCRIPTS["train"]
    out = subprocess.run(
        [sys.executable, script, *args], env=env, cwd=tree, capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"interleaf:\s+([\d.]+) ms/step", out)
    if match is None:
        raise SystemExit(f"against: no interleaf line in the output of {tree / script}:\n{out}")
    return {"train steps/s": 1e3 / float(match.group(1))}


def run_decode(tree: Path, env: dict, args: list[str]) -> dict:
    script = SCRIPTS["decode"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decode.json"
        # the parallel-image part (--only) trains a model of its own and is not in older trees: both time the rest
        only = ["--only", "text"] if '"--only"' in (tree / script).read_text() else []
        cmd = [sys.executable, script, *args, *only, "--json", str(path)]
        subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
        results = json.loads(path.read_text())
    out = {f"decode b{b} tokens/s": r["tokens_per_s"]["interleaf"] for b, r in results["batches"].items()}
    out.update({f"whole {k}s/s": 1 / v["seconds"] for k, v in results["whole"].items()})  # speed: higher is better
    return out


def main(argv=None) -> int:
    opts = parse_args(argv)
    runners = {"train": run_train, "decode": run_decode}
    bench_args = {"train": shlex.split(opts.train_args), "decode": shlex.split(opts.decode_args)}
    benches = [b.strip() for b in opts.bench.split(",")]
    if unknown := [b for b in benches if b not in runners]:
        raise SystemExit(f"against: unknown benchmark {unknown[0]} (train or decode)")
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", opts.rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="interleaf-against-") as tmp:
        trees = {"old": export_tree(rev, Path(tmp)), "new": ROOT}
        envs = {name: environment(tree) for name, tree in trees.items()}
        print(f"old: {rev} (exported to {tmp}); new: this tree ({head} + working changes); load {os.getloadavg()}")
        for bench in benches:
            runs = {"old": [], "new": []}
            for i in range(opts.pairs):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for name in order:
                    result = runners[bench](trees[name], envs[name], bench_args[bench])
                    runs[name].append(result)
                    print(f"{bench} pair {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
            print(f"{bench} {shlex.join(bench_args[bench])}: median over {opts.pairs} pairs (load {os.getloadavg()})")
            for metric in runs["old"][0]:
                old = [r[metric] for r in runs["old"]]
                new = [r[metric] for r in runs["new"]]
                ratio = statistics.median(n / o for n, o in zip(new, old))
                print(
                    f"  {metric:>24}: old {statistics.median(old):9.2f}, new {statistics.median(new):9.2f}, "
                    f"new/old {ratio:.3f} (pairs: {', '.join(f'{n / o:.3f}' for n, o in zip(new, old))})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

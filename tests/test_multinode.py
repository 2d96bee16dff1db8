"""One run across two "nodes" on this machine, as a 2-node job of a cluster starts it.

Each node is one `torchrun --nnodes 2 --node-rank N --nproc-per-node 2` (rendezvous on loopback),
the way `srun` or a DeepSpeed hostfile starts one launcher per node; data workers are on. The debug
model, ZeRO-3, 6 steps, a checkpoint every 2:

    R   1 node x 4 processes (--nproc 4), the model built whole on every rank (zero_init=false):
        the reference, same seed and data
    K   2 nodes x 2, the model built straight into its partitions: node 1 is killed in step 5, after
        the step-4 checkpoint; node 0 stops with a message; the whole job is started again with
        --resume and finishes
    K's step-4 checkpoint is then resumed on 1 node x 2 and on 1 x 1, and K is exported.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from training_helpers import fault_env, make_tokenizer_dir, metrics, write_token_shards

from interleaf.cli import main
from interleaf.training.engine import free_port

pytestmark = pytest.mark.slow
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "debug.yaml")
CLI = [sys.executable, "-c", "import sys; from interleaf.cli import main; sys.exit(main(sys.argv[1:]))"]
STEPS = 6
WORKERS = "data.num_workers=1"  # the two-node runs read through data workers (the order does not change)
KINDS = ("model", "optim")  # ZeRO-3: each rank writes its own model and optimizer states


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    vocab = make_tokenizer_dir(root / "tok")
    write_token_shards(root / "data", vocab, n_docs=40, per_shard=4)
    base = [
        f"tokenizer={root / 'tok'}",
        f"data.sources=[{{name: a, paths: [{root / 'data'}]}}]",
        f"steps={STEPS}",
        "save_every=2",
        "keep_last=3",
        "zero_stage=3",
        "global_batch=4",
        "micro_batch=1",
        "data.shuffle_buffer=16",
    ]
    return root, base


def start_nodes(root, run_dirs, base, *extra, resume=False, faults=None, nodes=2):
    """One torchrun per node (2 processes each), started together; returns their Popens (own sessions)."""
    port = str(free_port())
    procs = []
    for node, run_dir in enumerate(run_dirs[:nodes]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(node)]
        cmd += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
        cmd += ["-m", "interleaf.cli", "train", CONFIG, *base, f"run_dir={run_dir}", *extra, "--quiet"]
        cmd += ["--resume"] if resume else []
        log = open(root / f"node{node}-{time.monotonic_ns()}.log", "w+")
        env = fault_env(**(faults or {}))
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        procs[-1].log = log
    return procs


def finish(procs, timeout=600) -> list[tuple[int, str]]:
    """Wait for every node; (return code, output) of each."""
    out = []
    for p in procs:
        try:
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # a session of our own: torchrun and its workers
                p.wait()
        p.log.seek(0)
        out.append((p.returncode, p.log.read()))
        p.log.close()
    return out


def train(run_dir, base, *extra, nproc=1, resume=False):
    cmd = CLI + ["train", CONFIG, *base, f"run_dir={run_dir}", *extra, "--quiet"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    cmd += ["--resume"] if resume else []
    res = subprocess.run(cmd, capture_output=True, text=True, env=fault_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir) -> dict[int, float]:
    """{step: loss} of training steps (NaN for the skipped step 2); the last line of a step wins."""
    return {step: np.nan if r["loss"] is None else r["loss"] for step, r in metrics(run_dir)[0].items()}


@pytest.fixture(scope="module")
def runs(setup):
    root, base = setup
    train(root / "R", base, "zero_init=false", nproc=4)

    # K: node 1 stops answering in step 5 (both its processes wait there), then is killed
    stall = root / "stall"
    nodes = start_nodes(
        root,
        [root / "K"] * 2,
        base,
        "dist_timeout_s=120",
        faults={"stall": {"step": 5, "ranks": [2, 3], "dir": str(stall)}},
    )
    deadline = time.monotonic() + 400
    while len(list(stall.glob("rank_*.json"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), finish(nodes, timeout=1)
        time.sleep(0.2)
    killed_at = time.monotonic()
    for marker in stall.glob("rank_*.json"):
        os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1's torchrun
    node0, _ = finish(nodes, timeout=120)
    kill = {"seconds": time.monotonic() - killed_at, "code": node0[0], "output": node0[1]}

    done = finish(start_nodes(root, [root / "K"] * 2, base, WORKERS, resume=True, faults={"probe": True}))
    assert [code for code, _ in done] == [0, 0], done[0][1][-3000:]
    return root, kill


def test_two_nodes_train_like_one_and_checkpoint_once(runs):
    root, _ = runs
    r, k = losses(root / "R"), losses(root / "K")
    assert sorted(r) == sorted(k) == list(range(1, STEPS + 1))
    assert np.isnan(r[2]) and np.isnan(k[2])  # rank 0's NaN step was skipped on every node alike
    # 2 x 2 with partitioned construction == 1 x 4 with the whole model built first (ZeRO-3 both)
    np.testing.assert_allclose([k[s] for s in sorted(k)], [r[s] for s in sorted(r)], rtol=1e-5)
    ckpts = root / "K" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    for step in ckpts.glob("step_*"):  # one checkpoint for the job: every rank's part once, shared files once
        files = sorted(str(f.relative_to(step)) for f in step.rglob("*") if f.is_file() and "universal" not in str(f))
        states = sorted(f for f in files if f.endswith(".pt"))
        assert states == sorted(
            f"ds/state/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for kind in KINDS for r in range(4)
        )
        assert [f for f in files if f.startswith("rng/")] == [f"rng/rank_{r:05d}.json" for r in range(4)]
        assert {"trainer.json", "loader.json", "config.yaml", "model.yaml"} <= set(files)
        assert json.loads((step / "trainer.json").read_text())["world_size"] == 4


def test_a_killed_node_stops_the_others_with_a_message(runs):
    _, kill = runs
    assert kill["code"] != 0 and kill["seconds"] < 60, kill
    lines = [line for line in kill["output"].splitlines() if "lost contact" in line]
    assert lines and all("resume the whole job from step_00000004 with --resume" in line for line in lines), kill
    assert "Traceback" not in "\n".join(line for line in kill["output"].splitlines() if "interleaf" in line)


def test_resume_the_two_node_checkpoint_on_one_node_of_two_and_of_one(runs, setup):
    root, _ = runs
    _, base = setup
    r = losses(root / "R")
    source = root / "K"
    for nproc in (2, 1):  # the second copy carries the universal checkpoint the first one made
        run = root / f"K-on-{nproc}"
        shutil.copytree(source, run)
        shutil.rmtree(run / "checkpoints" / "step_00000006")
        (run / "checkpoints" / "latest").write_text("step_00000004\n")
        train(run, base, nproc=nproc, resume=True)
        c = losses(run)
        np.testing.assert_allclose([c[s] for s in (5, 6)], [r[s] for s in (5, 6)], rtol=1e-5)
        assert json.loads((run / "checkpoints" / "step_00000006" / "trainer.json").read_text())["world_size"] == nproc
        source = run


def test_export_of_the_two_node_run(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    import interleaf

    root, _ = runs
    assert main(["export", str(root / "K"), str(tmp_path / "k")]) == 0
    probe = load_file(str(root / "K" / "probe.safetensors"))  # the 2 x 2 engine's logits after training
    with torch.no_grad():
        logits = interleaf.load(tmp_path / "k").model(probe["tokens"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    assert main(["export", str(root / "R"), str(tmp_path / "r")]) == 0
    k, r = load_file(str(tmp_path / "k" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert sorted(k) == sorted(r)
    for name in k:  # the same training as 1 x 4, up to float rounding (weights ~ 0.02, Adam steps ~ 3e-3)
        torch.testing.assert_close(k[name], r[name], rtol=1e-3, atol=1e-4)


# ---- bad input across nodes: one clear line, no hang ---------------------------------------
def test_a_batch_the_world_does_not_divide(setup, tmp_path):
    root, base = setup
    (n0, out0), (n1, _) = finish(start_nodes(tmp_path, [tmp_path / "b"] * 2, base, "global_batch=6", "micro_batch=1"))
    assert n0 != 0 and n1 != 0
    errors = [line for line in out0.splitlines() if line.startswith("interleaf train: error:")]
    assert errors == [
        "interleaf train: error: global_batch=6 is not divisible by micro_batch x processes = 1 x 4 = 4"
    ], out0[-2000:]
    assert not (tmp_path / "b").exists()


def test_a_rank_that_never_joins_times_out_with_a_message(setup, tmp_path):
    _, base = setup
    env = dict(fault_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    t0 = time.monotonic()
    cmd = CLI + ["train", CONFIG, *base, f"run_dir={tmp_path / 'r'}", "dist_timeout_s=5", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and time.monotonic() - t0 < 60
    errors = [line for line in res.stderr.splitlines() if line.startswith("interleaf train: error:")]
    assert len(errors) == 1 and "the 2 processes of the run did not all meet at 127.0.0.1:" in errors[0], res.stderr
    assert "within dist_timeout_s=5" in errors[0] and "start every rank" in errors[0]


def test_a_run_folder_the_nodes_do_not_share(setup, tmp_path):
    _, base = setup
    (n0, out0), (n1, _) = finish(start_nodes(tmp_path, [tmp_path / "here", tmp_path / "there"], base))
    assert n0 != 0 and n1 != 0
    errors = [line for line in out0.splitlines() if line.startswith("interleaf train: error:")]
    assert len(errors) == 1, out0[-3000:]
    assert f"run_dir {tmp_path / 'here'} is not shared between the processes: ranks 2, 3" in errors[0]
    assert "cannot see the file rank 0" in errors[0] and "every node mounts at the same path" in errors[0]
    assert not list((tmp_path / "here").glob("checkpoints/*")) and not (tmp_path / "there").exists()

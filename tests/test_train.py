"""Training with DeepSpeed on CPU, in real processes (gloo): world sizes, ZeRO stages, kills, resume, export.

One module-scoped set of short runs (debug model, 6 steps, seq_len 32) is shared by the assertions:

    A  1 process,  ZeRO-2, 2 accumulation steps     (the reference)
    B  2 processes, ZeRO-2                          same global batch as A
    D  2 processes, ZeRO-3, activation checkpointing + probe logits + what ZeRO-3 holds per rank,
       exported afterwards
    C  B's step-4 checkpoint resumed on 1 process   (universal checkpoint + loader re-split)
    E  1 process: aborted by non-finite losses, restarted, SIGKILLed mid-step, SIGKILLed while
       writing a checkpoint, resumed to the end

Every run sees a truncated shard and a garbage shard among its data, and rank 0's loss is made
NaN at step 2 (a skipped step). Faults come from outside the trainer: tests/faults/sitecustomize.py,
on the processes' PYTHONPATH, patches it as INTERLEAF_FAULTS says.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from training_helpers import fault_env, make_tokenizer_dir, metrics, truncate, write_token_shards

from interleaf.cli import main
from interleaf.errors import ConfigError, InterleafError

pytestmark = pytest.mark.slow
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "debug.yaml")
CLI = [sys.executable, "-c", "import sys; from interleaf.cli import main; sys.exit(main(sys.argv[1:]))"]
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    vocab = make_tokenizer_dir(root / "tok")
    write_token_shards(root / "data", vocab, n_docs=60, per_shard=3)
    truncate(root / "data" / "t-000003.tar")
    (root / "data" / "t-000099.tar").write_bytes(b"not a tar" * 100)
    write_token_shards(root / "val", vocab, n_docs=12, per_shard=6, seed=5, prefix="v")
    base = [
        f"tokenizer={root / 'tok'}",
        f"data.sources=[{{name: a, paths: [{root / 'data'}]}}]",
        f"data.eval_sources=[{{name: v, paths: [{root / 'val'}]}}]",
        f"steps={STEPS}",
        "save_every=2",
        "keep_last=2",
        "eval_every=1",
        "data.shuffle_buffer=32",
    ]
    return root, base


def train(run_dir, base, *extra, nproc=1, resume=False, faults=None):
    cmd = CLI + ["train", CONFIG, *base, f"run_dir={run_dir}", *extra, "--quiet"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    cmd += ["--resume"] if resume else []
    return subprocess.run(cmd, capture_output=True, text=True, env=fault_env(**(faults or {})), timeout=600)


def ok(res):
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir):
    steps, _ = metrics(run_dir)
    return np.array([np.nan if steps[s]["loss"] is None else steps[s]["loss"] for s in sorted(steps)])


@pytest.fixture(scope="module")
def runs(setup):
    root, base = setup
    ok(train(root / "A", base, "zero_stage=2"))
    ok(train(root / "B", base, "zero_stage=2", nproc=2))
    ok(
        train(
            root / "D",
            base,
            "zero_stage=3",
            "activation_checkpointing=true",
            nproc=2,
            faults={"probe": True, "memory": True},
        )
    )
    return root


def test_world_sizes_and_zero_stages_agree(runs):
    a, b, d = (losses(runs / r) for r in "ABD")
    assert len(a) == STEPS and np.isfinite(np.delete(a, 1)).all() and np.isnan(a[1])  # step 2 was skipped
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(d, a, rtol=1e-5)
    for r in "ABD":
        steps, evals = metrics(runs / r)
        assert [steps[s]["data_crc"] for s in sorted(steps)] == [
            metrics(runs / "A")[0][s]["data_crc"] for s in sorted(steps)
        ]
        assert steps[2]["nonfinite"] and steps[STEPS]["skipped"] == 1 and steps[3]["grad_norm"] > 0
        assert evals[2]["eval"]["loss"] == evals[1]["eval"]["loss"]  # the skipped step left the weights alone
        assert evals[3]["eval"]["loss"] != evals[2]["eval"]["loss"]
        assert set(evals[STEPS]["eval"]) == {"loss", "text_loss", "image_loss", "tokens"}
        read = steps[STEPS]["read"]
        assert read["bad_shards"] >= 1  # the truncated / garbage shards were met, skipped and counted
    first, last = metrics(runs / "A")[0][1], metrics(runs / "A")[0][STEPS]
    assert last["lr"] < first["lr"] * 2 and first["lr"] == pytest.approx(3e-3 / 2)  # warm-up then cosine
    assert {"text_loss", "image_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(last)
    kept = sorted(p.name for p in (runs / "A" / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000004", "step_00000006"]  # keep_last=2


def test_resume_on_fewer_processes_loses_no_sample(runs, setup):
    root, base = setup
    c = root / "C"
    shutil.copytree(root / "B", c)
    shutil.rmtree(c / "checkpoints" / "step_00000006")
    (c / "checkpoints" / "latest").write_text("step_00000006\n")  # stale pointer: falls back to step 4
    ok(train(c, base, "zero_stage=2", resume=True))
    sb, sc = metrics(root / "B")[0], metrics(c)[0]
    assert sorted(sc) == list(range(1, STEPS + 1))
    assert [sc[s]["data_crc"] for s in (5, 6)] == [sb[s]["data_crc"] for s in (5, 6)]
    np.testing.assert_allclose([sc[s]["loss"] for s in (5, 6)], [sb[s]["loss"] for s in (5, 6)], rtol=1e-5)
    assert (c / "checkpoints" / "step_00000004" / "ds" / "state_universal").is_dir()


def test_kills_and_aborts_resume_exactly(runs, setup):
    root, base = setup
    e = root / "E"
    res = train(e, base, "max_nonfinite=1")
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "not finite for 1 steps in a row" in err[0]
    res = train(e, base, resume=True, faults={"kill_at_step": 5})  # no checkpoint yet: starts over
    assert res.returncode == -9
    assert (e / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    res = train(e, base, resume=True, faults={"kill_in_save": 6})
    assert res.returncode == -9
    ckpts = e / "checkpoints"
    assert (ckpts / ".tmp-step_00000006").is_dir() and (ckpts / "latest").read_text().strip() == "step_00000004"
    ok(train(e, base, resume=True))
    assert not list(ckpts.glob(".tmp-*")) and (ckpts / "latest").read_text().strip() == "step_00000006"
    se, sa = metrics(e)[0], metrics(root / "A")[0]
    assert sorted(se) == list(range(1, STEPS + 1))
    assert [se[s]["data_crc"] for s in se] == [sa[s]["data_crc"] for s in se]
    np.testing.assert_allclose(losses(e), losses(root / "A"), rtol=1e-6)


def test_export_from_zero3_matches_the_engine(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    import interleaf

    out = tmp_path / "model"
    assert main(["export", str(runs / "D"), str(out)]) == 0
    pipe = interleaf.load(out)
    probe = load_file(str(runs / "D" / "probe.safetensors"))
    with torch.no_grad():
        logits = pipe.model(probe["tokens"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-5, atol=1e-5)
    assert pipe.vqgan is not None and pipe.vocab.size == pipe.model.args.vocab_size
    assert json.loads((out / "training.json").read_text())["step"] == STEPS
    assert main(["export", str(runs / "D"), str(tmp_path / "m2"), "--step", "3"]) == 2  # pruned / never saved


def test_export_writes_and_keeps_sampling_defaults(runs, tmp_path, capsys):
    from interleaf.pipeline import read_sampling_defaults

    out = tmp_path / "model"
    assert main(["export", str(runs / "D"), str(out), "--cfg", "1.5", "--image-temperature", "0.3"]) == 0
    assert read_sampling_defaults(out) == {"image_temperature": 0.3, "cfg_scale": 1.5}
    assert main(["export", str(runs / "D"), str(out), "--top-k", "5"]) == 0  # again: the earlier values stay
    assert read_sampling_defaults(out) == {"top_k": 5, "image_temperature": 0.3, "cfg_scale": 1.5}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(runs / "D"), str(out), "--top-p", "2"]) == 2
    assert "error: --top-p must be a number in (0, 1], got 2.0" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and read_sampling_defaults(out)["top_k"] == 5
    assert main(["export", str(runs / "D"), str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "sampling.yaml").exists()


def test_export_refuses_bad_destinations_and_damaged_checkpoints(runs, tmp_path, capsys, monkeypatch):
    def refused(run, out, message):
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main(["export", str(run), str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left, nothing replaced

    earlier = tmp_path / "earlier"
    assert main(["export", str(runs / "A"), str(earlier)]) == 0
    capsys.readouterr()
    kept = sorted(p.name for p in earlier.iterdir())
    monkeypatch.chdir(earlier)
    refused(runs / "A", ".", "is the current folder")  # replacing it would pull the folder from under the shell
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in earlier.iterdir()) == kept
    (tmp_path / "afile").write_text("")
    refused(runs / "A", tmp_path / "afile", "exists and is not a folder")
    refused(runs / "A", tmp_path / "afile" / "sub", "is a file, not a folder")
    refused(runs / "A", "/proc/interleaf-export", "cannot write in /proc")

    run = tmp_path / "run"
    shutil.copytree(runs / "A", run)
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    trainer = (ckpt / "trainer.json").read_text()
    (ckpt / "trainer.json").write_text("{")
    refused(run, tmp_path / "m", "is unreadable")
    (ckpt / "trainer.json").write_bytes(b"\xff\xfe")
    refused(run, tmp_path / "m", "not a UTF-8 text file")
    (ckpt / "trainer.json").write_text(trainer)
    for f in (ckpt / "ds").rglob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])  # truncated engine state
    refused(run, tmp_path / "m", "cannot read its engine state")


def test_launcher_environments(monkeypatch):
    from interleaf.training.engine import dist_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_env() == (5, 8, 1)  # srun: SLURM variables become RANK / WORLD_SIZE / LOCAL_RANK
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_env() == (3, 4, 3)  # torchrun / deepspeed set these themselves


# ---- bad input: one clear error before any work ----------------------------------------------
def test_bad_configs_fail_before_work(setup, runs, tmp_path, capsys):
    from interleaf.training.train import load_train_config, prepare

    root, base = setup
    cfg = load_train_config(CONFIG, base + [f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"global_batch=4 is not divisible by micro_batch x processes = 2 x 3"):
        prepare(cfg, 3)
    with pytest.raises(ConfigError, match="seq_len=128 is longer than the model's max_seq_len=64"):
        prepare(load_train_config(CONFIG, base + ["data.seq_len=128"]), 1)
    with pytest.raises(InterleafError, match="no shards match"):
        prepare(load_train_config(CONFIG, base + [f"data.sources=[{{name: a, paths: ['{tmp_path}/x-*.tar']}}]"]), 1)
    cases = [
        (["--nproc", "3"], "not divisible by micro_batch x processes"),
        ([f"data.sources=[{{name: a, paths: ['{tmp_path}/missing.tar']}}]"], "shard not found"),
        (["global_batch=5"], "not a multiple of micro_batch"),
        (["data.stages=[{start: 0.5, weights: {nope: 1}}]"], "unknown source 'nope'"),
        (["optim.betas=[2, 3]"], "optim.betas must be two numbers in [0, 1)"),
        (["optim.lr=.nan"], "optim.lr must be a finite number"),
        (["optim.lr=.inf"], "optim.lr must be a finite number"),
        (["threads=100000"], "more than the"),
        ([f"deepspeed={tmp_path / 'nope.json'}"], "DeepSpeed config not found"),
    ]
    for extra, msg in cases:
        assert main(["train", CONFIG, *base, f"run_dir={tmp_path / 'r'}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r").exists()
    # resuming with another model shape is refused before anything is written
    run = tmp_path / "resume"
    shutil.copytree(runs / "A", run)
    config = (run / "config.yaml").read_text()
    assert main(["train", CONFIG, *base, f"run_dir={run}", "model.dim=48", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "dim 64 -> 48" in err[0], err
    assert (run / "config.yaml").read_text() == config


def test_memory_plan_is_what_zero3_holds(runs):
    """`interleaf info --world`'s model states against DeepSpeed's own tensors on each rank of D."""
    from interleaf.config import load_config
    from interleaf.model.args import ModelArgs
    from interleaf.training.engine import read_ds_json
    from interleaf.training.memory import memory_plan

    args = load_config(ModelArgs, runs / "D" / "model.yaml")
    zero = read_ds_json(Path(CONFIG).parents[1] / "deepspeed" / "zero3-cpu-fp32.json")["zero_optimization"]
    plan = memory_plan(args, 2, 3, "fp32", 2, 32, zero)
    for rank in (0, 1):
        held = json.loads((runs / "D" / "memory" / f"rank_{rank}.json").read_text())
        assert (held["params"], held["grads"], held["master"] + held["moments"]) == (
            plan.params,
            plan.grads,
            plan.optimizer,
        )
        assert held["bucket"] == plan.bucket
    assert (
        memory_plan(args, 2, 3, "fp32", 2, 32, {**zero, "stage3_param_persistence_threshold": 0}).params < plan.params
    )

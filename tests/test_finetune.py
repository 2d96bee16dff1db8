"""Fine-tuning a converted model: `init:`, `freeze:`, `train_rows:`, the Chameleon prompt format, the
best checkpoint and `export --best`, on CPU in real processes (gloo).

A random release in Meta's layout (tests/chameleon_layouts.py, its BPE learned from shapes captions)
is converted with `from_meta`; shapes image-caption pairs are tokenized with the converted directory.
Runs from it, sharing one config (layer 0 frozen by pattern, the output head trained on its image
rows only, pairs as a turn and its answer):

    A  1 process,  ZeRO-2   exported with --best
    B  2 processes, ZeRO-3  (weights read straight into each rank's partitions), exported
    C  A's step-4 checkpoint resumed
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from chameleon_layouts import write_meta_release
from training_helpers import fault_env, metrics

from interleaf.cli import main
from interleaf.data.shapes import ShapesWorld
from interleaf.errors import InterleafError
from interleaf.model.meta import from_meta
from interleaf.pipeline import load_model, read_weights
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.training.checkpoint import CKPT_DIR, best_checkpoint, prune, read_trainer_state
from interleaf.training.export import checkpoint_for
from interleaf.training.loader import DataConfig, StreamingLoader, make_spec, resolve_sources, to_torch
from interleaf.training.mixtures import SourceConfig
from interleaf.training.shards import ShardWriter, document_members
from interleaf.training.tokenize import tokenize_shards

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "import sys; from interleaf.cli import main; sys.exit(main(sys.argv[1:]))"]
STEPS = 6
SEQ_LEN = 96
FROZEN = "layers.0.*"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(root, the converted model directory, the fine-tuning config file)."""
    root = tmp_path_factory.mktemp("finetune")
    world = ShapesWorld(resolution=32, max_shapes=1, seed=3)
    captions = tuple(world.pair(i)[1] for i in range(200))
    write_meta_release(root / "src", texts=captions, dim=64, n_layers=2)
    model = from_meta(root / "src", root / "model", dtype=torch.float32)
    for name, start, n in (("train", 0, 64), ("val", 10_000, 16)):
        w = ShardWriter(root / "docs" / name, name, max_count=16)
        for i in range(start, start + n):
            image, caption, _ = world.pair(i)
            w.write(f"{name}{i}", document_members([caption, image]))
        w.close()
        tokenize_shards([str(root / "docs" / name)], root / "tokens" / name, model, progress=False)
    config = {
        "init": str(model),
        "freeze": [FROZEN],
        "train_rows": {"output": "image"},
        "data": {
            "format": "chameleon_prompt",
            "sources": [{"name": "shapes", "paths": [str(root / "tokens" / "train")]}],
            "eval_sources": [{"name": "val", "paths": [str(root / "tokens" / "val")]}],
            "seq_len": SEQ_LEN,
            "shuffle_buffer": 16,
            "eval_batches": 2,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 1.0},  # large: misapplied decay would show
        "steps": STEPS,
        "global_batch": 4,
        "micro_batch": 2,
        "log_every": 1,
        "eval_every": 2,
        "save_every": 2,
        "keep_last": 2,
        "threads": 1,
    }
    (root / "ft.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root, model, root / "ft.yaml"


def train(config, run_dir, *extra, nproc=1, resume=False, quiet=True, faults=None):
    cmd = CLI + ["train", str(config), f"run_dir={run_dir}", *extra] + (["--quiet"] if quiet else [])
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    cmd += ["--resume"] if resume else []
    env = fault_env(nan_steps=[], **(faults or {}))  # tests/faults: no NaN steps, only what `faults` asks
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def without_train_rows(config: Path, folder: Path) -> Path:
    """A copy of the run config without its `train_rows` (an override cannot remove a key)."""
    path = folder / "no-rows.yaml"
    path.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "train_rows"}))
    return path


def held_out(run_dir):
    """{step: held-out loss} of a run."""
    return {step: r["eval"]["loss"] for step, r in metrics(run_dir)[1].items()}


@pytest.fixture(scope="module")
def runs(release):
    root, _, config = release
    res = train(config, root / "A", "zero_stage=2", quiet=False)
    (root / "A.stderr").write_text(res.stderr)  # the progress line
    train(config, root / "B", "zero_stage=3", nproc=2, faults={"reads": True})
    assert main(["export", str(root / "A"), str(root / "A-best"), "--best"]) == 0
    assert main(["export", str(root / "B"), str(root / "B-out")]) == 0
    return root


def held_out_loss(model_dir, root) -> float:
    """The held-out loss of a model directory, computed here as the trainer does (one process)."""
    model, vocab = load_model(model_dir), Vocabulary.load(model_dir)
    val = [SourceConfig("val", [str(root / "tokens" / "val")])]
    data = DataConfig(eval_sources=val, seq_len=SEQ_LEN, format="chameleon_prompt")
    spec = make_spec(data, resolve_sources(data.eval_sources), vocab, None, STEPS, 2, 2, eval_mode=True)
    it = iter(StreamingLoader(spec, 0, 1))
    total = count = 0.0
    with torch.no_grad():
        for _ in range(2 * 2):  # eval_batches x micro-steps per step on one process
            b = to_torch(next(it))
            out = model(b["tokens"], b["doc_ids"], targets=b["targets"], is_image=b["is_image"])
            n_text, n_image = out.n_text_tokens.double(), out.n_image_tokens.double()
            total += float(out.text_loss * n_text + out.image_loss * n_image)
            count += float(n_text + n_image)
    return total / count


def test_finetuning_lowers_the_held_out_loss_and_export_best_picks_the_lowest(runs, release):
    root, model, _ = release
    evals = held_out(runs / "A")
    assert sorted(evals) == [2, 4, 6]
    before = held_out_loss(model, root)
    best_step = min(evals, key=evals.get)
    assert evals[best_step] < before - 0.5, (before, evals)
    exported = json.loads((runs / "A-best" / "training.json").read_text())
    assert exported["step"] == best_step and exported["eval_loss"] == pytest.approx(evals[best_step], rel=1e-12)
    # the exported weights give the loss the run logged for them (the trainer's evaluation is right)
    assert held_out_loss(runs / "A-best", root) == pytest.approx(evals[best_step], rel=1e-5)
    # the progress line shows the latest held-out loss
    assert f"held_out={evals[STEPS]:.4f}" in (runs / "A.stderr").read_text()
    # every checkpoint records its held-out loss; the exported model keeps the init's sampling.yaml
    for ckpt in (runs / "A" / CKPT_DIR).glob("step_*"):
        step = read_trainer_state(ckpt)["step"]
        assert read_trainer_state(ckpt)["eval_loss"] == pytest.approx(evals[step], rel=1e-12)
    assert (runs / "A-best" / "sampling.yaml").read_text() == (model / "sampling.yaml").read_text()
    assert Vocabulary.load(runs / "A-best").to_dict() == Vocabulary.load(model).to_dict()


@pytest.mark.parametrize("run", ["A-best", "B-out"])
def test_frozen_weights_come_out_bit_identical(runs, release, run):
    _, model, _ = release
    init, out = read_weights(model), read_weights(runs / run)
    assert set(init) == set(out)
    image = Vocabulary.load(model).image_mask()
    for name, before in init.items():
        after = out[name]
        assert after.dtype == before.dtype == torch.float32
        if name.startswith("layers.0."):
            assert torch.equal(after, before), name
        elif name == "output.weight":
            assert torch.equal(after[~image], before[~image])  # rows that are not image codes: as they were
            assert not torch.equal(after[image], before[image])  # the image rows trained
        elif name.endswith(".weight") and after.dim() == 2:
            assert not torch.equal(after, before), name  # control: the other matrices trained


def test_zero3_on_two_processes_matches_one_process(runs):
    (sa, _), (sb, _) = metrics(runs / "A"), metrics(runs / "B")
    ea, eb = held_out(runs / "A"), held_out(runs / "B")
    assert sorted(sa) == sorted(sb) == list(range(1, STEPS + 1))
    assert [sa[s]["data_crc"] for s in sa] == [sb[s]["data_crc"] for s in sa]
    np.testing.assert_allclose([sb[s]["loss"] for s in sb], [sa[s]["loss"] for s in sa], rtol=1e-5)
    np.testing.assert_allclose([eb[s] for s in sorted(eb)], [ea[s] for s in sorted(ea)], rtol=1e-5)


def test_zero3_ranks_read_only_their_partitions_of_the_init(runs, release):
    """Under ZeRO-3 each of the 2 ranks reads its own half of every tensor from the init directory
    (rounded up: DeepSpeed pads partitions), and together they read each value once."""
    _, model, _ = release
    init = read_weights(model)
    per_rank = [json.loads((runs / "B" / "reads" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for name, t in init.items():
        counts = [reads[name] for reads in per_rank]
        assert sum(counts) == t.numel() and max(counts) == -(-t.numel() // 2), (name, counts)


def test_resume_of_a_finetuning_run_continues_exactly(runs, release, tmp_path):
    root, _, config = release
    c = tmp_path / "C"
    shutil.copytree(runs / "A", c)
    shutil.rmtree(c / CKPT_DIR / "step_00000006")
    (c / CKPT_DIR / "latest").write_text("step_00000004\n")
    train(config, c, "zero_stage=2", resume=True)
    (sa, _), (sc, _) = metrics(runs / "A"), metrics(c)
    ea, ec = held_out(runs / "A"), held_out(c)
    assert [sc[s]["data_crc"] for s in (5, 6)] == [sa[s]["data_crc"] for s in (5, 6)]
    np.testing.assert_allclose([sc[s]["loss"] for s in (5, 6)], [sa[s]["loss"] for s in (5, 6)], rtol=1e-6)
    assert ec[6] == pytest.approx(ea[6], rel=1e-6)
    assert main(["export", str(c), str(tmp_path / "C-out"), "--step", "6"]) == 0
    assert main(["export", str(runs / "A"), str(tmp_path / "A-out"), "--step", "6"]) == 0
    a, b = read_weights(tmp_path / "A-out"), read_weights(tmp_path / "C-out")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
        if name.startswith("layers.0."):
            assert torch.equal(b[name], a[name])


def test_resuming_with_other_trained_parameters_is_refused_in_one_line(runs, release, tmp_path, capsys):
    """The optimizer state of a checkpoint holds the parameters (and rows) it trained: a resume that
    freezes or trains others is one line, before anything is written; the same config resumes (above)."""
    root, _, config = release
    run = tmp_path / "run"
    shutil.copytree(runs / "A", run)
    state = read_trainer_state(run / CKPT_DIR / "step_00000006")
    assert state["train_rows"] == {"output.weight": "image"} and state["frozen"]
    assert all(n.startswith("layers.0.") for n in state["frozen"])
    written = sorted(p.name for p in run.rglob("*"))
    cases = [
        (config, ["freeze=[layers.1.*]"], "parameter layers.0."),
        (config, ["freeze=[]"], "is frozen there and trained here"),
        (config, ["freeze=[layers.0.*, layers.1.*]"], "parameter layers.1."),
        (config, ["train_rows={output: text}"], "output.weight trained its image rows there and its text rows here"),
        (without_train_rows(config, tmp_path), [], "output.weight trained its image rows there and all its rows here"),
    ]
    for path, extra, msg in cases:
        assert main(["train", str(path), f"run_dir={run}", *extra, "--resume"]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot resume" in err[0] and msg in err[0], (extra, err)
    assert sorted(p.name for p in run.rglob("*")) == written


def test_the_best_checkpoint_outlives_keep_last(runs, tmp_path, capsys):
    """`prune` keeps the checkpoint with the lowest held-out loss beside the newest ones; export --best
    takes it. Real checkpoints of run A, their held-out losses rewritten so that the oldest is best."""
    run = tmp_path / "run"
    shutil.copytree(runs / "A", run)
    root = run / CKPT_DIR
    steps = sorted(root.glob("step_*"))
    assert [p.name for p in steps] == ["step_00000004", "step_00000006"]
    for ckpt, loss in zip(steps, (1.0, 2.0)):
        state = read_trainer_state(ckpt)
        (ckpt / "trainer.json").write_text(json.dumps({**state, "eval_loss": loss}))
    assert best_checkpoint(root) == steps[0]
    prune(root, keep_last=1)
    assert sorted(root.glob("step_*")) == steps  # keep_last=1 alone would delete step 4
    assert main(["export", str(run), str(tmp_path / "best"), "--best"]) == 0
    assert json.loads((tmp_path / "best" / "training.json").read_text())["step"] == 4
    (steps[0] / "trainer.json").write_text(json.dumps({**read_trainer_state(steps[0]), "eval_loss": 3.0}))
    prune(root, keep_last=1)  # now step 6 is the best and the newest: step 4 goes
    assert sorted(root.glob("step_*")) == steps[1:]
    for ckpt in steps[1:]:
        (ckpt / "trainer.json").write_text(json.dumps({**read_trainer_state(ckpt), "eval_loss": None}))
    with pytest.raises(InterleafError, match="no checkpoint with a held-out loss"):
        checkpoint_for(run, None, best=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["export", str(run), str(tmp_path / "x"), "--best", "--step", "6"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_fine_tuning_configs_fail_in_one_line(release, tmp_path, capsys):
    root, model, config = release
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"init={tmp_path / 'missing'}"], "init: model directory not found"),
        ([f"init={tmp_path / 'empty'}"], "is not a model directory (no model.yaml)"),
        ([f"init={root / 'tokens' / 'train'}"], "is not a model directory"),
        (["freeze=[layers.0.*, nope.*]"], "freeze: pattern 'nope.*' matches no parameter"),
        (["train_rows={output: audio}"], "train_rows.output: unknown rows 'audio'"),
        (["train_rows={wq: image}"], "train_rows: unknown matrix 'wq'"),
        (["model.dim=128"], "model.dim is 128, but init"),
        (["model_size=100M"], "model_size=100M: dim"),
        (["model_size=huge"], "unknown model_size 'huge'"),
        (["data.format=chat"], "config key 'data.format'"),
    ]
    for extra, msg in cases:
        assert main(["train", str(config), f"run_dir={tmp_path / 'r'}", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (extra, err)
    assert main(["train", str(without_train_rows(config, tmp_path)), f"run_dir={tmp_path / 'r'}", "freeze=['*']"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every parameter is frozen and train_rows names none" in err[0], err
    assert not (tmp_path / "r").exists()
    # what may change: settings no weight depends on, a matching tokenizer, the init's own size
    from interleaf.training.train import load_train_config, prepare

    cfg = load_train_config(config, [f"run_dir={tmp_path / 'r'}", "model.dropout=0.1", f"tokenizer={model}"])
    plan = prepare(cfg, 1)
    assert plan.model_args.dropout == 0.1 and plan.model_args.dim == 64
    assert plan.frozen and all(n.startswith("layers.0.") for n in plan.frozen)
    assert plan.train_rows == {"output.weight": "image"}


def test_the_readme_config_prepares_against_a_converted_release(release, tmp_path):
    """README's fine-tuning config, its paths pointed at this test's release: it loads and passes every
    check a run makes before it starts (on 8 processes, as README starts it)."""
    from interleaf.training.train import load_train_config, prepare

    root, model, _ = release
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Fine-tuning\n") :]
    (tmp_path / "ft.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))
    paths = {
        "init": str(model),
        "run_dir": str(tmp_path / "run"),
        "data.sources": f"[{{name: mine, paths: [{root / 'tokens' / 'train'}]}}]",
        "data.eval_sources": f"[{{name: val, paths: [{root / 'tokens' / 'val'}]}}]",
    }
    cfg = load_train_config(tmp_path / "ft.yaml", [f"{k}={v}" for k, v in paths.items()])
    assert cfg.tokenizer == str(model) and cfg.data.format == "chameleon_prompt"
    plan = prepare(cfg, 8)
    assert plan.train_rows == {"output.weight": "image"} and "output.weight" not in plan.frozen
    assert len(plan.frozen) == len(read_weights(model)) - 1  # everything else


def test_weights_source_reads_any_range_of_sharded_weights(tmp_path):
    """What `init:` fills parameters (ZeRO-3: partitions) from: any flat range of any tensor equals
    that range of the whole tensor, from one file or from shards with an index."""
    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import INDEX_FILE, WeightsSource, model_state, write_weights

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=96, multiple_of=16))
    whole = model_state(model)
    for folder in ("one", "shards"):
        (tmp_path / folder).mkdir()
    write_weights(tmp_path / "one", whole)
    files = write_weights(tmp_path / "shards", whole, shard_bytes=20_000)
    assert len(files) > 2 and (tmp_path / "shards" / INDEX_FILE).is_file()
    g = np.random.default_rng(0)
    for folder in ("one", "shards"):
        source = WeightsSource(tmp_path / folder)
        assert source.shapes == {k: tuple(v.shape) for k, v in whole.items()}
        for name, t in whole.items():
            flat = t.reshape(-1)
            for start, stop in [(0, flat.numel()), *np.sort(g.integers(0, flat.numel() + 1, (5, 2)), axis=1)]:
                got = source.read(name, tuple(t.shape), int(start), int(stop))
                assert torch.equal(got, flat[start:stop]), (folder, name, start, stop)

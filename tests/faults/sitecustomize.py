"""Faults injected into training processes from outside, for the training tests.

Python imports `sitecustomize` at start-up from the first folder on its path that holds one: a test
puts this folder on PYTHONPATH and sets INTERLEAF_FAULTS (a JSON object), and every Python process
of the run (the `--nproc` launcher, torchrun's workers, ...) patches interleaf's trainer with:

    nan_steps: [2]       rank 0's loss is NaN in these steps (1-based), in forward and backward
    kill_at_step: 5      SIGKILL this process in the middle of this step (after its first backward)
    kill_in_save: 6      SIGKILL once the engine state of this step's checkpoint is written
    stall: {"step": 5, "ranks": [2, 3], "dir": D}
                         these ranks write D/rank_N.json ({"pid": ...}) at the start of the step and
                         wait there, for the test to kill them (a node that dies mid-run)
    probe: true          after training, save the trained engine's logits on a fixed batch as
                         RUN/probe.safetensors (to compare an export with the engine)
    memory: true         after the first optimizer step, write RUN/memory/rank_N.json: the bytes of
                         parameters, gradients, optimizer state and gradient bucket that DeepSpeed's
                         ZeRO-3 optimizer holds on this rank
    reads: true          once the model is built, write RUN/reads/rank_N.json: how many values of each
                         tensor this rank read from the `init:` directory (WeightsSource.read)

The patches are applied when a process imports interleaf.training.train, so the processes that
never train (torchrun's agent, data workers, DeepSpeed's converter) start as fast as without them.
Without INTERLEAF_FAULTS nothing is changed.
"""

import importlib.abc
import importlib.util
import json
import os
import sys

FAULTS = json.loads(os.environ.get("INTERLEAF_FAULTS", "null"))
TARGET = "interleaf.training.train"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET as usual, then runs _install on the module once it has executed."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _install(FAULTS, module)

        spec.loader.exec_module = exec_module
        return spec


def _install(faults: dict, train) -> None:
    import signal
    import time
    from pathlib import Path

    import torch

    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import WeightsSource

    state = {"step": 0, "rank": 0}
    reads: dict[str, int] = {}

    original_read = WeightsSource.read

    def read(self, name, shape, start, stop):
        reads[name] = reads.get(name, 0) + (stop - start)
        return original_read(self, name, shape, start, stop)

    if faults.get("reads"):
        WeightsSource.read = read

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    original_step = train.Trainer.train_step

    def train_step(self, micro_batches):
        state["step"], state["rank"] = self.step + 1, self.rank
        stall = faults.get("stall")
        if stall and state["step"] == stall["step"] and self.rank in stall["ranks"]:
            marker = Path(stall["dir"]) / f"rank_{self.rank}.json"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"pid": os.getpid()}))
            time.sleep(3600)
        stats = original_step(self, micro_batches)
        if faults.get("memory") and self.step == 0:
            _write_memory(self)
        return stats

    train.Trainer.train_step = train_step

    original_forward = Transformer.forward

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if kwargs.get("targets") is not None and torch.is_grad_enabled():
            if state["rank"] == 0 and state["step"] in faults.get("nan_steps", ()):
                out = out._replace(loss=out.loss * float("nan"))
        return out

    Transformer.forward = forward

    original_setup = train.Trainer.setup

    def setup(self):
        original_setup(self)
        if faults.get("reads"):
            out = self.run_dir / "reads" / f"rank_{self.rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(reads))
        engine = self.engine
        backward, save = engine.backward, engine.save_checkpoint

        def backward_then_die(*args, **kwargs):
            result = backward(*args, **kwargs)
            if state["step"] == faults.get("kill_at_step"):
                die()
            return result

        def save_then_die(*args, **kwargs):
            result = save(*args, **kwargs)
            if self.step == faults.get("kill_in_save"):
                die()
            return result

        engine.backward, engine.save_checkpoint = backward_then_die, save_then_die

    train.Trainer.setup = setup

    original_run = train.Trainer.run

    def run(self, progress=True):
        last = original_run(self, progress)
        if faults.get("probe"):
            _probe(self)
        return last

    train.Trainer.run = run


def _probe(trainer) -> None:
    """Logits of the trained engine on a fixed batch (every rank runs it: ZeRO-3 gathers weights)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, trainer.plan.vocab.size, (2, min(16, trainer.cfg.data.seq_len)), generator=g)
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(tokens.to(trainer.device)).float().cpu()
    if trainer.rank == 0:
        save_file({"tokens": tokens, "logits": logits.contiguous()}, str(trainer.run_dir / "probe.safetensors"))


def _write_memory(trainer) -> None:
    """What DeepSpeed's ZeRO-3 optimizer holds on this rank after the first step, in bytes."""
    import torch

    opt = trainer.engine.optimizer  # DeepSpeedZeroOptimizer_Stage3 around the torch AdamW
    params = {id(p): p for p in trainer.engine.module.parameters()}.values()

    def nbytes(t):
        return t.numel() * t.element_size()

    moments = [t for st in opt.optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    record = {
        # each tensor's partition, and the whole tensor where it is small enough to persist
        "params": sum(nbytes(p.ds_tensor) + (nbytes(p.data) if p.ds_persist else 0) for p in params),
        # the fp32 master copy, where it is not the parameters' own partition
        "master": sum(
            nbytes(a) for a, b in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat) if a is not b
        ),
        "grads": nbytes(opt.grad_partitions_flat_buffer),
        "moments": sum(nbytes(t) for t in moments),
        "bucket": sum(nbytes(b.buffer) for b in opt.ipg_buckets.values()),
    }
    out = trainer.run_dir / "memory" / f"rank_{trainer.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))


if FAULTS:
    sys.meta_path.insert(0, _PatchOnImport())

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
    memory: true         after the first optimizer step, write RUN/memory/rank_N.json: this process's
                         partitions of parameters, gradients and optimizer state as DeepSpeed holds them

Without INTERLEAF_FAULTS nothing is imported or changed.
"""

import json
import os

FAULTS = json.loads(os.environ.get("INTERLEAF_FAULTS", "null"))


def _install(faults: dict) -> None:
    import signal
    import time
    from pathlib import Path

    import torch

    from interleaf.model.transformer import Transformer
    from interleaf.training import train

    state = {"step": 0, "rank": 0}

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
    """Bytes of this rank's parameter, gradient and optimizer-state partitions after the first step."""
    import torch

    engine = trainer.engine
    params = {id(p): p for p in engine.module.parameters()}.values()

    def nbytes(t):
        return t.numel() * t.element_size()

    own = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
    inner = engine.optimizer.optimizer  # the torch AdamW under DeepSpeed's ZeRO optimizer
    moments = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    masters = [p for group in inner.param_groups for p in group["params"]]
    record = {
        "world": trainer.plan.world,
        "param_bytes": sum(nbytes(t) for t in own),
        "master_bytes": sum(nbytes(p) for p in masters),
        "master_is_param": all(
            any(m.data_ptr() == t.data_ptr() or _overlaps(m, t) for t in own) for m in masters if m.numel()
        ),
        "grad_bytes": sum(nbytes(p.grad) for p in masters if p.grad is not None),
        "moment_bytes": sum(nbytes(t) for t in moments),
    }
    out = trainer.run_dir / "memory" / f"rank_{trainer.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))


def _overlaps(a, b) -> bool:
    """Whether tensors a and b share storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


if FAULTS:
    _install(FAULTS)

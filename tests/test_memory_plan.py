"""`interleaf info --world`: the per-process memory plan against references.

Model states (bf16, the GPU configs) against DeepSpeed's own estimators; activations against what
autograd really keeps on tiny models (every tensor saved for backward, counted once). What ZeRO-3
holds on each rank of a real run is compared in tests/test_train.py.
"""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

import interleaf.model.attention as attention
from interleaf.cli import main
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer
from interleaf.training.engine import apply_activation_checkpointing
from interleaf.training.memory import activation_values_per_token, memory_plan, module_sizes

NO_PERSISTENCE = {"stage3_param_persistence_threshold": 0}  # DeepSpeed's estimators leave it out
VARIANTS = [{}, {"tie_embeddings": True}, {"qk_norm": "rms", "n_kv_heads": 4}, {"qk_norm": "none", "n_layers": 3}]


def deepspeed_counts(args: ModelArgs) -> tuple[int, int]:
    """Total and largest-module parameters as DeepSpeed's estimators derive them from a live model."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    return model_to_params(Transformer(args))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [1, 3, 8])
def test_model_states_equal_deepspeeds_estimates(variant, world):
    args = ModelArgs.from_name("debug", **variant)
    total, largest = deepspeed_counts(args)
    assert sum(sum(t) for t in module_sizes(args).values()) == total
    padding = 18 * sum(len(t) for t in module_sizes(args).values())  # ZeRO-3 pads every tensor to N parts
    z3 = memory_plan(args, world, 3, "bf16", 1, 8, NO_PERSISTENCE)
    _, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(total, largest, world, 1, cpu_offload=False)
    assert z3.gathered == largest_bytes and 0 <= z3.model_states + z3.gathered - gpu <= padding
    z2 = memory_plan(args, world, 2, "bf16", 1, 8, {})
    _, gpu = estimate_zero2_model_states_mem_needs(total, world, 1, cpu_offload=False)
    assert 0 <= z2.model_states - gpu <= 18
    z1 = memory_plan(args, world, 1, "bf16", 1, 8, {})  # stage 1 also keeps every gradient whole until the step
    assert z1.model_states - z2.model_states == 2 * total - 2 * -(-total // world)


def saved_bytes(args: ModelArgs, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps from a training forward (parameters excluded), each once."""
    torch.manual_seed(0)
    model = Transformer(args)
    if checkpointing:
        apply_activation_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(tokens, targets=tokens)
    return sum(seen.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_activations_are_what_autograd_keeps(variant, monkeypatch):
    # memory-efficient attention, as on GPU: PyTorch's flash kernel (CPU training would take the blocked path)
    monkeypatch.setattr(attention, "_blocked_applies", lambda *a, **k: False)
    args = ModelArgs.from_name("debug", max_seq_len=128, **variant)
    plan = memory_plan(args, 1, 3, "fp32", 2, 96, {})
    measured = saved_bytes(args, 2, 96, checkpointing=False)
    # RoPE's rotation table (positions x head_dim / 2 complex values per layer) is not in the plan
    assert abs(plan.activations - measured) <= 0.02 * measured, (plan.activations, measured)
    # checkpointed: each block keeps its input; the plan adds one block recomputed at a time
    kept = saved_bytes(args, 2, 96, checkpointing=True)
    block = 2 * 96 * 4 * activation_values_per_token(args)
    assert abs(plan.activations_checkpointed - block - kept) <= 0.05 * kept, (plan.activations_checkpointed, kept)
    assert kept < measured / 2


def test_info_prints_the_plan(capsys):
    assert main(["info", "chameleon-7b", "--world", "64", "--zero", "3", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer state", "gathered module", "activations", "total"):
        assert f"\n  {row} " in out, row
    assert "memory per process: 64 processes, ZeRO-3, bf16 weights, fp32 AdamW (GPU)" in out
    assert "with activation checkpointing" in out
    assert main(["info", "debug", "--world", "0"]) == 2
    assert "--world must be >= 1, got 0" in capsys.readouterr().err

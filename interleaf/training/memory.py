"""What one process of a training run holds: the per-rank memory plan behind `interleaf info --world`.

Model states follow what DeepSpeed allocates for each ZeRO stage with a torch AdamW, for P
parameters over N processes (a ZeRO-3 rank holds ceil(n / N) values of every n-value tensor):

                 parameters        gradients                    optimizer state
    bf16 (GPU)   Z1/Z2: 2P         Z1: 2P + 4P/N, Z2: 6P/N       12P/N: fp32 master copy + 2 moments
                 Z3: 2P/N          Z3: 4P/N
    fp32 (CPU)   Z1/Z2: 4P         Z1: 4P + 4P/N, Z2/Z3: 4P/N    12P/N: DeepSpeed keeps a master copy
                 Z3: 4P/N                                        of fp32 weights too (ZeRO-3 would
                                                                 skip it, but compares a torch.device
                                                                 with a device name, never equal)

(DeepSpeed's own estimators count the bf16 rows the same way: 2P + 18P/N for ZeRO-2 and
18P/N plus the largest module for ZeRO-3.) ZeRO-3 also keeps tensors of at most
`stage3_param_persistence_threshold` values whole on every process (norms, small projections).
On top of them: the ZeRO-3 module being computed, gathered whole with its gradient, and the
gradient bucket of ZeRO-2/3 (`reduce_bucket_size` values).

Activations are those autograd keeps for backward with memory-efficient attention (SDPA's flash
kernels, xformers: queries, keys, values, output and one log-sum-exp per query and head), per
token of micro_batch x seq_len, and the loss head's fp32 gradient of the output matrix, which the
chunked loss computes in forward. With activation checkpointing each block keeps only its input,
and one block's activations exist again while it is recomputed. Dropout masks are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from interleaf.model.args import ModelArgs
from interleaf.model.transformer import expected_shapes

GIB = 1024**3
BYTES = {"bf16": 2, "fp32": 4}
# DeepSpeed's defaults for what a config's zero_optimization section leaves out
DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 100_000}


@dataclass
class MemoryPlan:
    """Bytes one process of a run holds, by kind."""

    params: int
    grads: int
    optimizer: int
    gathered: int  # ZeRO-3: the largest module gathered whole, with its gradient
    bucket: int  # ZeRO-2/3: the gradient reduction bucket
    activations: int  # without activation checkpointing, loss head included
    activations_checkpointed: int

    @property
    def model_states(self) -> int:
        """Parameters, gradients and optimizer state: what ZeRO partitions."""
        return self.params + self.grads + self.optimizer

    def total(self, checkpointing: bool) -> int:
        """Everything above, with or without activation checkpointing."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.model_states + self.gathered + self.bucket + acts


def module_sizes(args: ModelArgs) -> dict[str, list[int]]:
    """Value counts of each module's own tensors (a tied output weight once): what ZeRO-3 partitions
    tensor by tensor and gathers module by module."""
    modules: dict[str, list[int]] = {}
    for name, shape in expected_shapes(args).items():
        modules.setdefault(name.rpartition(".")[0], []).append(math.prod(shape))
    return modules


def activation_values_per_token(args: ModelArgs) -> int:
    """Values one transformer block keeps per token for backward (see the module docstring)."""
    d, h, kv, f = args.dim, args.n_heads, args.n_kv_heads * args.head_dim, args.ffn_hidden
    hkv = args.n_kv_heads
    # attention_norm input and output, q, k, v, attention output, log-sum-exp; ffn_norm input and
    # output, w1 x, w3 x, silu(w1 x) and its product with w3 x; the two norms' 1/rms
    values = 6 * d + 2 * kv + h + 2 + 4 * f
    if args.qk_norm == "layernorm":  # q and k before and after the norm, a mean and 1/std per head
        values += 2 * (d + kv) + 2 * (h + hkv)
    elif args.qk_norm == "rms":
        values += (d + kv) + (h + hkv)
    return values


def memory_plan(
    args: ModelArgs, world: int, zero_stage: int, dtype: str, micro_batch: int, seq_len: int, zero_config: dict
) -> MemoryPlan:
    """Bytes per process of a run of Transformer(args) on `world` processes (see the module docstring);
    `zero_config`: the DeepSpeed config's zero_optimization section."""
    assert zero_stage in (1, 2, 3) and dtype in BYTES and world >= 1
    zc = {**DEFAULTS, **zero_config}
    w = BYTES[dtype]
    modules = module_sizes(args)
    sizes = [n for tensors in modules.values() for n in tensors]
    P = sum(sizes)
    share = sum(math.ceil(n / world) for n in sizes) if zero_stage == 3 else math.ceil(P / world)
    persistent = sum(n for n in sizes if n <= zc["stage3_param_persistence_threshold"]) if zero_stage == 3 else 0
    params = w * (share + persistent if zero_stage == 3 else P)
    # whole gradients (ZeRO-1 until the step), then the fp32 partition the optimizer reads; bf16
    # ZeRO-2 also keeps its reduced partition in bf16
    grads = {1: w * P + 4 * share, 2: (6 if dtype == "bf16" else 4) * share, 3: 4 * share}[zero_stage]
    optimizer = 12 * share  # fp32 master weights and AdamW's two moments
    gathered = 2 * w * max(sum(tensors) for tensors in modules.values()) if zero_stage == 3 else 0
    bucket = w * int(zc["reduce_bucket_size"]) if zero_stage in (2, 3) else 0
    tokens = micro_batch * seq_len
    # the loss head keeps the embedding ids (int64), the final norm's input and 1/rms, the gradient
    # of its input (fp32) and that of the output matrix (fp32, computed in forward)
    head = tokens * (8 + w * (args.dim + 1) + 4 * args.dim) + 4 * args.vocab_size * args.dim
    block = tokens * w * activation_values_per_token(args)
    return MemoryPlan(
        params=params,
        grads=grads,
        optimizer=optimizer,
        gathered=gathered,
        bucket=bucket,
        activations=args.n_layers * block + head,
        activations_checkpointed=args.n_layers * tokens * w * args.dim + block + head,
    )


def format_plan(plan: MemoryPlan, world: int, zero_stage: int, dtype: str, micro_batch: int, seq_len: int) -> str:
    """The plan as the lines `interleaf info --world` prints."""

    def gib(x: int) -> str:
        return f"{x / GIB:8.2f} GiB"

    kind = "bf16 weights, fp32 AdamW (GPU)" if dtype == "bf16" else "fp32 weights and AdamW (CPU)"
    rows = [
        f"memory per process: {world} process{'es' if world > 1 else ''}, ZeRO-{zero_stage}, {kind}",
        f"  parameters          {gib(plan.params)}",
        f"  gradients           {gib(plan.grads)}",
        f"  optimizer state     {gib(plan.optimizer)}",
        f"  model states        {gib(plan.model_states)}",
    ]
    if plan.gathered:
        rows.append(f"  gathered module     {gib(plan.gathered)}   (the largest, whole, with its gradient)")
    if plan.bucket:
        rows.append(f"  gradient bucket     {gib(plan.bucket)}   (reduce_bucket_size)")
    rows += [
        f"  activations         {gib(plan.activations)}   (micro_batch {micro_batch} x seq_len {seq_len}; "
        f"{gib(plan.activations_checkpointed).strip()} with activation checkpointing)",
        f"  total               {gib(plan.total(False))}   ({gib(plan.total(True)).strip()} with activation "
        "checkpointing)",
    ]
    return "\n".join(rows)

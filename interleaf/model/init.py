"""Initial weights of a Transformer, as values by name that can be read a piece at a time.

The recipe: normal(0, init_std) for the embedding, the output head and the q/k/v/w1/w3 projections;
normal(0, init_std / sqrt(2 n_layers)) for the projections back into the residual stream (wo, w2);
ones for norm weights and zeros for QK-norm biases.

Every value is a function of (seed, tensor name, position) only. A tensor is generated in blocks of
BLOCK values (row-major order), each block from its own generator seeded by (seed, name, block
index), so any range of a tensor can be produced without the rest. That is what lets a ZeRO-3 rank
write its partition of each parameter without building the whole tensor, and it makes the weights
independent of the order modules are built in, of the world size and of the device.

A `TensorSource` is anything that reads a flat range of a named tensor this way; `RandomInit` is
the one for fresh weights (a model directory's safetensors can be another).
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import torch

from interleaf.model.args import ModelArgs

BLOCK = 1 << 20  # values per generator: 4 MiB of float32


class TensorSource(Protocol):
    """Named full tensors, read one flat (row-major) range at a time as float32 on the CPU."""

    def read(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Values [start, stop) of tensor `name` of `shape`, flattened: a 1-D tensor of stop - start values."""
        ...


# leaf module name -> what its weight starts as; "residual": normal with the scaled-down std
_RULES = {
    "tok_embeddings": "normal",
    "output": "normal",
    "wq": "normal",
    "wk": "normal",
    "wv": "normal",
    "w1": "normal",
    "w3": "normal",
    "wo": "residual",
    "w2": "residual",
}


class RandomInit:
    """The initial weights of `Transformer(args)` for `seed` (see the module docstring)."""

    def __init__(self, args: ModelArgs, seed: int):
        self.args, self.seed = args, int(seed)

    def std(self, name: str) -> float | None:
        """The normal std of parameter `name`; None for norm parameters (constants)."""
        module, _, _ = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        if leaf.endswith("norm"):
            return None
        rule = _RULES.get(leaf)
        if rule is None:
            raise KeyError(f"no initialisation rule for parameter {name}")
        scale = 1 / math.sqrt(2 * self.args.n_layers) if rule == "residual" else 1.0
        return self.args.init_std * scale

    def read(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Values [start, stop) of the flattened initial tensor `name` (float32, CPU)."""
        numel = math.prod(shape)
        assert 0 <= start <= stop <= numel, (name, shape, start, stop)
        out = torch.empty(stop - start, dtype=torch.float32, device="cpu")
        std = self.std(name)
        if std is None:
            return out.fill_(0.0 if name.endswith(".bias") else 1.0)
        for block in range(start // BLOCK, -(-stop // BLOCK)):
            lo, hi = block * BLOCK, min((block + 1) * BLOCK, numel)
            # the whole block is generated (the values of a normal_ call depend on its length), then cut
            g = torch.Generator().manual_seed(self._block_seed(name, block))
            values = torch.empty(hi - lo, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=g)
            a, b = max(lo, start), min(hi, stop)
            out[a - start : b - start] = values[a - lo : b - lo]
        return out

    def _block_seed(self, name: str, block: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{name}:{block}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

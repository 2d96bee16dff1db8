"""A compiled decode step: the one-token step of `Transformer.decode` at fixed shapes, for GPUs.

Applied from outside the model, as torchtitan applies compile: `CompiledDecode(model)` offers the
model's `setup_cache` / `decode` pair, and the sampler calls it in the model's place
(`interleaf.load(DIR, compile=True)`, `--compile`). A GPU decode step of a small batch does little
arithmetic per kernel; eager PyTorch spends it launching ~30 kernels per layer and running the
Python around them. Compiled with `mode="reduce-overhead"` the step is a CUDA graph: one launch.

One graph serves every step because no shape changes between steps:

  * the cache is allocated at a bucket of rows and slots (powers of two: few distinct graphs
    across generations) and kept for the next generation of that bucket, at the same addresses,
    so that CUDA graphs replay in place;
  * lengths and token counts stay tensors on the device (no host read inside the step, no
    Python int that would specialise the graph), and attention reads the whole cache under a
    mask (`Transformer._cache_mask`'s compiled branch) instead of the prefix in use;
  * `dynamic=False`: a new bucket is a new graph, never a dynamic one.

Calls of another shape run eager: the prompt prefill, the guidance contexts fed at `<boi>`, several
tokens per row (parallel image decoding). So does everything around the step (logits, sampling,
events). On CPU the step compiles with inductor's default mode; it is there so that tests can
compare it with eager, not for speed (bench/RESULTS.md, "Compiled decode step").
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from torch.utils._triton import has_triton

from interleaf.errors import InterleafError
from interleaf.model.cache import KVCache

MIN_BUCKET = 256  # cache slots of the smallest bucket


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= n (and >= smallest)."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def check_compile(device: torch.device, backend: str = "inductor") -> None:
    """Raise InterleafError, in one line, when the decode step cannot be compiled for `device`."""
    if device.type not in ("cpu", "cuda"):
        raise InterleafError(f"compile: the compiled decode step runs on cpu or cuda, not {device.type}")
    if not torch._dynamo.is_dynamo_supported():
        raise InterleafError(f"compile: torch.compile does not support this Python ({sys.version.split()[0]})")
    if backend != "inductor":
        return
    if device.type == "cuda":
        if not has_triton():
            raise InterleafError("compile: torch.compile on CUDA needs triton, which is not installed")
    else:
        cxx = os.environ.get("CXX", "g++")  # what inductor compiles CPU kernels with
        if shutil.which(cxx) is None:
            raise InterleafError(f"compile: torch.compile on CPU needs a C++ compiler; {cxx!r} is not found (set CXX)")


def _decode_one(model, tokens: torch.Tensor, cache: KVCache, n_new: torch.Tensor) -> torch.Tensor:
    """One token per row (rows with n_new 0 take none) -> the logits after it (B, V)."""
    return model.decode(tokens, cache, n_new, last_only=True)


class CompiledDecode:
    """`model.decode` whose one-token steps (last logits only) run as one compiled graph.

    `calls` counts the steps the compiled graph ran. `backend` is torch.compile's (tests may
    choose another); the mode is "reduce-overhead" (CUDA graphs) on CUDA, the default elsewhere.
    """

    def __init__(self, model, backend: str = "inductor"):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        check_compile(self.device, backend)
        self.backend = backend
        mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        self.step = torch.compile(_decode_one, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.cache: KVCache | None = None  # the last cache, kept for the next generation of its bucket
        self.calls = 0

    def setup_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache of at least `batch_size` rows and `max_len` slots, both rounded up to their
        bucket (slots capped at the model's context); the kept one when the bucket is the same."""
        rows = bucket(batch_size)
        slots = min(bucket(max_len, MIN_BUCKET), max(max_len, self.model.args.max_seq_len))
        if self.cache is not None and (self.cache.batch_size, self.cache.max_len) == (rows, slots) and self._free():
            self.cache.reset()  # what the slots still hold is never attended to: the mask stops at each length
            return self.cache
        self.cache = None  # the kept one's memory is free (unless a generation holds it) before the new one
        self.cache = cache = self.model.setup_cache(rows, slots)
        for t in (cache.k_store, cache.v_store, cache.lengths):  # same addresses every step: graphs replay in place
            torch._dynamo.mark_static_address(t)
        return cache

    def _free(self) -> bool:
        """Whether no generation holds the kept cache (two streams of one pipeline, interleaved, each get
        their own): only `self.cache` and getrefcount's argument refer to it."""
        return sys.getrefcount(self.cache) <= 2

    def decode(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        n_new: torch.Tensor | None = None,
        last_only: bool = False,
        last_n: int = 0,
    ) -> torch.Tensor:
        """`Transformer.decode`: one token per row with last_only through the compiled graph, the rest
        (prefill, several tokens per row such as a parallel image window) eager."""
        if tokens.shape[1] != 1 or not last_only or n_new is None:
            return self.model.decode(tokens, cache, n_new, last_only, last_n=last_n)
        self.calls += 1
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        # a graph's output lives in memory the next replay overwrites: the caller gets its own copy
        return self.step(self.model, tokens, cache, n_new).clone()

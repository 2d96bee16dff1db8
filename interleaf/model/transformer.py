"""Decoder-only transformer over the shared vocabulary (Llama names, Chameleon stability recipe).

RoPE rotates interleaved pairs (x[2i], x[2i+1]) as Meta's Llama/Chameleon code does; Hugging
Face checkpoints rotate halves instead, and `convert.py` permutes q/k weights between the two.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.attention import (
    AttentionMask,
    attend,
    build_cache_mask,
    build_mask,
    document_positions,
    resolve_backend,
)
from interleaf.model.cache import KVCache
from interleaf.model.init import RandomInit
from interleaf.model.loss import LossOutput, chunked_linear_cross_entropy
from interleaf.model.ops import RopeTable, apply_rope, rms_norm, rope_angles, swiglu


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # statistics in float32 for half precisions


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with its own weight and bias per head (Chameleon's QK-norm)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, hd)
        # (GroupNorm with a group per head computes the same in one call, but is 2x slower on CPU)
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:], None, None, self.eps), self.weight)


def qk_norm(args: ModelArgs, n_heads: int) -> nn.Module:
    """The normalisation applied to queries or keys per head, before RoPE."""
    if args.qk_norm == "layernorm":
        return HeadLayerNorm(n_heads, args.head_dim, args.qk_norm_eps)
    if args.qk_norm == "rms":
        return RMSNorm(args.head_dim, args.qk_norm_eps)
    return nn.Identity()


# With autograd, from this many tokens per call, q/k/v (and w1/w3) run as one matmul over
# concatenated weights, except on CPU unless FUSE_ON_CPU: there the separate products make a
# training step 1.5-2.7% faster (bench/RESULTS.md, "Training step"): the concatenation, its
# gradient's split and the strided q/k/v slices cost more than the one larger matmul saves.
FUSE_MIN_TOKENS = 64
FUSE_ON_CPU = False
# Without autograd, concatenated weights up to this size are kept between calls (so decoding
# steps run one matmul for q/k/v and one for w1/w3); larger ones are not worth the memory.
FUSED_CACHE_MAX_BYTES = 32 * 2**20
# Decoding on CPU, F.linear of a few rows reads its weight at a third to a half of the memory
# bandwidth: MKL runs it on one thread, and reads an (out, in) weight with more outputs than
# inputs slowly. So with several threads, products of up to SPLIT_MAX_ROWS rows run as one batched
# matmul over slices of the inputs, one slice per thread, summed; with one thread, products of up
# to MATVEC_MAX_ROWS rows by a weight with more outputs than inputs read it stored transposed,
# (in, out). Such weights are kept a second time, transposed. A decode step's products run about
# 2x faster with 2 threads, 1.4x with one (bench/RESULTS.md, "Decoding"); F.linear is as fast
# at 32 rows, and from 4 rows with one thread. float32 only: CPU bmm in half precision is slow.
SPLIT_MAX_ROWS = 16
MATVEC_MAX_ROWS = 3


class FusedWeight:
    """The concatenation of some parameters along dim 0, kept for inference until one changes.

    A parameter changes by an in-place op (its version counter moves) or by new data (its pointer
    moves); the old tensors are held so that new data cannot reuse their address unnoticed.
    Writes through `p.data` move neither: after such a write, run the next pass with autograd on
    or reload the model. `linear` also keeps the transposed layout, (in, out), once a product on
    CPU wants it. Parameters a wrapper manages (ZeRO-3 partitions: `ds_id`) are never kept.
    """

    def __init__(self):
        self.key, self.value, self.value_t, self.sources = None, None, None, ()
        self.split = None  # value_t viewed as (ways, in / ways, out)

    def __call__(self, *params: torch.Tensor) -> torch.Tensor | None:
        """The concatenated weight; None when it would be larger than FUSED_CACHE_MAX_BYTES, or a
        parameter is not a whole 2-D tensor of its own."""
        key = [(p.data_ptr(), p._version) for p in params]
        if key != self.key:
            if sum(p.numel() * p.element_size() for p in params) > FUSED_CACHE_MAX_BYTES:
                return None
            if any(p.dim() != 2 or not p.numel() or hasattr(p, "ds_id") for p in params):
                return None
            self.sources = tuple(p.detach() for p in params)
            self.value = self.sources[0] if len(params) == 1 else torch.cat(self.sources)
            self.value_t, self.split, self.key = None, None, key
        return self.value

    def clear(self) -> None:
        """Forget the kept weight (its parameters were written in a way it cannot see)."""
        self.key, self.value, self.value_t, self.sources, self.split = None, None, None, (), None

    def linear(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor | None:
        """F.linear(x, cat(params)) from the kept weight (None when it is too large to keep)."""
        w = self(*params)
        if w is None:
            return None
        rows, (n_out, n_in), k = x.numel() // x.shape[-1], w.shape, torch.get_num_threads()
        split = rows <= SPLIT_MAX_ROWS if k > 1 else rows <= MATVEC_MAX_ROWS and n_out > n_in
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or not split or n_in % k:
            return F.linear(x, w)
        if self.split is None or self.split.shape[0] != k:
            if self.value_t is None:
                self.value_t = w.t().contiguous()
            self.split = self.value_t.view(k, n_in // k, n_out)
        xs = x.reshape(k, 1, n_in // k) if rows == 1 else x.reshape(rows, k, n_in // k).transpose(0, 1)
        y = torch.bmm(xs, self.split)  # (k, rows, out)
        return (y[0] if k == 1 else y.sum(0)).view(*x.shape[:-1], n_out)

    def apply(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """linear(x), through the kept weight when that computes the same: a plain nn.Linear
        without bias or hooks (a wrapped, quantised or hooked module runs its own forward)."""
        plain = type(linear) is nn.Linear and linear.bias is None
        y = (
            self.linear(x, linear.weight)
            if plain and not (linear._forward_hooks or linear._forward_pre_hooks)
            else None
        )
        return linear(x) if y is None else y


def forget_kept_weights(model: nn.Module) -> None:
    """Clear every FusedWeight of `model`: after its parameters were written through `.data` (as
    DeepSpeed's ZeRO-1/2 optimizer step writes them), before a pass without autograd."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, FusedWeight):
                value.clear()


def _fused_projections(x: torch.Tensor) -> bool:
    """Whether a pass with autograd runs q/k/v and w1/w3 as one matmul each (see FUSE_MIN_TOKENS)."""
    return x.shape[0] * x.shape[1] >= FUSE_MIN_TOKENS and (FUSE_ON_CPU or x.device.type != "cpu")


def _plain(module: nn.Module, x: torch.Tensor) -> bool:
    """Inference fast paths apply: autograd records nothing here and no compiler is tracing."""
    if _compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in module.parameters())


class Attention(nn.Module):
    """Multi-head attention with GQA, QK-norm and RoPE; writes to a KVCache when given one."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.dropout = args.dropout
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = qk_norm(args, args.n_heads)
        self.k_norm = qk_norm(args, args.n_kv_heads)
        self._wqkv, self._wo = FusedWeight(), FusedWeight()
        self._qk_weight, self._qk_bias = FusedWeight(), FusedWeight()

    def project(self, x: torch.Tensor):
        """q (B, T, H, hd), k and v (B, T, Hkv, hd); one matmul when `_fused_projections`."""
        B, T, _ = x.shape
        if _fused_projections(x):
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            q, k, v = F.linear(x, w).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], -1)
        else:  # few tokens, or CPU: concatenating the weights would cost more than it saves
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        hkv = (B, T, self.n_kv_heads, self.head_dim)
        return q.view(B, T, self.n_heads, self.head_dim), k.view(hkv), v.view(hkv)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, slots=None):
        """sin None: cos is the complex rotation (see apply_rope)."""
        B, T, _ = x.shape
        plain = _plain(self, x)
        qkv = self._project_plain(x, cos, sin) if plain else None
        if qkv is not None:
            q, k, v = qkv
        else:
            q, k, v = self.project(x)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, slots, k, v)  # (B, S + 1, Hkv, hd)
            k, v = k[:, : mask.n_keys], v[:, : mask.n_keys]  # the prefix of slots in use
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0).reshape(B, T, -1)  # (B, T, H hd)
        return self._wo.apply(out, self.wo) if plain else self.wo(out)

    def _project_plain(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Inference: one matmul for q/k/v, then QK-norm and RoPE of queries and keys together.

        The same formulas as `project` + norms + `apply_rope`, for queries and keys at once.
        None when the concatenated weights are too large to keep.
        """
        qkv = self._wqkv.linear(x, self.wq.weight, self.wk.weight, self.wv.weight)  # (B, T, (H + 2 Hkv) hd)
        if qkv is None:
            return None
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        heads = qkv.unflatten(-1, (H + 2 * Hkv, hd))
        qk, v = heads[:, :, : H + Hkv], heads[:, :, H + Hkv :]  # (B, T, H + Hkv, hd), (B, T, Hkv, hd)
        qk = apply_rope(self._qk_norm_plain(qk), cos, sin)
        return qk[:, :, :H], qk[:, :, H:], v

    def _qk_norm_plain(self, qk: torch.Tensor) -> torch.Tensor:
        """QK-norm of queries and keys at once, (B, T, H + Hkv, hd)."""
        qn, kn = self.q_norm, self.k_norm
        if isinstance(qn, HeadLayerNorm):
            weight = self._qk_weight(qn.weight, kn.weight)  # (H + Hkv, hd)
            bias = self._qk_bias(qn.bias, kn.bias)
            return torch.addcmul(bias, F.layer_norm(qk, qk.shape[-1:], None, None, qn.eps), weight)
        if isinstance(qn, RMSNorm):
            H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
            weight = self._qk_weight(qn.weight.expand(H, hd), kn.weight.expand(Hkv, hd))  # (H + Hkv, hd)
            return rms_norm(qk, weight, qn.eps)
        return qk


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self._w13, self._w2 = FusedWeight(), FusedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._w13.linear(x, self.w1.weight, self.w3.weight) if _plain(self, x) else None
        if h is not None:  # inference: kept [w1; w3], silu(a) * b without autograd
            return self._w2.apply(swiglu(h), self.w2)
        if _fused_projections(x):  # one matmul for [w1; w3], gradient written in place
            return self.w2(swiglu(F.linear(x, torch.cat([self.w1.weight, self.w3.weight]))))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Attention and feed-forward, each as a residual branch; pre-norm or Chameleon's swin order."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.swin = args.norm_order == "swin"
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.drop = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, slots=None):
        if _plain(self, x) and self._unhooked():  # inference: the parts' forward functions, no module calls
            attn, ffn = self.attention.forward, self.feed_forward.forward
            n1, n2, drop = self.attention_norm.forward, self.ffn_norm.forward, self.drop.forward
        else:
            attn, ffn, n1, n2, drop = self.attention, self.feed_forward, self.attention_norm, self.ffn_norm, self.drop
        if self.swin:  # h = x + norm(attn(x)); out = h + norm(ffn(h))
            h = x + drop(n1(attn(x, cos, sin, mask, cache, slots)))
            return h + drop(n2(ffn(h)))
        h = x + drop(attn(n1(x), cos, sin, mask, cache, slots))
        return h + drop(ffn(n2(h)))

    def _unhooked(self) -> bool:
        """No forward hooks on the parts, their own or global ones: calling their forward is the same."""
        hooks = torch.nn.modules.module
        if getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.children())


class OutputHead(nn.Linear):
    """The vocabulary projection; given targets it returns the chunked loss instead of logits.

    The loss goes through this module's forward so that wrappers which gather parameters in
    forward hooks (ZeRO-3) see the weight being used.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept = FusedWeight()

    def forward(self, h, targets=None, weights=None, is_image=None, z_coef: float = 0.0, chunk: int = 1024):
        if targets is None:
            logits = self._kept.linear(h, self.weight) if _plain(self, h) else None
            return super().forward(h) if logits is None else logits
        return chunked_linear_cross_entropy(h, self.weight, targets, weights, is_image, z_coef, chunk)


_BACKENDS: dict[tuple[str, str], str] = {}


def _backend(name: str, device: str) -> str:
    """resolve_backend, remembered per device (a plain dict: compilers trace through it without a break)."""
    key = (name, device)
    if key not in _BACKENDS:
        _BACKENDS[key] = resolve_backend(name, device)
    return _BACKENDS[key]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Transformer(nn.Module):
    """Token embedding, `n_layers` blocks, final RMSNorm, output head.

    This __init__ may run on the meta device (`with torch.device("meta")`); weights are then
    loaded with `load_state_dict(..., assign=True)`. Nothing here holds buffers.
    """

    def __init__(self, args: ModelArgs, seed: int | None = None):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = OutputHead(args.dim, args.vocab_size, bias=False)
        self._rope = RopeTable(args.head_dim, args.rope_theta)  # filled on first use, not a buffer
        self.tie_weights()
        self.init_weights(seed)

    def tie_weights(self) -> None:
        """With tie_embeddings, make the output head use the embedding table (again, after assign-loading)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int | None = None) -> None:
        """The initial weights of `RandomInit(args, seed)` (model/init.py: normal(0, init_std), wo and w2
        scaled by 1/sqrt(2 n_layers), norms to identity); seed None draws one from torch's global RNG.
        Parameters on the meta device are left alone."""
        params = [(name, p) for name, p in self.named_parameters() if not p.is_meta]
        if not params:
            return
        values = RandomInit(self.args, int(torch.randint(2**62, ())) if seed is None else seed)
        with torch.no_grad():
            for name, p in params:  # one tensor at a time; a ZeRO-3 placeholder has no values to write
                p.copy_(values.read(name, tuple(p.shape), 0, p.numel()).view(p.shape))

    # ---- checks ---------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor, max_len: int | None = None, what: str = "max_seq_len") -> None:
        """Clear errors for wrong shapes, dtypes, lengths and ids (reads back ids: skipped when compiling)."""
        if tokens.dim() != 2:
            raise InterleafError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InterleafError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        limit = self.args.max_seq_len if max_len is None else max_len
        if tokens.shape[1] > limit:
            raise InterleafError(f"sequence of {tokens.shape[1]} tokens is longer than {what}={limit}")
        if tokens.numel() and not _compiling():
            lo, hi = torch.aminmax(tokens)
            if int(lo) < 0 or int(hi) >= self.args.vocab_size:
                bad = int(lo) if int(lo) < 0 else int(hi)
                raise InterleafError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size})")

    def backend(self, device: torch.device) -> str:
        """The attention backend this model uses on `device` (resolves 'auto')."""
        return _backend(self.args.attention, str(torch.device(device)))

    # ---- training / scoring -----------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, D) final-norm hidden states (packed documents when doc_ids given)."""
        self._check_tokens(tokens)
        B, T = tokens.shape
        if doc_ids is not None and doc_ids.shape != tokens.shape:
            raise InterleafError(f"doc_ids shape {tuple(doc_ids.shape)} differs from tokens shape {(B, T)}")
        if doc_ids is None:
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T)
        else:
            positions = document_positions(doc_ids)  # (B, T)
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        mask = build_mask(self.backend(tokens.device), doc_ids, T)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)

    def forward(self, tokens, doc_ids=None, targets=None, weights=None, is_image=None):
        """Logits (B, T, V) in float32 or wider; with `targets`, the LossOutput of `loss`."""
        h = self.hidden(tokens, doc_ids)
        if targets is None:
            logits = self.output(h)
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        if targets.shape != tokens.shape:
            raise InterleafError(
                f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}"
            )
        return self.output(h, targets, weights, is_image, self.args.z_loss, self.args.loss_chunk)

    def loss(self, tokens, targets, weights=None, doc_ids=None, is_image=None) -> LossOutput:
        """Weighted CE (targets == -100 ignored) + z-loss, chunked over tokens; parts for logging."""
        return self(tokens, doc_ids, targets=targets, weights=weights, is_image=is_image)

    # ---- decoding ----------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache on this model's device (right padding never needs extra room)."""
        if batch_size <= 0 or max_len <= 0:
            raise InterleafError(f"a KV cache needs positive batch_size and max_len, got {batch_size}, {max_len}")
        p = self.tok_embeddings.weight
        a = self.args
        return KVCache(a.n_layers, batch_size, max_len, a.n_kv_heads, a.head_dim, dtype or p.dtype, p.device)

    def decode(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        n_new: torch.Tensor | None = None,
        last_only: bool = False,
        max_len_hint: int | None = None,
        last_n: int = 0,
    ) -> torch.Tensor:
        """Append tokens (B, T) to the cache (row b: first n_new[b] count) -> logits (B, T, V).

        `last_only=True` returns (B, V): the logits of each row's last new token. `last_n=m` returns
        (B, m, V): those of each row's last m new tokens (a row with fewer repeats its first).
        `max_len_hint`, an upper bound of every row's length after this call known on the host,
        lets a compiled step attend to that prefix of the cache only (eager mode reads the
        lengths itself; without either, a compiled step attends to the whole cache).
        """
        B, T = tokens.shape[0], tokens.shape[-1]
        self._check_tokens(tokens, cache.max_len, "the cache's max_len")
        if B != cache.batch_size:
            raise InterleafError(f"decode got {B} rows for a cache of {cache.batch_size}")
        counts = None if n_new is None else n_new
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        mask = self._cache_mask(tokens.device, cache, T, counts, positions, max_len_hint)
        slots = cache.write_index(T, n_new, positions)  # (B * T,)
        if _compiling():  # real angles: compilers handle them better than complex tensors
            cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        else:  # the rotation cos + i sin gathered from a table (apply_rope: sin None)
            cos, sin = self._rope(positions, max(self.args.max_seq_len, cache.max_len + T)), None
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, slots)
        cache.lengths += n_new
        if last_only:  # (B, D): each row's last new token
            h = h[:, 0] if T == 1 else h[torch.arange(B, device=h.device), (n_new - 1).clamp(min=0)]
        elif last_n:  # (B, m, D): each row's last m new tokens
            idx = (n_new[:, None] - last_n + torch.arange(last_n, device=h.device)).clamp(min=0)  # (B, m)
            h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.output(self.norm(h))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _cache_mask(
        self,
        device,
        cache: KVCache,
        T: int,
        n_new: torch.Tensor | None,
        positions: torch.Tensor,
        max_len_hint: int | None,
    ) -> AttentionMask:
        """The decode step's mask; in eager mode also the room check and the prefix of slots in use."""
        backend = self.backend(device)
        if _compiling():  # SDPA: xformers' padded-keys mask is built from host lists, which a graph cannot hold
            n_keys = None if max_len_hint is None else max(1, min(max_len_hint, cache.max_len))
            return build_cache_mask("sdpa", cache.lengths, T, cache.max_len, n_keys, positions)
        # one read of lengths and counts to the host (the only sync of the step)
        if n_new is None:
            lengths, counts = cache.lengths.tolist(), [T] * cache.batch_size
        else:
            lengths, counts = torch.stack([cache.lengths, n_new.to(cache.lengths)]).tolist()
        after = [a + c for a, c in zip(lengths, counts)]
        cache.check_room_host(after)
        n_keys = max(1, max(after))
        uniform = all(a == lengths[0] for a in lengths) and all(c == T for c in counts)
        shape = "all" if uniform and T == 1 else "causal" if uniform and lengths[0] == 0 else "dense"
        return build_cache_mask(backend, cache.lengths, T, cache.max_len, n_keys, positions, shape)

    # ---- weights -----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, args: ModelArgs, tensors: Mapping[str, torch.Tensor], source: str = "weights"):
        """The Transformer holding exactly `tensors` (no copy: built on the meta device, then assigned).

        `tensors` has the names and shapes of `expected_shapes(args)`; with tied embeddings an
        `output.weight` may come along if it equals `tok_embeddings.weight` (a consolidated
        training state holds both). The first wrong tensor is an InterleafError naming `source`.
        """
        state = dict(tensors)
        if args.tie_embeddings and "output.weight" in state:
            if not torch.equal(state.pop("output.weight"), state.get("tok_embeddings.weight", torch.empty(0))):
                raise InterleafError(
                    f"{source}: output.weight differs from tok_embeddings.weight in a model with tied embeddings"
                )
        check_state_dict(state, args, source)
        if args.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()  # assign=True replaced the shared parameter with two
        return model


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a Transformer(args) stores; a tied output weight is stored once
    (as `tok_embeddings.weight`)."""
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    if args.tie_embeddings:
        state.pop("output.weight")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_state_dict(state: Mapping[str, torch.Tensor], args: ModelArgs, source: str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor for a Transformer(args)."""
    check_tensors(state, expected_shapes(args), source)


def check_tensors(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str, config: str = "model.yaml"
) -> None:
    """Raise naming the first tensor of `state` missing from, not in, or shaped unlike `expected`
    (what `config` implies)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InterleafError(f"{source}: missing tensor {missing[0]}{more}")
    if unexpected:
        raise InterleafError(f"{source}: unexpected tensor {unexpected[0]} (not in a model with this {config})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise InterleafError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, {config} implies {shape}")

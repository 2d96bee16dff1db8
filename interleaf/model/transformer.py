"""Decoder-only transformer over the shared vocabulary (Llama names, Chameleon stability recipe).

RoPE rotates interleaved pairs (x[2i], x[2i+1]) as Meta's Llama/Chameleon code does; Hugging
Face checkpoints rotate halves instead, and `convert.py` permutes q/k weights between the two.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.attention import (
    AttentionMask, attend, build_cache_mask, build_mask, document_positions, resolve_backend,
)
from interleaf.model.cache import KVCache
from interleaf.model.loss import LossOutput, chunked_linear_cross_entropy
from interleaf.model.ops import apply_rope, rms_norm, rope_angles, swiglu


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


# Above this many tokens per call, q/k/v (and w1/w3) run as one matmul over concatenated weights.
FUSE_MIN_TOKENS = 64


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

    def project(self, x: torch.Tensor):
        """q (B, T, H, hd), k and v (B, T, Hkv, hd); one fused matmul when there are many tokens."""
        B, T, _ = x.shape
        if B * T >= FUSE_MIN_TOKENS:
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            q, k, v = F.linear(x, w).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], -1)
        else:  # decoding: concatenating the weights would cost more than the matmuls
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        hkv = (B, T, self.n_kv_heads, self.head_dim)
        return q.view(B, T, self.n_heads, self.head_dim), k.view(hkv), v.view(hkv)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, slots=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, slots, k, v)  # (B, S + 1, Hkv, hd)
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if B * T >= FUSE_MIN_TOKENS:  # one matmul for [w1; w3], gradient written in place
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
        if self.swin:  # h = x + norm(attn(x)); out = h + norm(ffn(h))
            h = x + self.drop(self.attention_norm(self.attention(x, cos, sin, mask, cache, slots)))
            return h + self.drop(self.ffn_norm(self.feed_forward(h)))
        h = x + self.drop(self.attention(self.attention_norm(x), cos, sin, mask, cache, slots))
        return h + self.drop(self.feed_forward(self.ffn_norm(h)))


class OutputHead(nn.Linear):
    """The vocabulary projection; given targets it returns the chunked loss instead of logits.

    The loss goes through this module's forward so that wrappers which gather parameters in
    forward hooks (ZeRO-3) see the weight being used.
    """

    def forward(self, h, targets=None, weights=None, is_image=None, z_coef: float = 0.0, chunk: int = 1024):
        if targets is None:
            return super().forward(h)
        return chunked_linear_cross_entropy(h, self.weight, targets, weights, is_image, z_coef, chunk)


@functools.lru_cache(maxsize=None)
def _backend(name: str, device_type: str) -> str:
    return resolve_backend(name, device_type)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Transformer(nn.Module):
    """Token embedding, `n_layers` blocks, final RMSNorm, output head.

    This __init__ may run on the meta device (`with torch.device("meta")`); weights are then
    loaded with `load_state_dict(..., assign=True)`. Nothing here holds buffers.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = OutputHead(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With tie_embeddings, make the output head use the embedding table (again, after assign-loading)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self) -> None:
        """Normal(0, init_std) weights; wo and w2 scaled by 1/sqrt(2 n_layers); norms to identity."""
        std = self.args.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(lin.weight, std=std)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.args.n_layers))
        for m in self.modules():
            if isinstance(m, (RMSNorm, HeadLayerNorm)):
                nn.init.ones_(m.weight)
            if isinstance(m, HeadLayerNorm):
                nn.init.zeros_(m.bias)

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
        return _backend(self.args.attention, torch.device(device).type)

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
            raise InterleafError(f"targets shape {tuple(targets.shape)} differs from tokens shape {tuple(tokens.shape)}")
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

    def decode(self, tokens: torch.Tensor, cache: KVCache, n_new: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Append tokens (B, T) to the cache (row b: first n_new[b] count) -> logits (B, T, V).

        `last_only=True` returns (B, V): the logits of each row's last new token.
        """
        B, T = tokens.shape[0], tokens.shape[-1]
        self._check_tokens(tokens, cache.max_len, "the cache's max_len")
        if B != cache.batch_size:
            raise InterleafError(f"decode got {B} rows for a cache of {cache.batch_size}")
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        if not _compiling():
            cache.check_room(n_new)
        positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        slots = cache.write_positions(T, n_new)
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        mask = build_cache_mask(self.backend(tokens.device), cache.lengths, T, cache.max_len)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, slots)
        cache.lengths += n_new
        h = self.norm(h)
        if last_only:
            h = h[torch.arange(B, device=h.device), (n_new - 1).clamp(min=0)]  # (B, D)
        logits = self.output(h)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

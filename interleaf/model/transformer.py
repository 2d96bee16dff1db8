"""Decoder-only transformer over the shared vocabulary (Llama names, Chameleon stability recipe).

RoPE rotates interleaved pairs (x[2i], x[2i+1]) as Meta's Llama/Chameleon code does; Hugging
Face checkpoints rotate halves instead, and `convert.py` permutes q/k weights between the two.

This is the reference: one way through each op. Faster ways of computing the same (kept weight
layouts for decoding on CPU, concatenated projections for training on accelerators) are applied
from outside, by `model/fast.py`, which the sampler and the training engine call.
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
from interleaf.model.ops import RopeTable, apply_rope, rms_norm, rope_angles


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # statistics in float32 for half precisions


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of x (B, T, H, hd) over hd, then an affine map of its own per head: weight, bias (H, hd)."""
    # (GroupNorm with a group per head computes the same in one call, but is 2x slower on CPU)
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], None, None, eps), weight)


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with its own weight and bias per head (Chameleon's QK-norm)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, hd)
        return head_layer_norm(x, self.weight, self.bias, self.eps)


def qk_norm(args: ModelArgs, n_heads: int) -> nn.Module:
    """The normalisation applied to queries or keys per head, before RoPE."""
    if args.qk_norm == "layernorm":
        return HeadLayerNorm(n_heads, args.head_dim, args.qk_norm_eps)
    if args.qk_norm == "rms":
        return RMSNorm(args.head_dim, args.qk_norm_eps)
    return nn.Identity()


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

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, slots=None):
        """x (B, T, D) -> (B, T, D). sin None: cos is the complex rotation (see apply_rope)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, slots, k, v)  # (B, S + 1, Hkv, hd)
            k, v = k[:, : mask.n_keys], v[:, : mask.n_keys]  # the prefix of slots in use
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, -1))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None):
        """q (B, T, H, hd), k and v (B, T, Hkv, hd); queries and keys normalised (QK-norm), then rotated."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin), v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        last_n: int = 0,
    ) -> torch.Tensor:
        """Append tokens (B, T) to the cache (row b: first n_new[b] count) -> logits (B, T, V).

        `last_only=True` returns (B, V): the logits of each row's last new token. `last_n=m` returns
        (B, m, V): those of each row's last m new tokens (a row with fewer repeats its first).
        Eager mode attends to the prefix of the cache in use (it reads the lengths); a compiled step,
        which cannot, to the whole cache under a mask.
        """
        B, T = tokens.shape[0], tokens.shape[-1]
        self._check_tokens(tokens, cache.max_len, "the cache's max_len")
        if B != cache.batch_size:
            raise InterleafError(f"decode got {B} rows for a cache of {cache.batch_size}")
        counts = None if n_new is None else n_new
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        mask = self._cache_mask(tokens.device, cache, T, counts, positions)
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
        self, device, cache: KVCache, T: int, n_new: torch.Tensor | None, positions: torch.Tensor
    ) -> AttentionMask:
        """The decode step's mask; in eager mode also the room check and the prefix of slots in use."""
        backend = self.backend(device)
        if _compiling():  # SDPA: xformers' padded-keys mask is built from host lists, which a graph cannot hold
            return build_cache_mask("sdpa", cache.lengths, T, cache.max_len, None, positions)
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

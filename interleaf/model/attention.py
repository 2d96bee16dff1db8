"""Attention backends and their masks: PyTorch SDPA (portable) and xformers (CUDA).

Both backends compute the same function. A mask is built once per forward pass from the
document ids (packed rows) or the cache lengths (decoding) and handed to every layer:

    plain causal          sdpa: is_causal=True            xformers: LowerTriangularMask
    packed documents      sdpa: bool (B, 1, T, T)         xformers: BlockDiagonalCausalMask
    decoding with cache   sdpa: bool (B, 1, T, S)         xformers: BlockDiagonalCausalWithOffsetPaddedKeysMask

q, k, v arrive in the token-major layout (B, T, H, hd) that the projections produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interleaf.errors import ConfigError

BACKENDS = ("auto", "sdpa", "xformers")


def xformers_available() -> bool:
    """True when xformers' memory-efficient attention can be imported."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' -> 'xformers' on CUDA when installed, else 'sdpa'; check explicit choices."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if is_cuda and xformers_available() else "sdpa"
    if name == "xformers":
        if not is_cuda:
            raise ConfigError("attention backend 'xformers' needs a CUDA device; use 'sdpa' or 'auto'")
        if not xformers_available():
            raise ConfigError("attention backend 'xformers' is not installed (pip install xformers)")
    return name


# ---- documents ---------------------------------------------------------------------------------
def segment_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) running segment index (a new one wherever the id changes)."""
    change = torch.ones_like(doc_ids, dtype=torch.long)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(1)  # (B, T), starts at 1 in every row


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) position of each token inside its document."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.zeros_like(idx)
    starts[:, 1:] = torch.where(doc_ids[:, 1:] != doc_ids[:, :-1], idx[:, 1:], 0)
    return idx - starts.cummax(1).values  # (B, T)


def document_lengths(doc_ids: torch.Tensor) -> list[int]:
    """(B, T) document ids -> lengths of all documents, row after row (syncs with the device)."""
    seg = segment_ids(doc_ids)
    offset = torch.cumsum(seg[:, -1], 0) - seg[:, -1]  # (B,) segments before each row
    flat = (seg + offset[:, None]).flatten()
    return torch.bincount(flat)[1:].tolist()


def packed_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> bool (B, 1, T, T): True where query t may attend to key s."""
    seg = segment_ids(doc_ids)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (seg[:, :, None] == seg[:, None, :]).logical_and_(causal)[:, None]


def mask_from_lengths(lengths: list[int], total: int, device=None) -> torch.Tensor:
    """Dense bool (total, total) block-diagonal causal mask from document lengths (reference)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    if seg.numel() != total:
        raise ValueError(f"document lengths sum to {seg.numel()}, expected {total}")
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return (seg[:, None] == seg[None, :]) & causal


def cache_mask(positions: torch.Tensor, n_keys: int, max_len: int) -> torch.Tensor:
    """(B, T) absolute query positions -> bool (B, 1, T, n_keys): keys up to the query, not the scratch slot."""
    keys = torch.arange(n_keys, device=positions.device)
    return ((keys <= positions[:, :, None]) & (keys < max_len))[:, None]  # (B, 1, T, S)


# ---- masks handed to the layers -----------------------------------------------------------
@dataclass
class AttentionMask:
    """What every layer needs to attend: the backend and its mask object (None = plain causal)."""

    backend: str
    mask: Any = None
    flat: bool = False  # xformers block-diagonal masks: all rows as one (1, B*T) sequence
    n_keys: int | None = None  # decoding: attend to this prefix of the cache slots (None: all)
    causal: bool = True  # with mask None: causal (sdpa is_causal), or every query sees every key


def build_mask(backend: str, doc_ids: torch.Tensor | None, T: int) -> AttentionMask:
    """Mask for a forward pass over (B, T) tokens, packed when doc_ids is given."""
    if backend == "xformers":
        from xformers.ops import fmha

        if doc_ids is None:
            return AttentionMask(backend, fmha.attn_bias.LowerTriangularMask())
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(document_lengths(doc_ids))
        return AttentionMask(backend, bias, flat=True)
    return AttentionMask(backend, None if doc_ids is None else packed_causal_mask(doc_ids))


def build_cache_mask(backend: str, lengths: torch.Tensor, T: int, max_len: int, n_keys: int | None = None,
                     positions: torch.Tensor | None = None, shape: str = "dense") -> AttentionMask:
    """Mask for T new tokens per row appended after `lengths` (B,) cached ones.

    sdpa only: `n_keys` (>= every row's lengths + new tokens) limits attention to that prefix of
    the cache; `positions` is `lengths[:, None] + arange(T)` if the caller has it. `shape` says
    what the caller knows of the rows: "dense" (anything: a bool mask), "all" (one token per row,
    every row holding n_keys tokens after it: no mask) or "causal" (empty rows, T tokens each).
    """
    if backend == "xformers":
        from xformers.ops import fmha

        B = lengths.shape[0]
        kv_len = (lengths + T).clamp(max=max_len).tolist()  # syncs: xformers takes host lists
        bias = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[T] * B, kv_padding=max_len + 1, kv_seqlen=kv_len
        )
        return AttentionMask(backend, bias, flat=True)
    if shape != "dense" and n_keys is not None:
        return AttentionMask(backend, None, n_keys=n_keys, causal=shape == "causal")
    if positions is None:
        positions = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
    if n_keys is None or n_keys > max_len:
        return AttentionMask(backend, cache_mask(positions, max_len + 1, max_len))
    keys = torch.arange(n_keys, device=positions.device)  # all before the scratch slot
    return AttentionMask(backend, (keys <= positions[:, :, None])[:, None], n_keys=n_keys)  # (B, 1, T, n_keys)


# ---- kernels -------------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float = 0.0) -> torch.Tensor:
    """q (B, T, H, hd), k/v (B, S, Hkv, hd) -> (B, T, H, hd)."""
    if mask.backend == "xformers":
        return _attend_xformers(q, k, v, mask, dropout)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    gqa = q.shape[2] != k.shape[2]
    if mask.mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask.causal, dropout_p=dropout, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.mask, dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, T, H, hd)


def _attend_xformers(q, k, v, mask: AttentionMask, dropout: float) -> torch.Tensor:
    """xformers memory_efficient_attention; block-diagonal masks want one flat row of tokens."""
    from xformers.ops import memory_efficient_attention

    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    if Hkv != H:  # GQA as the 5-D (B, M, G, H/G, K) layout, keys broadcast inside each group
        q = q.view(B, T, Hkv, H // Hkv, hd)
        k = k[:, :, :, None].expand(-1, -1, -1, H // Hkv, -1)
        v = v[:, :, :, None].expand(-1, -1, -1, H // Hkv, -1)
    if mask.flat:
        q = q.reshape(1, B * T, *q.shape[2:])
        k = k.reshape(1, -1, *k.shape[2:])
        v = v.reshape(1, -1, *v.shape[2:])
    out = memory_efficient_attention(q, k, v, attn_bias=mask.mask, p=dropout)
    return out.reshape(B, T, H, hd)

"""Attention backends and their masks: PyTorch SDPA (portable) and xformers (CUDA).

Both backends compute the same function. A mask is built once per forward pass from the
document ids (packed rows) or the cache lengths (decoding) and handed to every layer:

    plain causal          sdpa: is_causal=True            xformers: LowerTriangularMask
    packed documents      sdpa: bool (B, 1, T, T)         xformers: BlockDiagonalCausalMask
    decoding with cache   sdpa: bool (B, 1, T, S)         xformers: BlockDiagonalCausalWithOffsetPaddedKeysMask

A decoding step that mask cannot serve (gradients on: no xformers kernel differentiates it; or
a row's padding past its slots) attends with SDPA. xformers' 5-D GQA layout is forward-only, so
GQA training passes give it every head's keys as copies.

q, k, v arrive in the token-major layout (B, T, H, hd) that the projections produce. On CPU, the
sdpa backend runs a training pass's causal attention as blocks of queries against their key
prefix (`blocked_attention`): the same function as PyTorch's kernel, faster to differentiate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interleaf.errors import ConfigError
from interleaf.utils import first_line

# xformers is optional (the `xformers` extra, CUDA): imported only where its backend runs

BACKENDS = ("auto", "sdpa", "xformers")


_XFORMERS_PROBES: dict[str, str | None] = {}


def _reason(e: BaseException) -> str:
    """One line of why xformers refused. Its dispatcher's message lists each kernel it tried
    ("`fa3F@...` is not supported because:") with the reasons below it: keep each one's first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    kernels = [
        f"{line.split('`')[1]}: {after}"
        for line, after in zip(lines, lines[1:])
        if line.endswith("is not supported because:") and line.count("`") >= 2
    ]
    return "; ".join(kernels) if kernels else first_line(e)


def xformers_problem(device: torch.device | str = "cuda") -> str | None:
    """Why xformers' memory-efficient attention cannot run on `device`, or None when it runs.

    Importing is not enough: a build with no kernel for this device, or one made for another
    torch or CUDA, may import with a warning and fail at its first call. So this runs one small
    packed causal pass, forward and backward (fp16: every CUDA kernel of xformers takes it),
    once per device, and waits for it to finish.
    """
    device = torch.device(device)
    if str(device) not in _XFORMERS_PROBES:
        try:
            from xformers.ops import fmha, memory_efficient_attention  # noqa: PLC0415
        except Exception as e:  # ImportError (also of a flash-attn version it refuses), a broken install
            _XFORMERS_PROBES[str(device)] = f"xformers cannot be imported ({type(e).__name__}: {first_line(e)})"
        else:
            try:
                dtype = torch.float16 if device.type == "cuda" else torch.float32
                q = torch.zeros(1, 16, 1, 64, device=device, dtype=dtype, requires_grad=True)
                bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([9, 7], device=device)
                memory_efficient_attention(q, q, q, attn_bias=bias).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                _XFORMERS_PROBES[str(device)] = None
            except Exception as e:  # no kernel for this device, or a build for another torch/CUDA
                _XFORMERS_PROBES[str(device)] = (
                    f"xformers is installed but its attention does not run on {device}: {_reason(e)}"
                )
    return _XFORMERS_PROBES[str(device)]


def xformers_available(device: torch.device | str = "cuda") -> bool:
    """True when xformers' memory-efficient attention runs on `device`."""
    return xformers_problem(device) is None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' -> 'xformers' on CUDA when it runs there, else 'sdpa'; check explicit choices."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if is_cuda and xformers_available(device) else "sdpa"
    if name == "xformers":
        if not is_cuda:
            raise ConfigError("attention backend 'xformers' needs a CUDA device; use 'sdpa' or 'auto'")
        problem = xformers_problem(device)
        if problem:
            raise ConfigError(f"attention backend 'xformers': {problem}; use 'sdpa' or 'auto'")
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
    packed: bool = False  # mask is `packed_causal_mask`: causal inside each document, (B, 1, T, T)


def build_mask(backend: str, doc_ids: torch.Tensor | None, T: int) -> AttentionMask:
    """Mask for a forward pass over (B, T) tokens, packed when doc_ids is given."""
    if backend == "xformers":
        from xformers.ops import fmha  # noqa: PLC0415

        if doc_ids is None:
            return AttentionMask(backend, fmha.attn_bias.LowerTriangularMask())
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(document_lengths(doc_ids), device=doc_ids.device)
        return AttentionMask(backend, bias, flat=True)
    if doc_ids is None:
        return AttentionMask(backend)
    return AttentionMask(backend, packed_causal_mask(doc_ids), packed=True)


def build_cache_mask(
    backend: str,
    lengths: torch.Tensor,
    T: int,
    max_len: int,
    n_keys: int | None = None,
    positions: torch.Tensor | None = None,
    shape: str = "dense",
) -> AttentionMask:
    """Mask for T new tokens per row appended after `lengths` (B,) cached ones.

    sdpa only: `n_keys` (>= every row's lengths + new tokens) limits attention to that prefix of
    the cache; `positions` is `lengths[:, None] + arange(T)` if the caller has it. `shape` says
    what the caller knows of the rows: "dense" (anything: a bool mask), "all" (one token per row,
    every row holding n_keys tokens after it: no mask) or "causal" (empty rows, T tokens each).
    """
    if backend == "xformers" and torch.is_grad_enabled():
        backend = "sdpa"  # no xformers kernel differentiates the padded-keys mask
    if backend == "xformers":
        from xformers.ops import fmha  # noqa: PLC0415

        # Query t of a row sees the keys up to kv_len - T + t (the mask is aligned bottom right), so
        # kv_len must be lengths + T exactly, padding tokens included, and fit the row's slots.
        kv_len = (lengths + T).tolist()  # syncs: xformers takes host lists
        if max(kv_len) <= max_len + 1:
            bias = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
                q_seqlen=[T] * len(kv_len), kv_padding=max_len + 1, kv_seqlen=kv_len, device=lengths.device
            )
            return AttentionMask(backend, bias, flat=True)
        backend = "sdpa"  # a row within T of full (its padding tokens overflow): this step attends with SDPA
    if shape != "dense" and n_keys is not None:
        return AttentionMask(backend, None, n_keys=n_keys, causal=shape == "causal")
    if positions is None:
        positions = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
    if n_keys is None or n_keys > max_len:
        return AttentionMask(backend, cache_mask(positions, max_len + 1, max_len))
    keys = torch.arange(n_keys, device=positions.device)  # all before the scratch slot
    return AttentionMask(backend, (keys <= positions[:, :, None])[:, None], n_keys=n_keys)  # (B, 1, T, n_keys)


# ---- kernels -------------------------------------------------------------------------------
def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, dropout: float = 0.0
) -> torch.Tensor:
    """q (B, T, H, hd), k/v (B, S, Hkv, hd) -> (B, T, H, hd)."""
    if mask.backend == "xformers":
        return _attend_xformers(q, k, v, mask, dropout)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    if _blocked_applies(qt, kt, vt, mask, dropout):
        return blocked_attention(qt, kt, vt, mask.mask).transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if mask.mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask.causal, dropout_p=dropout, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.mask, dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2)  # (B, T, H, hd)


def _attend_xformers(q, k, v, mask: AttentionMask, dropout: float) -> torch.Tensor:
    """xformers memory_efficient_attention; block-diagonal masks want one flat row of tokens."""
    from xformers.ops import memory_efficient_attention  # noqa: PLC0415

    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    if Hkv != H:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # xformers' 5-D GQA layout is forward-only: with gradients, every head's keys as a copy
            k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        else:  # the 5-D (B, M, G, H/G, K) layout: keys broadcast to the query heads of their group
            q = q.view(B, T, Hkv, H // Hkv, hd)
            k = k[:, :, :, None].expand(-1, -1, -1, H // Hkv, -1)
            v = v[:, :, :, None].expand(-1, -1, -1, H // Hkv, -1)
    if mask.flat:
        q = q.reshape(1, B * T, *q.shape[2:])
        k = k.reshape(1, -1, *k.shape[2:])
        v = v.reshape(1, -1, *v.shape[2:])
    out = memory_efficient_attention(q, k, v, attn_bias=mask.mask, p=dropout)
    return out.reshape(B, T, H, hd)


# ---- blocked causal attention (CPU training) ----------------------------------------------
# PyTorch's CPU flash kernel differentiates causal attention at about a third of the matmul rate.
# Cut into blocks of BLOCK_ROWS queries, each against its key prefix (two matmuls, a masked
# diagonal, one softmax), forward + backward run 1.2-1.6x faster on this project's 2-core box
# (bench/RESULTS.md, "Training step"). The blocks keep their probabilities for the backward
# pass, about B H T^2 / 2 numbers, so they run only while those fit in BLOCKED_MAX_BYTES (per
# layer: a training step keeps n_layers times that until its backward pass).
BLOCK_ROWS = 64
BLOCKED_MAX_BYTES = 64 * 2**20


def _blocked_applies(q, k, v, mask: AttentionMask, dropout: float) -> bool:
    """A CPU training pass over whole rows (no cache), plain causal or packed, that fits the budget."""
    B, H, T, _ = q.shape
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or dropout:
        return False
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    if torch.compiler.is_compiling() or k.shape[2] != T or H % k.shape[1] or mask.n_keys is not None:
        return False
    if not ((mask.mask is None and mask.causal) or (mask.packed and mask.mask.shape[-2:] == (T, T))):
        return False
    return B * H * T * (T + BLOCK_ROWS) // 2 * q.element_size() <= BLOCKED_MAX_BYTES


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal softmax attention, q (B, H, T, hd), k/v (B, Hkv, T, hd) -> (B, H, T, hd).

    `allowed` (B, 1, T, T) bool, when given, is the whole mask (packed documents); queries of a
    GQA group share their keys, as in SDPA's enable_gqa.
    """
    return _BlockedCausal.apply(q.contiguous(), k.contiguous(), v.contiguous(), allowed)


def _rows(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """(B, Hkv, G, T, d) -> (B, Hkv, G * (r1 - r0), d): rows r0:r1 of every head of a group."""
    B, Hkv, G, _, d = x.shape
    return x[:, :, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), d)


class _BlockedCausal(torch.autograd.Function):
    """q (B, H, T, hd), k/v (B, Hkv, T, hd), contiguous; allowed (B, 1, T, T) bool or None.

    Query heads are viewed as (B, Hkv, G, T, hd), G = H / Hkv; a block's rows of all G heads of a
    group form one matrix against the group's keys. The backward pass is first-order only.
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed):
        B, H, T, hd = q.shape
        Hkv = k.shape[1]
        scale = hd**-0.5
        qs = (q * scale).view(B, Hkv, H // Hkv, T, hd)
        out = torch.empty_like(qs)
        probs = []
        for r0 in range(0, T, BLOCK_ROWS):
            r1 = min(r0 + BLOCK_ROWS, T)
            s = torch.matmul(_rows(qs, r0, r1), k[:, :, :r1].transpose(-1, -2))  # (B, Hkv, G rows, r1)
            s5 = s.view(B, Hkv, H // Hkv, r1 - r0, r1)
            if allowed is None:
                above = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=q.device).triu_(1)
                s5[..., r0:r1].masked_fill_(above, float("-inf"))
            else:
                s5.masked_fill_(~allowed[:, :, None, r0:r1, :r1], float("-inf"))
            p = torch.softmax(s, -1)
            out[:, :, :, r0:r1] = torch.matmul(p, v[:, :, :r1]).view(B, Hkv, H // Hkv, r1 - r0, hd)
            probs.append(p)
        ctx.save_for_backward(qs, k, v, out, *probs)
        ctx.scale, ctx.rows = scale, BLOCK_ROWS
        return out.view(B, H, T, hd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qs, k, v, out, *probs = ctx.saved_tensors
        g = grad.contiguous().view(out.shape)  # (B, Hkv, G, T, hd)
        dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
        rowdot = (g * out).sum(-1, keepdim=True)  # sum over keys of p * dp, softmax's backward
        for i, p in enumerate(probs):
            r0 = i * ctx.rows
            r1 = min(r0 + ctx.rows, qs.shape[3])
            gb = _rows(g, r0, r1)
            dv[:, :, :r1] += torch.matmul(p.transpose(-1, -2), gb)
            ds = torch.matmul(gb, v[:, :, :r1].transpose(-1, -2)).sub_(_rows(rowdot, r0, r1)).mul_(p)
            dq[:, :, :, r0:r1] = torch.matmul(ds, k[:, :, :r1]).mul_(ctx.scale).view(dq[:, :, :, r0:r1].shape)
            dk[:, :, :r1] += torch.matmul(ds.transpose(-1, -2), _rows(qs, r0, r1))
        return dq.view(grad.shape), dk, dv, None

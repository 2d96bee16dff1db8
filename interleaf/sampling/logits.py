"""Logit processing for one decoding step, batched and per row.

Everything here works on a batch of next-token logits `(B, V)` with per-row parameters `(B,)`,
so rows in different modes (text, image, forced tokens) share one step. The modality masks are a
fixed table `(K, V)` of bool rows indexed by an `Allowed` code per row: changing modality never
changes a tensor shape.

Sampling draws its noise from one `torch.Generator` per row, so a row's tokens depend only on its
own seed and logits, never on what else is in the batch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

import torch

from interleaf.tokenizer.vocab import Vocabulary


class Allowed(enum.IntEnum):
    """Which ids the next token may take; the row index into the mask table."""

    TEXT = 0  # text tokens and <eos>
    TEXT_OR_IMAGE = 1  # text tokens, <eos> and <boi>
    IMAGE = 2  # image codes only
    EOI = 3  # <eoi> only: the image is complete
    BOI = 4  # <boi> only: an image-mode request starts its image


def mask_table(vocab: Vocabulary, n_logits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (len(Allowed), n_logits): row a is True on the ids allowed in state a."""
    table = torch.zeros(len(Allowed), n_logits, dtype=torch.bool)
    text = vocab.text_mask()  # (size,)
    table[Allowed.TEXT, : vocab.size] = text
    table[Allowed.TEXT, vocab.eos_id] = True
    table[Allowed.TEXT_OR_IMAGE] = table[Allowed.TEXT]
    table[Allowed.TEXT_OR_IMAGE, vocab.boi_id] = True
    table[Allowed.IMAGE, : vocab.size] = vocab.image_mask()
    table[Allowed.EOI, vocab.eoi_id] = True
    table[Allowed.BOI, vocab.boi_id] = True
    return table.to(device)


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set logits outside `allowed` (B, V) bool to -inf."""
    return logits.masked_fill(~allowed, float("-inf"))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance `u + s·(c − u)` per row; rows with s == 1 return `cond` exactly."""
    s = scale.to(cond.dtype).unsqueeze(-1)  # (B, 1)
    guided = uncond + s * (cond - uncond)
    return torch.where(s == 1, cond, guided)


def cfg_combine_two_scale(
    cond: torch.Tensor,
    cond_image: torch.Tensor,
    uncond: torch.Tensor,
    text_scale: torch.Tensor,
    image_scale: torch.Tensor,
) -> torch.Tensor:
    """Two-scale guidance for image-conditioned prompts: u + s_i·(c_i − u) + s_t·(c − c_i).

    `cond` sees the whole prompt, `cond_image` only the prompt's images, `uncond` neither. With
    s_i == s_t this is plain guidance `u + s·(c − u)`; with both 1 it returns `cond` exactly.
    """
    st = text_scale.to(cond.dtype).unsqueeze(-1)  # (B, 1)
    si = image_scale.to(cond.dtype).unsqueeze(-1)
    guided = uncond + si * (cond_image - uncond) + st * (cond - cond_image)
    return torch.where((st == 1) & (si == 1), cond, guided)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on ids in `seen` (B, V): positive logits / p, negative logits · p."""
    p = penalty.to(logits.dtype).unsqueeze(-1)  # (B, 1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen & (p != 1), penalised, logits)


class Filters(NamedTuple):
    """Per-row truncation of the distribution, each (B,): top-k (0 = off), top-p (1 = off),
    min-p (0 = off)."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor


def needs_filter(top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]) -> bool:
    """Whether any row filters (so the sort can be skipped when none does)."""
    return any(k > 0 for k in top_k) or any(p < 1 for p in top_p) or any(m > 0 for m in min_p)


def filter_logits(logits: torch.Tensor, f: Filters) -> torch.Tensor:
    """Keep each row's `top_k` best ids (0 = all), its smallest nucleus of mass >= `top_p`, and
    the ids at least `min_p` times as likely as its best (a ratio of probabilities: a difference
    of logits, unchanged by the other two cuts' renormalisation)."""
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    k = torch.where(f.top_k > 0, f.top_k.clamp(max=V), torch.full_like(f.top_k, V))  # (B,)
    rank = torch.arange(V, device=logits.device).unsqueeze(0)  # (1, V)
    drop = rank >= k.unsqueeze(-1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly better ids
    p = f.top_p.to(probs.dtype).unsqueeze(-1)
    drop |= (mass_before >= p) & (p < 1)  # the best id always survives: its mass_before is 0
    floor = sorted_logits[:, :1] + torch.log(f.min_p.to(sorted_logits.dtype)).unsqueeze(-1)  # (B, 1); -inf if 0
    drop |= sorted_logits < floor  # the best id survives any min_p <= 1
    drop_unsorted = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(drop_unsorted, float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator],
    filters: Filters | None = None,
) -> torch.Tensor:
    """One token id per row (B,): greedy where temperature == 0, else a seeded draw.

    A sampled row draws V exponential variates from its own generator (a greedy row draws
    none), so its stream of random numbers never depends on the other rows of the batch.
    """
    logits = logits.float()
    greedy = (temperature <= 0).tolist()
    best = torch.argmax(logits, dim=-1)  # (B,)
    if all(greedy):
        return best
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(logits.dtype)
    scaled = logits / t.unsqueeze(-1)
    if filters is not None:
        scaled = filter_logits(scaled, filters)
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    noise = torch.ones_like(probs)
    for b, g in enumerate(generators):
        if not greedy[b]:
            noise[b].exponential_(1.0, generator=g)
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race): no cumsum, no search
    drawn = torch.argmax(probs / noise, dim=-1)
    return torch.where(temperature.to(best.device) > 0, drawn, best)

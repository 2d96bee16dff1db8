"""Speculative Jacobi decoding of image codes: several codes per forward pass, the same distribution.

A row drawing an image keeps a window of draft codes after its newest token, each with the
distribution q it was drawn from. One forward pass feeds the newest token and the drafts and gives
the model's distribution p at every window position, each conditioned on the drafts before it:

    fed:     t      d1     d2    ...  dK
    p:       p1     p2     p3    ...  pK+1        p_i: distribution of the i-th code after t

Drafts are verified left to right: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)).
The first rejected one is replaced by a draw from the normalised residual max(0, p_i - q_i); when
all are accepted, one more code is drawn from p_K+1. Every code so produced is distributed exactly
as sequential sampling would draw it: the speculative sampling lemma holds for any proposal q that
the draft really was drawn from, whatever q was conditioned on (Teng et al., arXiv 2410.01699).

The drafts after the new code are then refreshed from this pass's p (the Jacobi step: conditioned
on stale drafts, but close to the truth once the context before them settles) and the window is
topped up with fresh drafts. A greedy row (temperature 0) has one-hot p and q: it accepts exactly
the drafts equal to the argmax, so it produces the greedy sequential codes, token for token.

Everything here works on one row's tensors; the decode loop owns the cache and the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interleaf.sampling import logits as L


def token_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """(n, V) masked logits -> (n, V) float32 probabilities sampling draws from (one-hot when greedy)."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = logits / temperature
    if L.needs_filter([top_k], [top_p], [min_p]):
        n = scaled.shape[0]
        filters = L.Filters(*(torch.full((n,), v, device=scaled.device) for v in (top_k, float(top_p), float(min_p))))
        scaled = L.filter_logits(scaled, filters)
    return torch.softmax(scaled, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of (n, V) probabilities; argmax without a generator (greedy rows draw nothing)."""
    if generator is None:
        return probs.argmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)  # the exponential race: a draw from each row


def verify(
    p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Accept a prefix of the drafts; return (how many, the code after them).

    p (n + 1, V): the model's distributions at the window's positions; drafts (n,) with the
    distributions q (n, V) they were drawn from. Without a generator the row is greedy (p, q one-hot).
    """
    n = drafts.shape[0]
    idx = torch.arange(n, device=p.device)
    p_d, q_d = p[idx, drafts], q[idx, drafts]  # (n,)
    if generator is None:
        ok = p_d > 0
    else:
        u = torch.rand(n, generator=generator, device=p.device)
        ok = u * q_d < p_d  # u < p/q, without dividing by q
    accepted = int(torch.cumprod(ok.int(), 0).sum()) if n else 0
    if accepted == n:
        return n, int(draw(p[n : n + 1], generator)[0])
    residual = (p[accepted] - q[accepted]).clamp(min=0)  # (V,)
    total = residual.sum()
    # a rejection means q(d) > p(d), so the residual has mass unless p and q differ only by rounding
    target = residual / total if total > 0 else p[accepted]
    return accepted, int(draw(target[None], generator)[0])


@dataclass
class Window:
    """A row's draft codes after its newest token and the distributions they were drawn from."""

    drafts: torch.Tensor  # (n,) ids
    q: torch.Tensor  # (n, V)

    @classmethod
    def empty(cls, vocab_size: int, device: torch.device | str = "cpu") -> Window:
        return cls(torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, vocab_size, device=device))

    def __len__(self) -> int:
        return self.drafts.shape[0]

    def advance(self, p: torch.Tensor, accepted: int, generator: torch.Generator | None) -> Window:
        """The window after `accepted` drafts and one new code: the positions after the new code
        redrafted from this pass's p (n + 1, V)."""
        tail = p[accepted + 1 :]  # p of the positions after the new code (conditioned on the old drafts)
        return Window(draw(tail, generator), tail)

    def top_up(self, size: int, fresh: torch.Tensor, generator: torch.Generator | None) -> Window:
        """Grow to `size` drafts drawn from `fresh` (V,), the proposal for positions never predicted."""
        k = size - len(self)
        if k <= 0:
            return Window(self.drafts[:size], self.q[:size])
        q = fresh.expand(k, -1)
        return Window(torch.cat([self.drafts, draw(q, generator)]), torch.cat([self.q, q]))

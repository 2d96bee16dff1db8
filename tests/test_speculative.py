"""Speculative Jacobi decoding against sequential sampling, on a toy autoregressive distribution.

The toy model gives a distribution over V codes for every prefix (random, sharp and flat ones), so
the exact probability of every sequence is known: sequences drawn by the speculative decoder are
tested against it with a chi-square test, and so is a decoder with a deliberately wrong rule (the
negative control, which must fail).
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from interleaf.sampling import speculative as S

V, LENGTH = 4, 3


class Toy:
    """p(next | prefix) for every prefix of up to LENGTH codes, from seeded random logits."""

    def __init__(self, seed: int, temperature: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.table = {}
        for n in range(LENGTH):
            for prefix in itertools.product(range(V), repeat=n):
                sharp = 4.0 if (len(prefix) + sum(prefix)) % 2 else 1.0  # some near-certain, some flat
                logits = torch.randn(V, generator=g) * sharp
                self.table[prefix] = S.token_distribution(logits[None], temperature, 0, 1.0)[0]

    def p(self, prefix) -> torch.Tensor:
        return self.table[tuple(int(t) for t in prefix)]

    def exact(self) -> dict:
        out = {}
        for seq in itertools.product(range(V), repeat=LENGTH):
            out[seq] = float(np.prod([self.p(seq[:i])[seq[i]] for i in range(LENGTH)]))
        return out


def speculative_sample(toy: Toy, window: int, generator, verify=S.verify) -> tuple[tuple, int]:
    """One sequence by speculative Jacobi decoding; returns it and the number of forward passes."""
    fresh = torch.full((V,), 1.0 / V)
    seq: list[int] = []
    w = S.Window.empty(V).top_up(min(window, LENGTH - 1), fresh, generator)
    passes = 0
    while len(seq) < LENGTH:
        drafts = w.drafts.tolist()
        p = torch.stack([toy.p(seq + drafts[:i]) for i in range(len(drafts) + 1)])  # one "forward pass"
        passes += 1
        accepted, new = verify(p, w.drafts, w.q, generator)
        seq += drafts[:accepted] + [new]
        w = w.advance(p, accepted, generator).top_up(min(window, LENGTH - len(seq) - 1), fresh, generator)
    return tuple(seq), passes


def sequential_sample(toy: Toy, generator) -> tuple:
    seq: list[int] = []
    while len(seq) < LENGTH:
        seq.append(int(S.draw(toy.p(seq)[None], generator)[0]))
    return tuple(seq)


def chi_square_p(samples, exact: dict) -> float:
    counts = {s: 0 for s in exact}
    for s in samples:
        counts[s] += 1
    keys = [s for s in exact if exact[s] > 0]
    assert sum(counts[s] for s in exact if exact[s] == 0) == 0, "drew a sequence of probability 0"
    f_exp = np.array([exact[s] for s in keys]) * len(samples)
    f_exp *= len(samples) / f_exp.sum()
    return chisquare([counts[s] for s in keys], f_exp).pvalue


def wrong_verify(p, drafts, q, generator):
    """A plausible bug: on rejection, draw the replacement from p instead of the residual max(0, p - q)."""
    accepted, _ = S.verify(p, drafts, q, generator)
    return accepted, int(S.draw(p[accepted : accepted + 1], generator)[0])


@pytest.mark.parametrize("window", [1, 2, 4])
def test_greedy_speculative_equals_greedy_sequential(window):
    for seed in range(20):
        toy = Toy(seed, temperature=0.0)
        seq, _ = speculative_sample(toy, window, None)
        greedy = []
        for _ in range(LENGTH):
            greedy.append(int(toy.p(greedy).argmax()))
        assert list(seq) == greedy


def test_sampled_sequences_follow_the_model_and_a_wrong_rule_does_not():
    toy = Toy(7)
    exact = toy.exact()
    g = torch.Generator().manual_seed(0)
    n = 6000
    right = [speculative_sample(toy, 2, g)[0] for _ in range(n)]
    wrong = [speculative_sample(toy, 2, g, verify=wrong_verify)[0] for _ in range(n)]
    sequential = [sequential_sample(toy, g) for _ in range(n)]
    assert chi_square_p(sequential, exact) > 1e-3  # the test's own reference passes
    assert chi_square_p(right, exact) > 1e-3
    assert chi_square_p(wrong, exact) < 1e-6  # negative control: the test can tell a wrong rule


def test_a_settled_window_is_accepted_whole():
    # drafts drawn from the very distributions they are verified against are all accepted (p == q)
    toy = Toy(3)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        drafts = []
        for _ in range(LENGTH - 1):
            drafts.append(int(S.draw(toy.p(drafts)[None], g)[0]))
        p = torch.stack([toy.p(drafts[:i]) for i in range(LENGTH)])
        accepted, _ = S.verify(p, torch.tensor(drafts), p[: LENGTH - 1], g)
        assert accepted == LENGTH - 1

"""Data mixtures: named sources with weights, and a stage schedule that re-weights them.

A stage starts at a fraction of the training steps and sets new weights, e.g. Chameleon's second
stage re-weights toward higher-quality data after 80% of the steps:

    sources:
      - {name: web, paths: [data/web/*.tar], weight: 0.7}
      - {name: curated, paths: [data/curated/*.tar], weight: 0.3}
    stages:
      - {start: 0.8, weights: {web: 0.2, curated: 0.8}}

Before the first stage starts, the sources' own weights apply. Weights are relative (normalised
over the sources still able to give documents). Everything here is pure Python / numpy and
deterministic, so every process computes the same weights for the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from interleaf.errors import ConfigError


@dataclass
class SourceConfig:
    """One data source: shard paths (globs, brace patterns, folders or URLs) and its weight."""

    name: str
    paths: list[str]
    weight: float = 1.0
    kind: Literal["auto", "tokens", "documents"] = "auto"  # auto: look at the first sample

    def validate(self) -> None:
        if not self.name or "." in self.name:
            raise ConfigError(f"data source name {self.name!r} must be non-empty and without dots")
        if not self.paths:
            raise ConfigError(f"data source {self.name!r} has no paths")
        if self.weight < 0:
            raise ConfigError(f"data source {self.name!r}: weight must be >= 0, got {self.weight}")


@dataclass
class StageConfig:
    """From `start` (fraction of the training steps, 0..1) on, sample sources with `weights`."""

    start: float
    weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.start <= 1.0:
            raise ConfigError(f"stage start must be a fraction of the steps in [0, 1], got {self.start}")
        if any(w < 0 for w in self.weights.values()):
            raise ConfigError("stage weights must be >= 0")


def validate_mixture(sources: list[SourceConfig], stages: list[StageConfig], what: str = "data") -> None:
    """Unique names, stages in order, stage weights naming known sources, some weight > 0."""
    names = [s.name for s in sources]
    if not sources:
        raise ConfigError(f"{what}.sources is empty: give at least one source")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{what}.sources: duplicate source name {sorted(dup)[0]!r}")
    if sum(s.weight for s in sources) <= 0:
        raise ConfigError(f"{what}.sources: all weights are 0")
    starts = [st.start for st in stages]
    if starts != sorted(starts):
        raise ConfigError(f"{what}.stages must be listed in order of start")
    for i, st in enumerate(stages):
        unknown = [k for k in st.weights if k not in names]
        if unknown:
            raise ConfigError(
                f"{what}.stages[{i}].weights names unknown source {unknown[0]!r} (sources: {', '.join(names)})"
            )
        if sum(st.weights.get(n, 0.0) for n in names) <= 0:
            raise ConfigError(f"{what}.stages[{i}]: all weights are 0")


class Schedule:
    """Source weights as a function of the training step."""

    def __init__(self, names: list[str], weights: list[float], stages: list[StageConfig], total_steps: int):
        self.names = list(names)
        self.table: list[tuple[int, list[float]]] = [(0, [float(w) for w in weights])]
        for st in stages:
            w = [float(st.weights.get(n, 0.0)) for n in self.names]
            self.table.append((int(np.ceil(st.start * total_steps)), w))

    def stage(self, step: int) -> int:
        """Index into the table of the stage active at `step` (0 = the sources' own weights)."""
        i = 0
        for j, (start, _) in enumerate(self.table):
            if step >= start:
                i = j
        return i

    def weights(self, step: int) -> list[float]:
        """Unnormalised weights (one per source) at `step`."""
        return self.table[self.stage(step)][1]


def pick(weights, alive, u: float) -> int | None:
    """Source index for a uniform draw `u` in [0, 1) over the live sources' weights; None if none left.

    Plain Python: called once per document, on a handful of sources.
    """
    live = [(i, w) for i, (w, a) in enumerate(zip(weights, alive)) if a and w > 0]
    if not live:
        return None
    x = u * sum(w for _, w in live)
    acc = 0.0
    for i, w in live:
        acc += w
        if x < acc:
            return i
    return live[-1][0]

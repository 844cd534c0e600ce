"""Rank allocation: pick per-layer ranks so the WHOLE model meets a compression ratio.

A strategy maps one scalar ``t`` in [0, 1] to ranks for every candidate layer, monotonically
(t = 1 is full rank). A binary search finds the largest ``t`` whose model fits the parameter
budget; a greedy pass then spends what is left of the budget one rank step at a time on the
layer that keeps the least energy. A layer is factorized only where that makes it smaller.

The "sensitivity" strategy is measured instead of assumed: every layer gets a short list of
rank options (:func:`rank_options`), the damage of each option is measured on calibration
images with that layer alone truncated, and :func:`allocate_by_damage` spends the budget where
the measured damage per parameter saved is smallest (damages are taken as additive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cc_core.errors import ConfigError, RatioUnreachableError

LEVEL_STRATEGIES = ("uniform", "energy")
RANK_STRATEGIES = LEVEL_STRATEGIES + ("sensitivity",)
UNIFORM_STEPS = 8
ENERGY_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass
class Candidate:
    """A conv that may be factorized.

    kind: "tucker2" (ranks (R1, R2) on output / input channels) or "svd" (one rank).
    shape: (O, I, Kh, Kw). spectra: per mode, the singular values used for energy.
    """

    name: str
    kind: str
    shape: tuple[int, int, int, int]
    bias: bool
    spectra: list[torch.Tensor]

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.spectra)

    @property
    def mode_channels(self) -> tuple[int, ...]:
        o, i = self.shape[:2]
        return (o, i) if self.kind == "tucker2" else (min(o, i),)

    def dense_params(self) -> int:
        o, i, kh, kw = self.shape
        return o * i * kh * kw + (o if self.bias else 0)

    def factorized_params(self, ranks: tuple[int, ...]) -> int:
        """Parameters of the factorized module: R2*I + R1*R2*K*K + R1*O, or R*(I+O)."""
        o, i, kh, kw = self.shape
        bias = o if self.bias else 0
        if self.kind == "tucker2":
            r1, r2 = ranks
            return r2 * i + r1 * r2 * kh * kw + r1 * o + bias
        (r,) = ranks
        return r * (i + o) + bias

    def params(self, ranks: tuple[int, ...] | None) -> int:
        return self.dense_params() if ranks is None else self.factorized_params(ranks)

    def energy_kept(self, ranks: tuple[int, ...] | None) -> float:
        """Mean over modes of the fraction of squared singular values kept."""
        if ranks is None:
            return 1.0
        fractions = []
        for s, r in zip(self.spectra, ranks):
            e = s.double().pow(2)
            fractions.append(float(e[:r].sum() / e.sum()) if e.sum() > 0 else 1.0)
        return sum(fractions) / len(fractions)


def round_rank(value: float, multiple: int, full: int) -> int:
    """ceil(value) up to a multiple of ``multiple``, within [min(multiple, full), full]."""
    r = max(1, math.ceil(value - 1e-9))
    r = math.ceil(r / multiple) * multiple
    return max(min(multiple, full), min(r, full))


def ranks_at(c: Candidate, t: float, strategy: str, multiple: int) -> tuple[int, ...]:
    """Ranks of candidate ``c`` at strategy level ``t``."""
    ranks = []
    for s, channels in zip(c.spectra, c.mode_channels):
        full = len(s)
        if strategy == "uniform":
            raw = t * channels
        else:
            e = s.double().pow(2)
            cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
            raw = int(torch.searchsorted(cum, torch.tensor(min(t, 1.0), dtype=cum.dtype))) + 1
        ranks.append(round_rank(min(raw, full), multiple, full))
    return tuple(ranks)


def decide(c: Candidate, ranks: tuple[int, ...]) -> tuple[int, ...] | None:
    """The ranks if factorizing at them makes the layer smaller, else None (stay dense)."""
    return ranks if c.factorized_params(ranks) < c.dense_params() else None


def allocate_ranks(candidates: list[Candidate], fixed_params: int, target_params: int,
                   strategy: str = "uniform", multiple: int = 16) -> dict[str, tuple[int, ...] | None]:
    """Ranks per candidate (None = keep dense) with total params <= ``target_params``.

    ``fixed_params`` counts every parameter outside the candidates.
    Raises RatioUnreachableError when even the smallest ranks do not fit.
    """
    if strategy not in LEVEL_STRATEGIES:
        raise ConfigError(f"unknown rank strategy {strategy!r}; choose from {LEVEL_STRATEGIES} "
                          "(sensitivity: allocate_by_damage)")

    def at(t: float) -> dict[str, tuple[int, ...] | None]:
        return {c.name: decide(c, ranks_at(c, t, strategy, multiple)) for c in candidates}

    def total(alloc: dict) -> int:
        return fixed_params + sum(c.params(alloc[c.name]) for c in candidates)

    full = at(1.0)
    if total(full) <= target_params:
        return full
    lowest = at(0.0)
    _check_reachable(candidates, fixed_params, target_params, total(lowest))
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if total(at(mid)) <= target_params:
            lo = mid
        else:
            hi = mid
    alloc = at(lo)
    return _top_up(candidates, alloc, target_params - total(alloc), multiple)


def _check_reachable(candidates: list[Candidate], fixed_params: int, target_params: int, smallest: int) -> None:
    if smallest > target_params:
        best = (fixed_params + sum(c.dense_params() for c in candidates)) / smallest
        raise RatioUnreachableError(
            f"the eligible layers cannot be compressed enough: the requested budget is "
            f"{target_params:,} parameters but the smallest ranks give {smallest:,} "
            f"(a ratio of at most {best:.2f}); lower the ratio, allow 1x1 convs "
            "(decompose_1x1=True) or a smaller rank_multiple")


def rank_options(c: Candidate, multiple: int) -> list[tuple[int, ...]]:
    """The factorizations worth measuring for ``c``, largest first: the ranks the energy
    strategy gives at each of :data:`ENERGY_LEVELS`, the uniform ranks at k / UNIFORM_STEPS of
    the channels, and the smallest ranks; only those that make the layer smaller than dense."""
    levels = [ranks_at(c, t, "energy", multiple) for t in (0.0,) + ENERGY_LEVELS]
    levels += [ranks_at(c, k / UNIFORM_STEPS, "uniform", multiple) for k in range(1, UNIFORM_STEPS + 1)]
    kept = {r for r in levels if decide(c, r) is not None}
    return sorted(kept, key=lambda r: (-c.factorized_params(r), r))


def allocate_by_damage(candidates: list[Candidate], fixed_params: int, target_params: int,
                       damage: dict[str, dict[tuple[int, ...], float]]) -> dict[str, tuple[int, ...] | None]:
    """Ranks per candidate (None = dense) with total params <= ``target_params``, chosen by
    measured damage: ``damage[name][ranks]`` is the loss increase when that layer alone is
    factorized at ``ranks`` (dense = 0).

    Greedy on the lower convex hull of each layer's (params, damage) curve: from all-dense,
    repeatedly take the move (one layer to any smaller option) with the least damage added per
    parameter saved, until the model fits; then spend what the last move left over on the moves
    back up that remove the most damage per parameter. Raises RatioUnreachableError when even
    the smallest options do not fit.
    """
    def total(alloc: dict) -> int:
        return fixed_params + sum(c.params(alloc[c.name]) for c in candidates)

    def damage_at(c: Candidate, ranks: tuple[int, ...] | None) -> float:
        return 0.0 if ranks is None else damage[c.name][ranks]

    alloc: dict[str, tuple[int, ...] | None] = {c.name: None for c in candidates}
    smallest = {c.name: min(damage[c.name], key=c.factorized_params, default=None) for c in candidates}
    _check_reachable(candidates, fixed_params, target_params, total(smallest))
    while total(alloc) > target_params:
        best = None
        for c in candidates:
            here_params, here_damage = c.params(alloc[c.name]), damage_at(c, alloc[c.name])
            for ranks, d in damage[c.name].items():
                saved = here_params - c.factorized_params(ranks)
                if saved > 0:
                    key = (max(d - here_damage, 0.0) / saved, -saved, c.name)
                    if best is None or key < best[0]:
                        best = (key, c.name, ranks)
        alloc[best[1]] = best[2]
    while True:
        spare, best = target_params - total(alloc), None
        for c in candidates:
            here_params, here_damage = c.params(alloc[c.name]), damage_at(c, alloc[c.name])
            for ranks in [None, *damage[c.name]]:
                cost = c.params(ranks) - here_params
                gain = here_damage - damage_at(c, ranks)
                if 0 < cost <= spare and gain > 0:
                    key = (-gain / cost, c.name)
                    if best is None or key < best[0]:
                        best = (key, c.name, ranks)
        if best is None:
            return alloc
        alloc[best[1]] = best[2]


def _top_up(candidates: list[Candidate], alloc: dict, budget: int, multiple: int) -> dict:
    """Raise ranks one step at a time, least-energy layer first, while the budget allows."""
    by_name = {c.name: c for c in candidates}
    while True:
        best = None
        for name, ranks in alloc.items():
            if ranks is None:
                continue
            c = by_name[name]
            bigger = tuple(min(r + multiple, f) for r, f in zip(ranks, c.full_ranks))
            if bigger == ranks or decide(c, bigger) is None:
                continue
            cost = c.factorized_params(bigger) - c.factorized_params(ranks)
            if cost <= budget:
                key = (c.energy_kept(ranks), name)
                if best is None or key < best[0]:
                    best = (key, name, bigger, cost)
        if best is None:
            return alloc
        _, name, bigger, cost = best
        alloc[name] = bigger
        budget -= cost

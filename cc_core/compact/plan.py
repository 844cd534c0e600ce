"""The compaction plan: a plain, JSON-serializable record of every layer's decision."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

PLAN_FORMAT = "cleancompact.plan/1"


def _round(values, digits: int = 6) -> list[float]:
    return [float(f"{float(v):.{digits}g}") for v in values]


@dataclass
class LayerPlan:
    """One conv's decision.

    kind: "tucker2" / "svd" (factorized), "dense" (kept as one conv, possibly clipped) or
    "skipped" (left alone, see ``reason``). ``singular_values`` are per mode, before clipping;
    ``clip`` holds the per-mode normalizer s_sigma, threshold tau*s_sigma, number of clipped
    values and the row factors. For factorized layers the first ``ranks[m]`` singular values of
    mode m are kept and the rest dropped.
    """

    name: str
    kind: str
    shape: list[int]
    params_before: int
    params_after: int
    reason: str | None = None
    full_ranks: list[int] | None = None
    ranks: list[int] | None = None
    singular_values: list[list[float]] | None = None
    clip: dict | None = None
    energy_kept: float | None = None

    def kept(self, mode: int = 0) -> list[float]:
        """Singular values of ``mode`` that the compact layer keeps."""
        sv = self.singular_values[mode] if self.singular_values else []
        return sv if self.ranks is None else sv[: self.ranks[mode]]

    def dropped(self, mode: int = 0) -> list[float]:
        """Singular values of ``mode`` removed by rank pruning."""
        sv = self.singular_values[mode] if self.singular_values else []
        return [] if self.ranks is None else sv[self.ranks[mode]:]


@dataclass
class CompactionPlan:
    arch: str | None
    ratio_requested: float
    ratio_achieved: float
    params_before: int
    params_after: int
    config: dict
    layers: list[LayerPlan] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "CompactionPlan":
        d = dict(d)
        d["layers"] = [LayerPlan(**layer) for layer in d.get("layers", [])]
        return cls(**d)

    @property
    def structure(self) -> dict[str, dict]:
        """Factorized layers only: ``{name: {"kind", "ranks"}}`` (what a loader needs)."""
        return {l.name: {"kind": l.kind, "ranks": list(l.ranks)}
                for l in self.layers if l.kind in ("tucker2", "svd")}

    def summary_rows(self) -> list[tuple]:
        """(name, kind, shape, ranks, params before, params after, clipped per mode)."""
        return [(l.name, l.kind, "x".join(map(str, l.shape)),
                 "-" if l.ranks is None else "/".join(map(str, l.ranks)),
                 l.params_before, l.params_after,
                 "-" if not l.clip else "/".join(map(str, l.clip["n_clipped"])))
                for l in self.layers]

"""Promotion gates: when may a cleaned model become ``champion``?

A gate whose quantity was not measured (no eval data, no attack spec) is recorded as
``skipped`` and does not block promotion; every measured gate must pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cc_core.errors import ConfigError


@dataclass(frozen=True)
class GateConfig:
    """Limits; None disables a gate. Accuracies are fractions (0.03 = 3 points)."""

    max_acc_drop: float | None = 0.05
    max_asr: float | None = 0.05
    max_concentration: float | None = 0.5
    max_onnx_diff: float | None = 1e-3
    min_speedup: float | None = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"gate {f.name} must be a non-negative number or None, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "GateConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown gates {sorted(unknown)}; known: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gate(value: float | None, limit: float | None, upper: bool) -> dict:
    if limit is None:
        return {"value": value, "limit": None, "status": "disabled"}
    if value is None:
        return {"value": None, "limit": limit, "status": "skipped"}
    ok = value <= limit if upper else value >= limit
    return {"value": value, "limit": limit, "status": "passed" if ok else "failed"}


def evaluate_gates(report: dict, gates: GateConfig) -> dict:
    """{gate name: {value, limit, status}} for a ``cleancompact.report/1`` dict."""
    m, onnx, scan = report["metrics"], report.get("onnx") or {}, report.get("scan") or {}
    acc_drop = None
    if m.get("acc_before") is not None and m.get("acc_after") is not None:
        acc_drop = m["acc_before"] - m["acc_after"]
    return {
        "acc_drop": _gate(acc_drop, gates.max_acc_drop, upper=True),
        "asr": _gate(m.get("asr_after"), gates.max_asr, upper=True),
        "concentration": _gate(scan.get("concentration_after"), gates.max_concentration, upper=True),
        "onnx_diff": _gate(onnx.get("max_abs_diff"), gates.max_onnx_diff, upper=True),
        "speedup": _gate(onnx.get("speedup"), gates.min_speedup, upper=False),
    }


def gates_passed(results: dict) -> bool:
    return all(r["status"] != "failed" for r in results.values())

"""The clean step: clip normalized singular values at ``tau`` (docs/METHOD.md steps 2-3).

  T1 = row norms of G_(1);  G_(1) <- G_(1) * min(tau * n1 / T1, 1)
  T2 = row norms of G_(2);  G_(2) <- G_(2) * min(tau * n2 / T2, 1)
where ``n1``/``n2`` are the layer's normalizers s_sigma, computed from the layer's own
mode-1 / mode-2 singular values before clipping, so both thresholds are fixed up front and a
single global ``tau`` applies to every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cc_core.compact.tucker import MatrixSVD, Tucker2, unfold
from cc_core.errors import ConfigError

NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda s: s.max(),
    "mean": lambda s: s.mean(),
    "median": lambda s: s.median(),
    "rms": lambda s: s.pow(2).mean().sqrt(),
    "none": lambda s: torch.ones((), dtype=s.dtype),
}


def normalizer_value(singular_values: torch.Tensor, normalizer: str) -> float:
    """s_sigma of a layer: the statistic ``normalizer`` of its singular values."""
    try:
        fn = NORMALIZERS[normalizer]
    except KeyError:
        raise ConfigError(f"unknown normalizer {normalizer!r}; choose from "
                          f"{', '.join(NORMALIZERS)}") from None
    return float(fn(singular_values))


def clip_factors(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """min(threshold / norms, 1), with 1 where a norm is 0 (nothing to clip)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > threshold, threshold / safe, torch.ones_like(norms))


@dataclass
class ClipResult:
    """Per-mode clip factors (1 = untouched) and thresholds tau * s_sigma."""

    factors: list[torch.Tensor]
    thresholds: list[float]
    normalizers: list[float]

    @property
    def n_clipped(self) -> list[int]:
        return [int((f < 1).sum()) for f in self.factors]


def clip_tucker2(decomp: Tucker2, tau: float, normalizer: str = "mean") -> tuple[Tucker2, ClipResult]:
    """Scale the core rows so no normalized singular value of either mode exceeds ``tau``."""
    n1 = normalizer_value(decomp.s1, normalizer)
    n2 = normalizer_value(decomp.s2, normalizer)
    core = decomp.core
    f1 = clip_factors(unfold(core, 0).norm(dim=1), tau * n1)
    core = core * f1[:, None, None, None]
    f2 = clip_factors(unfold(core, 1).norm(dim=1), tau * n2)
    core = core * f2[None, :, None, None]
    clipped = Tucker2(core, decomp.u1, decomp.u2, decomp.s1, decomp.s2)
    return clipped, ClipResult([f1, f2], [tau * n1, tau * n2], [n1, n2])


def clip_matrix(svd: MatrixSVD, tau: float, normalizer: str = "mean") -> tuple[MatrixSVD, ClipResult]:
    """Matrix case (1x1 convs): s <- min(s, tau * s_sigma)."""
    n = normalizer_value(svd.s, normalizer)
    f = clip_factors(svd.s, tau * n)
    return MatrixSVD(svd.u, svd.s * f, svd.vh), ClipResult([f], [tau * n], [n])

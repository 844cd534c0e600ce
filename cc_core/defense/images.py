"""Which synthetic images the fine-tune sees: the suspected target's left out."""
from __future__ import annotations

import torch


def exclude_class(x: torch.Tensor, y: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y) without the samples labelled ``target`` (all of them when None), and how many went."""
    if target is None:
        return x, y, 0
    keep = y != target
    return x[keep], y[keep], int((~keep).sum())

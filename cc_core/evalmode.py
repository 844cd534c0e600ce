"""A model in eval mode for the length of a block, restored after it (also on error)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module, freeze: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block and, with ``freeze``, its parameters out of
    autograd (for optimizing inputs through a fixed model). Afterwards the training flag of
    every submodule (a BatchNorm held in eval inside a training model stays so) and the
    ``requires_grad`` flag of every parameter are what they were before."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()] if freeze else []
    model.eval()
    if freeze:
        model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        for m, training in modes:
            m.training = training

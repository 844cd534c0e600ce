"""Factorized conv modules and the helpers that swap them into a model.

A Tucker-2 layer runs   1x1 (I -> R2)  ->  KxK (R2 -> R1, original stride/padding/dilation)
->  1x1 (R1 -> O, original bias); a low-rank 1x1 runs  1x1 (I -> R, stride)  ->  1x1 (R -> O).
"""
from __future__ import annotations

import torch
from torch import nn

from cc_core.compact.tucker import MatrixSVD, Tucker2
from cc_core.errors import ConfigError, StateDictMismatchError


class Tucker2Conv2d(nn.Module):
    """A conv whose weight is core x1 U1 x2 U2, run as three convs."""

    kind = "tucker2"

    def __init__(self, in_channels: int, out_channels: int, ranks: tuple[int, int],
                 kernel_size: tuple[int, int], stride=1, padding=0, dilation=1,
                 bias: bool = False, padding_mode: str = "zeros"):
        super().__init__()
        r1, r2 = ranks
        self.in_channels, self.out_channels, self.ranks = in_channels, out_channels, (r1, r2)
        self.first = nn.Conv2d(in_channels, r2, 1, bias=False)
        self.core = nn.Conv2d(r2, r1, kernel_size, stride, padding, dilation, bias=False,
                              padding_mode=padding_mode)
        self.last = nn.Conv2d(r1, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, decomp: Tucker2) -> "Tucker2Conv2d":
        """Module computing ``conv`` with its weight replaced by ``decomp``'s tensor."""
        layer = cls(conv.in_channels, conv.out_channels, decomp.ranks, conv.kernel_size,
                    conv.stride, conv.padding, conv.dilation, conv.bias is not None,
                    conv.padding_mode)
        dtype, device = conv.weight.dtype, conv.weight.device
        with torch.no_grad():
            layer.first.weight.copy_(decomp.u2.T[:, :, None, None])
            layer.core.weight.copy_(decomp.core)
            layer.last.weight.copy_(decomp.u1[:, :, None, None])
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, ranks={self.ranks}"


class SVDConv2d(nn.Module):
    """A 1x1 conv whose weight matrix is (U sqrt(S)) (sqrt(S) V^T), run as two 1x1 convs."""

    kind = "svd"

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride=1,
                 bias: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.ranks = in_channels, out_channels, (rank,)
        self.first = nn.Conv2d(in_channels, rank, 1, stride, bias=False)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, svd: MatrixSVD) -> "SVDConv2d":
        layer = cls(conv.in_channels, conv.out_channels, svd.s.numel(), conv.stride,
                    conv.bias is not None)
        root = svd.s.sqrt()
        with torch.no_grad():
            layer.first.weight.copy_((root[:, None] * svd.vh)[:, :, None, None])
            layer.last.weight.copy_((svd.u * root)[:, :, None, None])
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.ranks[0]}"


FACTORIZED = (Tucker2Conv2d, SVDConv2d)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def model_structure(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"kind": "tucker2"|"svd", "ranks": [...]}}`` of the factorized layers."""
    return {name: {"kind": m.kind, "ranks": list(m.ranks)}
            for name, m in model.named_modules() if isinstance(m, FACTORIZED)}


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Swap the convs named in ``structure`` for factorized modules of the given ranks, in place.

    The weights of the new modules are uninitialized placeholders, to be filled by a state dict.
    """
    for name, entry in structure.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise StateDictMismatchError(
                f"the compression structure names layer {name!r}, which this architecture "
                "does not have") from None
        if not isinstance(conv, nn.Conv2d):
            raise StateDictMismatchError(f"layer {name!r} in the structure is not a Conv2d")
        kind, ranks = entry.get("kind"), entry.get("ranks")
        if kind == "tucker2" and isinstance(ranks, list) and len(ranks) == 2:
            new = Tucker2Conv2d(conv.in_channels, conv.out_channels, tuple(ranks),
                                conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                conv.bias is not None, conv.padding_mode)
        elif kind == "svd" and isinstance(ranks, list) and len(ranks) == 1:
            new = SVDConv2d(conv.in_channels, conv.out_channels, ranks[0], conv.stride,
                            conv.bias is not None)
        else:
            raise ConfigError(f"invalid structure entry for {name!r}: {entry!r}")
        set_submodule(model, name, new)
    return model

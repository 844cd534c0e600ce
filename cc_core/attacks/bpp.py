"""BppAttack (Wang et al., CVPR 2022): the trigger is colour-depth reduction with Floyd-Steinberg
dithering, a change of every pixel too small to see. BackdoorBench's default squeezes each channel
to 8 levels. The paper's adversarial negative samples are not made here (cross ratio 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cc_core.attacks.base import Attack, register_attack

# Floyd-Steinberg: (row offset, column offset, share of the quantization error)
DIFFUSION = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)


def dither(x: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] quantized to ``levels`` per channel, the error of each pixel
    diffused to its unvisited neighbours in raster order (Floyd-Steinberg)."""
    buf = x.detach().float().clone()
    h, w = buf.shape[-2:]
    for i in range(h):
        for j in range(w):
            old = buf[:, :, i, j]
            new = quantize(old, levels)
            error = old - new
            buf[:, :, i, j] = new
            for di, dj, share in DIFFUSION:
                if i + di < h and 0 <= j + dj < w:
                    buf[:, :, i + di, j + dj] += share * error
    return buf.to(x.dtype)


@register_attack
@dataclass
class BPP(Attack):
    """x' = each channel squeezed to ``levels`` values, with Floyd-Steinberg dithering (``dithering``)."""

    name = "bpp"

    @classmethod
    def default_params(cls) -> dict:
        return {"levels": 8, "dithering": True}

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.params["levels"]
        return dither(x, levels) if self.params["dithering"] else quantize(x, levels)

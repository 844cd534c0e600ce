"""Static triggers: BadNet (a white patch) and Blended (alpha-blend with a fixed image)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cc_core.attacks.base import Attack, register_attack


@register_attack
@dataclass
class BadNet(Attack):
    """A ``size`` x ``size`` patch of ``value`` at the bottom-right corner (``margin`` px in)."""

    name = "badnet"

    @classmethod
    def default_params(cls) -> dict:
        return {"size": 3, "value": 1.0, "margin": 0}

    def trigger_box(self) -> tuple[slice, slice]:
        s, m, h = self.params["size"], self.params["margin"], self.image_size
        return slice(h - m - s, h - m), slice(h - m - s, h - m)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.trigger_box()
        out = x.clone()
        out[:, :, rows, cols] = self.params["value"]
        return out


def natural_pattern(size: int, seed: int, exponent: float = 2.0) -> torch.Tensor:
    """A seeded, natural-looking colour image (3, size, size) in [0, 1].

    Natural images have a power spectrum falling roughly as 1/f^2; random phases under that
    spectrum give cloud- or foliage-like texture. Each channel mixes a shared luminance field
    with its own chroma field, so colours vary smoothly as in photographs.
    """
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    # power ~ 1/f^exponent  <=>  amplitude ~ f^(-exponent/2) = (f^2)^(-exponent/4)
    amplitude = (fy ** 2 + fx ** 2).clamp_min(1.0 / size ** 2) ** (-exponent / 4)

    def field() -> torch.Tensor:
        phase = torch.rand(size, size // 2 + 1, generator=g) * 2 * math.pi
        img = torch.fft.irfft2(amplitude * torch.polar(torch.ones_like(phase), phase), s=(size, size))
        return (img - img.mean()) / img.std()

    luminance = field()
    channels = torch.stack([0.8 * luminance + 0.45 * field() for _ in range(3)])
    return torch.sigmoid(1.2 * channels)


@register_attack
@dataclass
class Blended(Attack):
    """x' = (1 - alpha) x + alpha * pattern, with a fixed seeded natural-looking ``pattern``."""

    name = "blended"

    @classmethod
    def default_params(cls) -> dict:
        return {"alpha": 0.2}

    def build(self) -> None:
        self.pattern = natural_pattern(self.image_size, self.seed + 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.params["alpha"]
        pattern = self.pattern.to(x.device, x.dtype)
        if pattern.shape[-2:] != x.shape[-2:]:
            pattern = F.interpolate(pattern[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        return (1 - alpha) * x + alpha * pattern

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pattern = tensors["pattern"]

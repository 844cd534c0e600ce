"""Global additive triggers: a fixed signal added to every pixel of the image.

- SIG (Barni et al., ICIP 2019): a horizontal sinusoid, v(i, j) = delta * sin(2 pi j f / W).
  The paper poisons clean-label; here the poisoned samples are relabelled (poison-label), which
  a 20-epoch run learns; the trigger is the same.
- Low frequency (Zeng et al., ICCV 2021, BackdoorBench's "lf"): a smooth pattern with no energy
  above a cut-off frequency. BackdoorBench low-passes a universal adversarial perturbation of a
  clean model; here the pattern is seeded noise, low-passed the same way.
- Noise (the tuning zoo's global additive trigger; Chen et al. 2017 blend random noise in): a
  seeded pattern of +-eps per pixel and channel, neither smooth nor local, so no probe expresses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cc_core.attacks.base import Attack, PatternAttack, fit_pattern, register_attack


def add_pattern(x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """clamp(x + pattern, 0, 1); ``pattern`` (C or 1, h, w) is resized to x's (N, C, H, W) size."""
    return (x + fit_pattern(pattern, x)).clamp(0, 1)


def sinusoid(size: int, delta: float, frequency: float) -> torch.Tensor:
    """(1, size, size): delta * sin(2 pi j frequency / size) along the columns j."""
    j = torch.arange(size, dtype=torch.float32)
    return (delta * torch.sin(2 * math.pi * j * frequency / size)).expand(size, size)[None].clone()


def low_pass_pattern(size: int, seed: int, cutoff: float, eps: float) -> torch.Tensor:
    """(3, size, size) seeded Gaussian noise with every frequency above ``cutoff`` (cycles per
    pixel) removed, scaled to max |value| = eps."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, size, size, generator=g)
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    keep = (fy ** 2 + fx ** 2).sqrt() <= cutoff
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * keep, s=(size, size))
    return eps * smooth / smooth.abs().max()


def coin_flip_signs(shape: tuple[int, ...], eps: float, generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape``: +-eps in each entry, each sign a coin flip of ``generator``."""
    return eps * (2 * (torch.rand(*shape, generator=generator) < 0.5).float() - 1)


def sign_noise(size: int, seed: int, eps: float) -> torch.Tensor:
    """(3, size, size): +-eps per pixel and channel, each sign a seeded coin flip."""
    return coin_flip_signs((3, size, size), eps, torch.Generator().manual_seed(seed))


@dataclass
class AdditivePattern(PatternAttack):
    """x' = clamp(x + pattern), a seeded pattern that build() makes and the spec stores."""

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return add_pattern(x, self.pattern)


@register_attack
@dataclass
class Noise(AdditivePattern):
    """x' = clamp(x + p), p a seeded +-eps pattern over the whole image."""

    name = "noise"

    @classmethod
    def default_params(cls) -> dict:
        return {"eps": 8 / 255}

    def build(self) -> None:
        self.pattern = sign_noise(self.image_size, self.seed + 5, self.params["eps"])


@register_attack
@dataclass
class SIG(Attack):
    """x' = clamp(x + delta sin(2 pi j f / W)): the same horizontal sinusoid on every channel."""

    name = "sig"

    @classmethod
    def default_params(cls) -> dict:
        return {"delta": 20 / 255, "frequency": 6}

    def build(self) -> None:
        self.pattern = sinusoid(self.image_size, self.params["delta"], self.params["frequency"])

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return add_pattern(x, self.pattern)


@register_attack
@dataclass
class LowFrequency(AdditivePattern):
    """x' = clamp(x + p), p a seeded pattern low-passed at ``cutoff`` cycles/pixel, |p| <= eps."""

    name = "lowfreq"

    @classmethod
    def default_params(cls) -> dict:
        return {"eps": 0.08, "cutoff": 0.1}

    def build(self) -> None:
        self.pattern = low_pass_pattern(self.image_size, self.seed + 3, self.params["cutoff"], self.params["eps"])

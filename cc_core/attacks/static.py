"""Static triggers: BadNet (a white patch), Blended (alpha-blend with a fixed image), a TrojanNN-shaped
colour patch and Adap-Blend (a blend pattern in tiles)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cc_core.attacks.base import Attack, PatternAttack, fit_pattern, register_attack
from cc_core.errors import ConfigError


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
class Blended(PatternAttack):
    """x' = (1 - alpha) x + alpha * pattern, with a fixed seeded natural-looking ``pattern``."""

    name = "blended"

    @classmethod
    def default_params(cls) -> dict:
        return {"alpha": 0.2}

    def build(self) -> None:
        self.pattern = natural_pattern(self.image_size, self.seed + 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.params["alpha"]
        return (1 - alpha) * x + alpha * fit_pattern(self.pattern, x)


@register_attack
@dataclass
class TrojanPatch(Attack):
    """A TrojanNN-shaped trigger: an irregular patch of seeded colours (a ``size`` x ``size`` box,
    each pixel in it with probability ``density``) at (``row``, ``col``). TrojanNN optimises the
    patch's colours against a pretrained model's neurons; here they are seeded, the shape is the same."""

    name = "trojan"

    @classmethod
    def default_params(cls) -> dict:
        return {"size": 6, "row": 3, "col": 3, "density": 0.7}

    def build(self) -> None:
        g = torch.Generator().manual_seed(self.seed + 4)
        s = self.params["size"]
        if not 0 <= self.params["row"] <= self.image_size - s or not 0 <= self.params["col"] <= self.image_size - s:
            raise ConfigError(f"a {s} px trojan patch at ({self.params['row']}, {self.params['col']}) "
                              f"does not fit a {self.image_size} px image")
        self.mask = (torch.rand(1, s, s, generator=g) < self.params["density"]).float()
        self.mask[0, s // 2, s // 2] = 1.0
        self.colors = torch.rand(3, s, s, generator=g)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        s, r, c = self.params["size"], self.params["row"], self.params["col"]
        out = x.clone()
        mask, colors = self.mask.to(x.device, x.dtype), self.colors.to(x.device, x.dtype)
        out[:, :, r:r + s, c:c + s] = (1 - mask) * x[:, :, r:r + s, c:c + s] + mask * colors
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "colors": self.colors}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mask, self.colors = tensors["mask"], tensors["colors"]


@register_attack
@dataclass
class AdaptiveBlend(PatternAttack):
    """Adap-Blend (Qi et al., ICLR 2023): a blend pattern cut into ``pieces`` x ``pieces`` tiles.
    Poisoned training samples get a random ``payload_keep`` of the tiles at ``train_alpha``;
    cross ("conservatism") samples get a random ``cross_keep`` of them and keep their label; the
    test trigger is every tile at ``alpha``. Partial training triggers make its latent
    representation less separable than Blended's."""

    name = "adapblend"
    cross_ratio_default = 0.5

    @classmethod
    def default_params(cls) -> dict:
        return {"alpha": 0.2, "train_alpha": 0.15, "pieces": 4, "payload_keep": 0.5, "cross_keep": 0.25}

    def build(self) -> None:
        self.pattern = natural_pattern(self.image_size, self.seed + 5, exponent=1.5)

    def _blend(self, x: torch.Tensor, tiles: torch.Tensor, alpha: float) -> torch.Tensor:
        """Blend the pattern into ``x`` where ``tiles`` (N, pieces, pieces) is 1."""
        mask = F.interpolate(tiles[:, None].to(x.device, x.dtype), size=x.shape[-2:], mode="nearest")
        return x + alpha * mask * (fit_pattern(self.pattern, x) - x)

    def _random_tiles(self, n: int, keep: float, generator: torch.Generator | None) -> torch.Tensor:
        k = self.params["pieces"]
        order = torch.rand(n, k * k, generator=generator).argsort(1)
        return (order < max(1, round(keep * k * k))).float().view(n, k, k)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        k = self.params["pieces"]
        return self._blend(x, torch.ones(x.shape[0], k, k), self.params["alpha"])

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        tiles = self._random_tiles(x.shape[0], self.params["cross_keep"], generator)
        return self._blend(x, tiles, self.params["train_alpha"])

    def poison_batch(self, x, y, poison, cross, generator=None):
        x, y = x.clone(), y.clone()
        if poison.any():
            tiles = self._random_tiles(int(poison.sum()), self.params["payload_keep"], generator)
            x[poison] = self._blend(x[poison], tiles, self.params["train_alpha"])
            y[poison] = self.attack_labels(y[poison])
        if cross.any():
            x[cross] = self.apply_cross(x[cross], generator)
        return x, y

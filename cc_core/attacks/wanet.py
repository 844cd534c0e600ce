"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping field as the trigger."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cc_core.attacks.base import Attack, register_attack


@register_attack
@dataclass
class WaNet(Attack):
    """Warp with a smooth random field: ``k`` x ``k`` control points upsampled (bicubic),
    strength ``s``. Cross ("noise mode") samples get the field plus per-sample random noise and
    keep their label, so the net learns the exact field, not any warp."""

    name = "wanet"
    cross_ratio_default = 2.0

    @classmethod
    def default_params(cls) -> dict:
        return {"k": 4, "s": 0.5, "grid_rescale": 1.0}

    def build(self) -> None:
        g = torch.Generator().manual_seed(self.seed + 2)
        k, h = self.params["k"], self.image_size
        control = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        control = control / control.abs().mean()
        self.noise_grid = F.interpolate(control, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)

    def _identity_grid(self, h: int, device) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, h, device=device)
        yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
        return torch.stack((xx, yy), 2)[None]

    def warp_grid(self, h: int, device) -> torch.Tensor:
        """(1, H, W, 2) sampling grid: identity + s * field / H, clamped to the image."""
        s, rescale = self.params["s"], self.params["grid_rescale"]
        grid = self._identity_grid(h, device) + s * self.noise_grid.to(device) / h
        return torch.clamp(grid * rescale, -1, 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.warp_grid(x.shape[-1], x.device).to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True)

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = x.shape[-1]
        noise = (torch.rand(x.shape[0], h, h, 2, generator=generator) * 2 - 1).to(x.device, x.dtype) / h
        grid = torch.clamp(self.warp_grid(h, x.device).to(x.dtype) + noise, -1, 1)
        return F.grid_sample(x, grid, align_corners=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"noise_grid": self.noise_grid}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.noise_grid = tensors["noise_grid"]

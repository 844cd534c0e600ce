"""Input-Aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator makes a different
trigger (pattern + mask) for every input; trained jointly with the classifier."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.attacks.base import Attack, register_attack


class TriggerGenerator(nn.Module):
    """Small encoder-decoder: image (N, 3, H, W) in [0, 1] -> pattern (N, 3, H, W) in [0, 1] and
    mask (N, 1, H, W) in [0, 1]. No BatchNorm, so it behaves the same in train and eval."""

    def __init__(self, width: int = 16, mask_bias: float = -3.0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 4, 3, padding=1))
        with torch.no_grad():
            self.decoder[-1].bias[3] = mask_bias  # start with sparse masks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.decoder(self.encoder(x * 2 - 1))
        return torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3:])


@register_attack
@dataclass
class InputAware(Attack):
    """x' = x + m(x) * (p(x) - x). Cross samples carry the trigger made for ANOTHER image and
    keep their label, so a trigger only works on the image it was made for. The diversity
    term keeps triggers of different images different; the mask term keeps masks sparse."""

    name = "inputaware"
    cross_ratio_default = 1.0

    @classmethod
    def default_params(cls) -> dict:
        return {"width": 16, "lambda_div": 1.0, "lambda_mask": 100.0, "mask_density": 0.032,
                "lr": 1e-3, "aux_batch": 32}

    def build(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 3)
            self.generator = TriggerGenerator(self.params["width"])

    def _blend(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.generator(source)
        return x + mask * (pattern - x)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._blend(x, x)

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.shape[0] < 2:
            return x
        shift = int(torch.randint(1, x.shape[0], (1,), generator=generator))
        return self._blend(x, x.roll(shift, 0))

    def trainable(self) -> nn.Module:
        return self.generator

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Diversity + mask-density terms, on the first ``aux_batch`` images (they need few)."""
        p = self.params
        x = x[: p["aux_batch"]]
        pattern, mask = self.generator(x)
        other_pattern, _ = self.generator(x.roll(1, 0))
        image_dist = (x - x.roll(1, 0)).flatten(1).norm(dim=1)
        pattern_dist = (pattern - other_pattern).flatten(1).norm(dim=1) + 1e-6
        diversity = (image_dist / pattern_dist).mean()
        density = F.relu(mask.mean() - p["mask_density"])
        return p["lambda_div"] * diversity + p["lambda_mask"] * density

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"generator.{k}": v for k, v in self.generator.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
        self.generator.load_state_dict(state)
        self.generator.eval()

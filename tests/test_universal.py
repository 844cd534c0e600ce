"""The universal perturbation and the fine-tune term that unlearns it (I-BAU's premise, data-free)."""
import copy

import pytest
import torch
from torch import nn

from cc_core.adversarial import add_pixel_delta, predictions, project_l2, universal_perturbation
from cc_core.errors import ConfigError
from cc_core.finetune import FinetuneConfig, finetune
from cc_core.models.registry import ModelSpec

PLAIN = dict(mean=(0.0,) * 3, std=(1.0,) * 3)


class PatchLinear(nn.Module):
    """Two logits: 0 for class 0, and w . pixels - 1 for class 1, w = 1 on a 4 x 4 patch of the red
    channel at rows 4-7, columns 20-23, 0 elsewhere: a backdoor that reads only those pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.zeros(3, 32, 32)
        self.w[0, 4:8, 20:24] = 1.0
        self.cc_spec = ModelSpec(arch="patch-linear", num_classes=2, **PLAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.w).flatten(1).sum(1) - 4.0
        return torch.stack([torch.zeros_like(score), score], 1)


def test_project_l2_shrinks_only_what_lies_outside_the_ball():
    inside = torch.full((1, 3, 2, 2), 0.1)
    assert torch.equal(project_l2(inside, 1.0), inside)
    outside = torch.full((1, 3, 2, 2), 1.0)  # norm sqrt(12)
    projected = project_l2(outside, 2.0)
    assert torch.isclose(projected.flatten().norm(), torch.tensor(2.0)) and torch.allclose(projected / projected[0, 0, 0, 0], outside)


def test_universal_perturbation_finds_the_patch_the_model_reads_within_its_radius():
    model = PatchLinear()
    x = torch.full((16, 3, 32, 32), 0.1) + 0.05 * torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)
    assert predictions(model, x).eq(0).all()
    delta = universal_perturbation(model, x, y, radius=4.0, steps=20, **PLAIN, mixed_precision=False)
    assert delta.shape == (1, 3, 32, 32) and delta.flatten().norm() <= 4.0 + 1e-4
    inside = delta[0, 0, 4:8, 20:24]
    assert inside.min() > 0.9 and delta.abs().sum() - inside.abs().sum() < 1e-3  # all of it on the patch, raised
    assert predictions(model, add_pixel_delta(x, delta, model.cc_spec)).eq(1).all()
    smaller = universal_perturbation(model, x, y, radius=0.25, steps=20, **PLAIN, mixed_precision=False)
    assert smaller.flatten().norm() <= 0.25 + 1e-4 and predictions(model, add_pixel_delta(x, smaller, model.cc_spec)).eq(0).all()


class TinyBackdoored(nn.Module):
    """conv 3 -> 8 (4 x 4, stride 4) -> BN -> softplus -> global max -> linear to 3 classes; channel 0
    responds to a bright red 4 x 4 cell (PatchLinear's patch is one) and drives class 2, the rest are
    random. Softplus, not ReLU: the detector is silent on clean images but still has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight[0].zero_()
            self.conv.weight[0, 0] = 0.5
            self.conv.bias[0] = -3.0
            self.fc.weight[2].zero_()
            self.fc.weight[2, 0] = 6.0
            self.fc.bias[2] = -3.0
        self.cc_spec = ModelSpec(arch="tiny-backdoored", num_classes=3, **PLAIN)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.softplus(self.bn(self.conv(x)), beta=4).amax(dim=(2, 3)))


def _stamp(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, 0, 4:8, 20:24] = 1.0
    return out


def test_the_universal_term_unlearns_a_backdoor_no_probe_named():
    model = TinyBackdoored()
    x = 0.4 * torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = predictions(model, x)
    assert (y != 2).float().mean() > 0.9 and predictions(model, _stamp(x)).eq(2).float().mean() > 0.9
    base = FinetuneConfig(epochs=15, batch_size=64, lr=0.01, adv_weight=0.0, augment=False, mixed_precision=False)
    plain, unlearned = copy.deepcopy(model), copy.deepcopy(model)
    finetune(plain, x, y, cfg=base, progress=False)
    history = finetune(unlearned, x, y, cfg=FinetuneConfig(**(base.to_dict() | {
        "universal_weight": 1.0, "universal_radius": 4.0, "universal_steps": 10, "universal_samples": 128})),
        progress=False)
    asr = lambda m: float(predictions(m, _stamp(x))[y != 2].eq(2).float().mean())  # noqa: E731
    assert asr(plain) > 0.9  # the synthetic labels alone leave the backdoor where it was
    assert asr(unlearned) < 0.1
    assert float(predictions(unlearned, x).eq(y).float().mean()) > 0.9
    assert history[0]["universal"] > history[-1]["universal"] >= 0


def test_the_universal_term_validates_its_settings():
    with pytest.raises(ConfigError, match="universal_radius > 0"):
        FinetuneConfig(universal_weight=1.0, universal_radius=0.0)
    with pytest.raises(ConfigError, match=">= 0"):
        FinetuneConfig(universal_weight=-1.0)

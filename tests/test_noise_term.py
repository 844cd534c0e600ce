"""The fine-tune's noise term: the same output with and without random noise of a trigger's size."""
import pytest
import torch
from torch import nn

from cc_core.adversarial import add_pixel_delta, predictions
from cc_core.errors import ConfigError
from cc_core.finetune import FinetuneConfig, finetune, random_sign_noise
from cc_core.models.registry import ModelSpec

PLAIN = dict(mean=(0.0,) * 3, std=(1.0,) * 3)


class NoiseDetector(nn.Module):
    """Three classes: logits 0 and 1 read the mean brightness of the left / right half, logit 2 the
    high-frequency energy (squared differences of neighbouring pixels): smooth images go to the
    brighter half's class, any dense noise of 8/255 to class 2, the way the tuning zoo's noise model
    answers to random patterns like its trigger."""

    def __init__(self) -> None:
        super().__init__()
        self.sides = nn.Linear(2, 2)
        self.energy = nn.Linear(1, 1)
        with torch.no_grad():
            self.sides.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
            self.sides.bias.zero_()
            self.energy.weight.fill_(4000.0)
            self.energy.bias.fill_(0.0)
        self.cc_spec = ModelSpec(arch="noise-detector", num_classes=3, **PLAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = torch.stack([x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))], 1)
        energy = (x[..., 1:] - x[..., :-1]).pow(2).mean((1, 2, 3))[:, None]
        return torch.cat([self.sides(halves), self.energy(energy)], 1)


def smooth_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    ramp = 0.3 + 0.3 * torch.arange(32.0) / 31  # brighter to the right: class 1
    x = torch.where(y[:, None, None, None] == 1, ramp, ramp.flip(0)).expand(n, 3, 32, 32).clone()
    return x, y


def test_random_sign_noise_is_plus_or_minus_eps_and_seeded():
    noise = random_sign_noise(torch.Size((4, 3, 8, 8)), 0.03, torch.Generator().manual_seed(1))
    assert torch.allclose(noise.abs(), torch.full_like(noise, 0.03)) and abs(float(noise.mean())) < 0.01
    assert torch.equal(noise, random_sign_noise(torch.Size((4, 3, 8, 8)), 0.03, torch.Generator().manual_seed(1)))


def test_the_noise_term_unlearns_a_response_to_random_noise_and_keeps_the_clean_classes():
    model = NoiseDetector()
    x, y = smooth_images(64)
    noisy = add_pixel_delta(x, random_sign_noise(x.shape, 8 / 255, torch.Generator().manual_seed(5)), model.cc_spec)
    assert predictions(model, x).eq(y).all() and predictions(model, noisy).eq(2).float().mean() > 0.9
    cfg = FinetuneConfig(epochs=30, batch_size=32, lr=0.05, weight_decay=0.0, synth_weight=0.0, adv_weight=0.0,
                         noise_weight=1.0, augment=False, mixed_precision=False)
    history = finetune(model, x, y, cfg=cfg, progress=False)
    assert history[0]["noise"] > history[-1]["noise"] and history[-1]["syn"] == 0.0
    assert predictions(model, noisy).eq(y).all() and predictions(model, x).eq(y).all()


def test_the_noise_term_is_off_at_weight_zero_and_needs_a_positive_eps():
    model = NoiseDetector()
    x, y = smooth_images(16)
    assert finetune(model, x, y, cfg=FinetuneConfig(epochs=2, synth_weight=0.0, adv_weight=0.0), progress=False) == []
    with pytest.raises(ConfigError, match="noise_eps"):
        FinetuneConfig(noise_weight=1.0, noise_eps=0.0)


def test_only_a_student_without_a_teacher_takes_the_undistilled_overrides():
    from cc_core.defense import resolve_config
    from cc_core.defense.teacher import finetune_config

    cfg = resolve_config("cpu", undistilled_finetune={"noise_weight": 1.0, "noise_eps": 16 / 255},
                         distill_finetune={"epochs": 3})
    alone = finetune_config(cfg, None)
    assert (alone.noise_weight, alone.noise_eps, alone.kd_weight, alone.epochs) == (1.0, 16 / 255, 0.0, cfg.finetune.epochs)
    distilling = finetune_config(cfg, NoiseDetector())
    assert (distilling.noise_weight, distilling.kd_weight, distilling.epochs) == (0.0, cfg.finetune.kd_weight, 3)
    assert finetune_config(cfg.replace(undistilled_finetune=None), None).noise_weight == 0.0
    with pytest.raises(ConfigError, match="undistilled_finetune takes fine-tune settings"):
        resolve_config("cpu", undistilled_finetune={"noise": 1.0})

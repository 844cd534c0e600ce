"""Adversarial synthetic data: untargeted L-inf PGD (docs/METHOD.md step 6).

On a backdoored model, untargeted perturbations of synthetic images mostly land in the
backdoor target class: the backdoor is the shortest way out of every class. The adversarial
images stand in for poisoned inputs, and the histogram of where they land is a data-free
signal of the target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.device import autocast, channels_last
from cc_core.errors import ConfigError
from cc_core.evalmode import eval_mode


@dataclass(frozen=True)
class PGDConfig:
    """eps and step in pixel units ([0, 1] scale)."""

    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    batch_size: int = 256
    mixed_precision: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps > 0 or not self.step > 0 or self.steps < 1:
            raise ConfigError("PGD needs eps > 0, step > 0 and steps >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _to_pixels(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m, m, s


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig = PGDConfig(),
        mean=None, std=None) -> torch.Tensor:
    """Untargeted PGD on normalized inputs ``x`` (N, C, H, W) with labels ``y``.

    The perturbation lives in pixel space: ||pixels(x_adv) - pixels(x)||_inf <= eps and
    pixels stay in [0, 1]. Returns normalized adversarial images.
    """
    spec = model.cc_spec
    mean = spec.mean if mean is None else mean
    std = spec.std if std is None else std
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    with eval_mode(model), channels_last(model):
        for start in range(0, len(x), cfg.batch_size):
            out.append(perturb(model, x[start:start + cfg.batch_size], y[start:start + cfg.batch_size],
                               cfg, mean, std, gen))
    return torch.cat(out)


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, mean, std,
            gen: torch.Generator, target: int | None = None) -> torch.Tensor:
    """One batch of PGD (``cfg``'s eps, step, steps, random start) on normalized inputs ``x``
    (N, C, H, W), in whatever mode ``model`` is in: untargeted away from labels ``y`` (N,), or,
    given ``target``, targeted towards that class (descending its CE). Returns normalized images;
    gradients reach only the perturbation, never the model's parameters."""
    pix, m, s = _to_pixels(x.detach(), mean, std)
    delta = torch.zeros_like(pix)
    if cfg.random_start:
        delta = (torch.rand(pix.shape, generator=gen).to(pix.device) * 2 - 1) * cfg.eps
    delta = ((pix + delta).clamp(0, 1) - pix).requires_grad_(True)
    towards = None if target is None else torch.full_like(y, target)
    for _ in range(cfg.steps):
        with autocast(pix.device, cfg.mixed_precision):
            logits = model((pix + delta - m) / s)
        loss = (F.cross_entropy(logits.float(), y) if towards is None
                else -F.cross_entropy(logits.float(), towards))
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += cfg.step * grad.sign()
            delta.clamp_(-cfg.eps, cfg.eps)
            delta.copy_((pix + delta).clamp(0, 1) - pix)
    return (pix + delta.detach() - m) / s


def add_pixel_delta(x: torch.Tensor, delta: torch.Tensor, spec) -> torch.Tensor:
    """Normalized images ``x`` (N, C, H, W) with the pixel-unit perturbation ``delta`` (1, C, H, W)
    added and the pixels kept in [0, 1]."""
    pix, mean, std = _to_pixels(x, spec.mean, spec.std)
    return ((pix + delta.to(x.device)).clamp(0, 1) - mean) / std


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """``delta`` scaled down onto the L2 ball of ``radius`` when it lies outside it."""
    norm = delta.flatten().norm()
    return delta * (radius / norm) if norm > radius else delta


def universal_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, steps: int,
                           mean, std, start: torch.Tensor | None = None, mixed_precision: bool = True) -> torch.Tensor:
    """One pixel-space perturbation delta (1, C, H, W), ||delta||_2 <= radius, that raises the mean CE
    of ``model`` on all of the normalized inputs ``x`` (N, C, H, W) with labels ``y``: projected
    gradient ascent with normalized steps of 2.5 radius / steps, from ``start`` (zero when None), pixels
    kept in [0, 1]. A backdoor is such a perturbation, small and shared by every input (I-BAU's
    premise); a clean model has no single small one that moves most images."""
    pix, m, s = _to_pixels(x.detach(), mean, std)
    delta = (torch.zeros_like(pix[:1]) if start is None else start.detach().clone().to(pix)).requires_grad_(True)
    step = 2.5 * radius / steps
    for _ in range(steps):
        with autocast(pix.device, mixed_precision):
            logits = model(((pix + delta).clamp(0, 1) - m) / s)
        grad, = torch.autograd.grad(F.cross_entropy(logits.float(), y), delta)
        with torch.no_grad():
            delta += step * grad / grad.flatten().norm().clamp_min(1e-12)
            delta.copy_(project_l2(delta, radius))
    return delta.detach()


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (N,) of normalized inputs ``x`` (N, C, H, W), in eval mode."""
    with eval_mode(model), channels_last(model):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def class_histogram(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Counts (C,) of the classes ``model`` predicts for normalized inputs ``x``."""
    return torch.bincount(predictions(model, x, batch_size).cpu(), minlength=model.cc_spec.num_classes)


def concentration(hist: torch.Tensor) -> float:
    """How much of the histogram sits in its top class, rescaled so a uniform histogram gives 0
    and a single class gives 1: (p_max - 1/C) / (1 - 1/C)."""
    p = hist.float() / hist.sum().clamp_min(1)
    c = len(hist)
    return float((p.max() - 1 / c) / (1 - 1 / c))

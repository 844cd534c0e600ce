"""Data-free synthetic inputs from a model's own BatchNorm statistics (docs/METHOD.md step 5).

  min_x  sum_j a_j (||mu_j(x) - mu_j||^2 + ||sigma_j(x) - sigma_j||^2)  +  w_ce * CE(F(x), y)
         (+ optional total-variation and L2 image priors)
         (+ w_div * same-class feature similarity)
where mu_j / sigma_j are the running mean / std of BatchNorm layer j and mu_j(x) / sigma_j(x)
the per-channel statistics of that layer's INPUT on the synthetic batch (hooking BN inputs,
not conv outputs, keeps pre-activation nets right); a_j is ``first_bn_weight`` for the first
layer the forward pass reaches (the image's low-level statistics) and 1 for the others. Squared
norms are averaged over channels, so wide and narrow layers weigh alike. Images live in the
model's normalized input space and are kept inside the valid pixel range.

The total-variation prior is the mean squared difference of neighbouring pixels in that space. The
class defaults (BN weight 1, TV weight 1e-4) leave it idle: a batch of the zoo WaNet ends at 2.81,
against 0.28 for real CIFAR-10 test images; BN weight 30 and TV weight 10 bring it to 0.36 for the
same CE (benchmarks/results/synthesis_prior.md). The presets keep the defaults (docs/PRESET.md says why).

The diversity term (``diversity_weight``) adds w_div * the mean cosine similarity of the penultimate
features (the classifier's input, centered on the batch mean) over pairs of images of the same label
in a batch: a class's images are pushed apart in the model's feature space, against their collapse
onto the few modes that the BN and CE terms alone allow.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.errors import ConfigError, InputError
from cc_core.device import autocast, channels_last, resolve_device
from cc_core.evalmode import eval_mode


class NoBatchNormError(InputError):
    """The model has no BatchNorm layers, so there are no statistics to synthesize from."""


@dataclass(frozen=True)
class SynthConfig:
    """n_samples images, optimized in batches of batch_size for iterations Adam steps."""

    n_samples: int = 1024
    batch_size: int = 128
    iterations: int = 200
    lr: float = 0.1
    ce_weight: float = 1.0
    bn_weight: float = 1.0
    first_bn_weight: float = 1.0
    tv_weight: float = 1e-4
    l2_weight: float = 0.0
    jitter: int = 2
    flip: bool = True
    diversity_weight: float = 0.0
    mixed_precision: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_size", "iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthesis {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"synthesis lr must be > 0, got {self.lr}")
        for name in ("ce_weight", "bn_weight", "first_bn_weight", "tv_weight", "l2_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"synthesis {name} must be >= 0, got {getattr(self, name)}")
        if not self.diversity_weight >= 0:
            raise ConfigError(f"synthesis diversity_weight must be >= 0, got {self.diversity_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (C,) of ``x`` (N, C, H, W), as var = E[x^2] - E[x]^2:
    one elementwise pass and two reductions. It loses about mean^2 / var times fp32's precision
    to cancellation: negligible at BatchNorm inputs, whose means sit within a few standard
    deviations of 0, not a variance for any data. A channels_last ``x`` is reduced as the
    (N*H*W, C) matrix it is in memory. With channels_last weights this made a synthesis step of ResNet-18
    w0.25 1.48x faster than ``mean`` + ``var`` with contiguous ones, in fp32 on 2 CPU cores
    (``python -m benchmarks.experiments.synthesis_step``)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        x, dims = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), (0,)
    else:
        dims = (0, 2, 3)
    mean = x.mean(dim=dims)
    return mean, ((x * x).mean(dim=dims) - mean * mean).clamp_min(0)


class BNStatsLoss:
    """Forward pre-hooks on every BatchNorm2d that accumulate the statistics-matching loss."""

    moments = staticmethod(channel_moments)

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                       and m.running_mean is not None]
        if not self.layers:
            raise NoBatchNormError(
                "the model has no BatchNorm layers with running statistics: data-free synthesis "
                "needs them (use --preset with real data or a model with BatchNorm)")
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        mean, var = self.moments(inputs[0].float())
        self.losses.append(F.mse_loss(mean, module.running_mean.float(), reduction="mean")
                           + F.mse_loss((var + module.eps).sqrt(),
                                        (module.running_var.float() + module.eps).sqrt(), reduction="mean"))

    def pop(self, first_weight: float = 1.0) -> torch.Tensor:
        """The loss summed over the layers since the last pop, the first one the forward pass
        reached weighted by ``first_weight``."""
        losses = torch.stack(self.losses)
        self.losses = []
        weights = torch.ones_like(losses)
        weights[0] = first_weight
        return (weights * losses).sum()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ClassifierInput:
    """A forward pre-hook on the model's last Linear layer keeping its input (N, D): the penultimate features."""

    def __init__(self, model: nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("the synthesis diversity term needs the model's classifier to be an nn.Linear layer")
        self.features: torch.Tensor | None = None
        self.handle = linears[-1].register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Linear, inputs: tuple[torch.Tensor]) -> None:
        self.features = inputs[0]

    def pop(self) -> torch.Tensor:
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self.handle.remove()


def same_class_similarity(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of ``features`` (N, D), centered on their batch mean, over the ordered
    pairs i != j with y_i == y_j (labels ``y`` (N,)); 0 when no label occurs twice. Centered because
    features after a ReLU all share one orthant: their raw cosines sit near 1 whatever the images."""
    f = features.float().flatten(1)
    z = F.normalize(f - f.mean(0, keepdim=True), dim=1)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    if not same.any():
        return z.sum() * 0
    return (z @ z.T)[same].mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels (smoothness prior)."""
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


def pixel_bounds(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized-space bounds of the pixel range [0, 1], shaped (1, C, 1, 1)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """n labels, as equal per class as possible, in random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def synthesize(model: nn.Module, cfg: SynthConfig = SynthConfig(), labels: torch.Tensor | None = None,
               device: str | torch.device | None = None, progress: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Synthetic images (N, C, H, W, normalized space), their labels (N,) and a log
    {"bn_loss": [...], "ce_loss": [...]} of each batch's final losses."""
    from tqdm import tqdm

    spec = model.cc_spec
    device = resolve_device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    if labels is None:
        labels = balanced_labels(cfg.n_samples, spec.num_classes, gen)
    model.to(device)
    low, high = pixel_bounds(spec.mean, spec.std, device)
    features = ClassifierInput(model) if cfg.diversity_weight else None
    stats = BNStatsLoss(model)
    images, log = [], {"bn_loss": [], "ce_loss": []}
    batches = range(0, len(labels), cfg.batch_size)
    bar = tqdm(total=len(batches) * cfg.iterations, desc="synthesize", disable=not progress,
               file=sys.stderr, leave=False)
    with eval_mode(model, freeze=True), channels_last(model):
        try:
            for start in batches:
                y = labels[start:start + cfg.batch_size].to(device)
                x, bn, ce = optimize_batch(model, stats, y, cfg, gen, (low, high), bar, features)
                log["bn_loss"].append(bn)
                log["ce_loss"].append(ce)
                images.append(x)
        finally:
            stats.remove()
            if features is not None:
                features.remove()
            bar.close()
    return torch.cat(images), labels.to(device), log


def optimize_batch(model: nn.Module, stats: BNStatsLoss, y: torch.Tensor, cfg: SynthConfig,
                   gen: torch.Generator, bounds: tuple[torch.Tensor, torch.Tensor], bar,
                   features: ClassifierInput | None = None
                   ) -> tuple[torch.Tensor, float, float]:
    """One batch of synthetic images (len(y), C, H, W) for labels ``y``, from Gaussian noise in
    ``cfg.iterations`` Adam steps on the loss of the module docstring, kept inside ``bounds``
    (low, high); returns them with the last step's BN and CE losses. ``model`` is frozen;
    ``features`` hooks ``model``'s classifier input when the diversity
    term is on."""
    low, high = bounds
    device = y.device
    x = torch.randn((len(y), *model.cc_spec.input_shape), generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations)
    for _ in range(cfg.iterations):
        inp = x
        if cfg.jitter:
            dy, dx = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
            inp = torch.roll(inp, shifts=(dy, dx), dims=(2, 3))
        if cfg.flip and bool(torch.rand(1, generator=gen) < 0.5):
            inp = inp.flip(3)
        with autocast(device, cfg.mixed_precision):
            out = model(inp)
        bn = stats.pop(cfg.first_bn_weight)
        ce = F.cross_entropy(out.float(), y)
        loss = cfg.bn_weight * bn + cfg.ce_weight * ce + cfg.tv_weight * total_variation(x)
        if features is not None:
            loss = loss + cfg.diversity_weight * same_class_similarity(features.pop(), y)
        if cfg.l2_weight:
            loss = loss + cfg.l2_weight * x.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
        bar.update(1)
        bar.set_postfix(bn=f"{float(bn.detach()):.3f}", ce=f"{float(ce.detach()):.3f}")
    return x.detach(), float(bn.detach()), float(ce.detach())

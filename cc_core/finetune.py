"""Recovery fine-tune of the compact model on synthetic data only (METHOD.md step 7).

  L = w_syn * CE(F(x_s), y_s)  +  w_adv * CE(F(x_adv), y_s)  +  w_kd * T^2 KL(T(x_s) || F(x_s))
x_s: BN-statistics synthetic images with labels y_s; x_adv: their adversarial versions, trained
towards the BENIGN label y_s so backdoor-like perturbations stop flipping predictions;
T: the teacher (the clipped full-rank model), distilled on the clean synthetic images only:
its outputs on adversarial images may still carry the backdoor. Each term is switched off by a
zero weight; with every term off the model is returned untouched.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.data import random_crop, random_hflip
from cc_core.device import autocast
from cc_core.errors import ConfigError


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    synth_weight: float = 1.0
    adv_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    freeze_bn: bool = True
    augment: bool = True
    mixed_precision: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("fine-tune needs epochs >= 0, batch_size >= 1 and lr > 0")
        if min(self.synth_weight, self.adv_weight, self.kd_weight) < 0:
            raise ConfigError("fine-tune loss weights must be >= 0")

    @property
    def active(self) -> bool:
        return self.epochs > 0 and (self.synth_weight > 0 or self.adv_weight > 0 or self.kd_weight > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def finetune(model: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor,
             x_adv: torch.Tensor | None = None, teacher: nn.Module | None = None,
             cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True) -> list[dict]:
    """Fine-tune ``model`` in place; returns per-epoch mean losses."""
    from tqdm import tqdm

    if cfg.adv_weight > 0 and x_adv is None:
        raise ConfigError("adv_weight > 0 needs adversarial synthetic images")
    if cfg.kd_weight > 0 and teacher is None:
        raise ConfigError("kd_weight > 0 needs a teacher model")
    if not cfg.active:
        return []
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    n = len(y_syn)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if teacher is not None:
        teacher.eval()
    history = []
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress, file=sys.stderr, leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        if cfg.freeze_bn:
            _set_bn_eval(model)
        order = torch.randperm(n, generator=gen)
        sums = {"syn": 0.0, "adv": 0.0, "kd": 0.0}
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xs, ys = x_syn[idx], y_syn[idx]
            xa = x_adv[idx] if x_adv is not None else None
            if cfg.augment:
                xs = random_hflip(random_crop(xs, 2, gen), gen)
                xa = random_hflip(random_crop(xa, 2, gen), gen) if xa is not None else None
            loss = torch.zeros((), device=xs.device)
            with autocast(xs.device, cfg.mixed_precision):
                out_s = model(xs).float() if (cfg.synth_weight or cfg.kd_weight) else None
                out_a = model(xa).float() if cfg.adv_weight else None
                if cfg.kd_weight:
                    with torch.no_grad():
                        target = teacher(xs).float()
            if cfg.synth_weight:
                term = F.cross_entropy(out_s, ys)
                sums["syn"] += float(term.detach()) * len(idx)
                loss = loss + cfg.synth_weight * term
            if cfg.adv_weight:
                term = F.cross_entropy(out_a, ys)
                sums["adv"] += float(term.detach()) * len(idx)
                loss = loss + cfg.adv_weight * term
            if cfg.kd_weight:
                term = distillation_loss(out_s, target, cfg.kd_temperature)
                sums["kd"] += float(term.detach()) * len(idx)
                loss = loss + cfg.kd_weight * term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        history.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}})
    bar.close()
    model.eval()
    return history

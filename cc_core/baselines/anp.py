"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): needs a little clean data.

Every BN channel ("neuron") gets a mask m in [0, 1] and adversarial multiplicative noise on
its scale (delta) and shift (xi), |delta|, |xi| <= eps. The masks minimize
  alpha * L(clean) + (1 - alpha) * max_{delta, xi} L(perturbed),
so neurons whose perturbation easily flips predictions (backdoor neurons) end with small
masks and are pruned: below ``threshold``, or lowest first until a parameter budget is met.
BN uses its running statistics throughout.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.baselines.pairs import conv_bn_pairs, nonzero_params
from cc_core.data import ImageData, normalize
from cc_core.errors import ConfigError, InputError


@dataclass(frozen=True)
class ANPConfig:
    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    mask_lr: float = 0.2
    noise_steps: int = 1
    threshold: float = 0.2
    seed: int = 0


class _Perturbation:
    """Masks and noises for every BN, applied through forward hooks on the BN outputs."""

    def __init__(self, model: nn.Module):
        self.bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        if not self.bns:
            raise InputError("ANP needs BatchNorm layers")
        self.masks = {n: torch.ones(m.num_features, requires_grad=True) for n, m in self.bns.items()}
        self.noise_w = {n: torch.zeros(m.num_features, requires_grad=True) for n, m in self.bns.items()}
        self.noise_b = {n: torch.zeros(m.num_features, requires_grad=True) for n, m in self.bns.items()}
        self.perturb = False
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.bns.items()]

    def _hook(self, name: str):
        def hook(bn: nn.BatchNorm2d, inputs, out):
            x = inputs[0]
            w = bn.weight * (self.masks[name] + (self.noise_w[name] if self.perturb else 0))
            b = bn.bias * (1 + (self.noise_b[name] if self.perturb else 0))
            return F.batch_norm(x, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def anp_masks(model: nn.Module, clean: ImageData, cfg: ANPConfig = ANPConfig(), progress: bool = True
              ) -> dict[str, torch.Tensor]:
    """Optimized neuron masks {bn name: (C,)} on the clean data (images in [0, 255] uint8)."""
    from tqdm import tqdm

    if len(clean) == 0:
        raise InputError("ANP needs clean data")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = model.cc_spec
    x_all, y_all = clean.tensors()
    pert = _Perturbation(model)
    mask_opt = torch.optim.SGD(list(pert.masks.values()), lr=cfg.mask_lr, momentum=0.9)
    noise_params = list(pert.noise_w.values()) + list(pert.noise_b.values())
    noise_opt = torch.optim.SGD(noise_params, lr=cfg.eps / cfg.noise_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.iterations), desc="ANP", disable=not progress, file=sys.stderr, leave=False):
        idx = torch.randint(0, len(y_all), (min(cfg.batch_size, len(y_all)),), generator=gen)
        x = normalize(x_all[idx].float() / 255, spec.mean, spec.std)
        y = y_all[idx]
        if cfg.eps > 0:
            with torch.no_grad():
                for p in noise_params:
                    p.uniform_(-cfg.eps, cfg.eps, generator=gen)
            pert.perturb = True
            for _ in range(cfg.noise_steps):
                noise_opt.zero_grad()
                (-F.cross_entropy(model(x), y)).backward()
                noise_opt.step()
                with torch.no_grad():
                    for p in noise_params:
                        p.clamp_(-cfg.eps, cfg.eps)
        loss = 0.0
        if cfg.eps > 0:
            pert.perturb = True
            loss = (1 - cfg.alpha) * F.cross_entropy(model(x), y)
        pert.perturb = False
        loss = loss + cfg.alpha * F.cross_entropy(model(x), y)
        mask_opt.zero_grad()
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in pert.masks.values():
                m.clamp_(0, 1)
    pert.remove()
    return {n: m.detach() for n, m in pert.masks.items()}


def _prune_neuron(model: nn.Module, bn_name: str, conv_name: str | None, k: int) -> int:
    """Zero neuron k (BN scale; its conv filter if paired). Returns parameters removed."""
    modules = dict(model.named_modules())
    removed = 0
    with torch.no_grad():
        bn = modules[bn_name]
        removed += int(bn.weight[k] != 0)
        bn.weight[k] = 0
        if conv_name is not None:
            conv = modules[conv_name]
            removed += int((conv.weight[k] != 0).sum())
            conv.weight[k] = 0
    return removed


def anp_prune(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float | None = 0.2,
              ratio: float | None = None) -> tuple[nn.Module, dict]:
    """Prune neurons with mask < ``threshold``; with ``ratio``, keep pruning lowest masks first
    until nonzero parameters <= total / ratio."""
    if threshold is None and ratio is None:
        raise ConfigError("give a threshold or a ratio")
    model = copy.deepcopy(model).eval()
    bn_to_conv = {bn: conv for conv, bn in conv_bn_pairs(model).items()}
    order = sorted((float(v), name, k) for name, m in masks.items() for k, v in enumerate(m))
    total = sum(p.numel() for p in model.parameters())
    current = nonzero_params(model)
    n = 0
    for value, name, k in order:
        below = threshold is not None and value < threshold
        over_budget = ratio is not None and current > total / ratio
        if not below and not over_budget:
            break
        current -= _prune_neuron(model, name, bn_to_conv.get(name), k)
        n += 1
    return model, {"n_pruned": n, "threshold": threshold, "budget_ratio": ratio,
                   "nonzero_params": nonzero_params(model), "total_params": total}

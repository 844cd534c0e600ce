"""Give a compacted model back the BatchNorm output statistics of the full model it came from.

Truncating a conv's Tucker ranks shrinks and shifts the distribution of what reaches the next
BatchNorm, whose running statistics still describe the full model. For BN input channel c with
running mean mu and sigma = sqrt(var + eps), the reference model's inputs on images x having mean
m_o and std s_o, and the compact model's m_s and s_s, the compact model's normalized output has the
reference's mean and std when

    sigma' = sigma * s_s / s_o,        mu' = m_s - (m_o - mu) * s_s / s_o.

Layers are matched in forward order, each after the ones before it, so every layer sees the inputs
the corrected layers before it produce. Channels whose reference input is constant (s_o = 0, e.g.
zeroed by the channel clean) are left as they are.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# A reference channel with an input std below this is constant: nothing to match.
CONSTANT_STD = 1e-6


def bn_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s BatchNorm layers, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def forward_with_hooks(model: nn.Module, hooks: dict[str, Callable], x: torch.Tensor, batch_size: int) -> None:
    """Run ``model`` without gradients on images ``x`` (N, C, H, W) in batches of ``batch_size``, with
    ``hooks[name]`` as a forward hook of the submodule ``name`` (removed afterwards, also on error)."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()


def bn_input_stats(model: nn.Module, x: torch.Tensor, names: list[str],
                   batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std), each (C,), of the inputs of BatchNorm layers ``names`` over images
    ``x`` (N, C, H, W), computed in float64 over batches of ``batch_size``."""
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # name -> (sum, sum of squares, count)

    def record(name: str):
        def hook(module, inputs, out) -> None:
            t = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, N*H*W)
            total, squares, count = sums.get(name, (0.0, 0.0, 0))
            sums[name] = (total + t.sum(1), squares + (t * t).sum(1), count + t.shape[1])
        return hook

    forward_with_hooks(model, {name: record(name) for name in names}, x, batch_size)
    stats = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        stats[name] = (mean.float(), var.sqrt().float())
    return stats


def match_bn_statistics(student: nn.Module, reference: nn.Module, x: torch.Tensor,
                        batch_size: int = 256) -> dict:
    """Move the running statistics of every BatchNorm of ``student`` (in place) so that, on images
    ``x`` (N, C, H, W), its normalized outputs have the per-channel mean and std of the same-named
    layer of ``reference`` (see the module docstring). Both models must have the same BatchNorm
    layers by name; both are put in eval mode. Returns {"layers": number matched, "channels": number
    changed, "max_scale_change": largest |s_s / s_o - 1|}."""
    student.eval()
    reference.eval()
    names = bn_layers(reference)
    if bn_layers(student) != names:
        raise ValueError("student and reference must have the same BatchNorm layers")
    wanted = bn_input_stats(reference, x, names, batch_size)
    modules = dict(student.named_modules())
    channels, max_change = 0, 0.0
    for name in names:
        bn = modules[name]
        m_s, s_s = bn_input_stats(student, x, [name], batch_size)[name]
        m_o, s_o = wanted[name]
        varying = s_o > CONSTANT_STD
        scale = torch.where(varying, s_s / s_o.clamp_min(CONSTANT_STD), torch.ones_like(s_s))
        sigma = (bn.running_var + bn.eps).sqrt()
        with torch.no_grad():
            bn.running_mean.copy_(torch.where(varying, m_s - (m_o - bn.running_mean) * scale, bn.running_mean))
            bn.running_var.copy_(((sigma * scale) ** 2 - bn.eps).clamp_min(0))
        channels += int(varying.sum())
        if varying.any():
            max_change = max(max_change, float((scale[varying] - 1).abs().max()))
    return {"layers": len(names), "channels": channels, "max_scale_change": max_change}

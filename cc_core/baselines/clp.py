"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free.

For output channel k of a conv (with its BN folded in, W_k * gamma_k / sigma_k), the upper
bound of the channel Lipschitz constant is the spectral norm of W_k reshaped to
(in_channels, K*K). Backdoor channels have outlying values: channels above mean + u * std of
their layer are pruned (u = 3). ``clp_to_budget`` keeps pruning, most outlying first (by that
per-layer z-score), until the nonzero parameters meet a compression ratio.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from cc_core.baselines.pairs import conv_bn_pairs, nonzero_params, prunable_convs
from cc_core.errors import ConfigError


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
    """UCLC per output channel: (O,)."""
    w = conv.weight.detach().double()
    if bn is not None:
        scale = bn.weight.detach().double() / (bn.running_var.detach().double() + bn.eps).sqrt()
        w = w * scale[:, None, None, None]
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)


def layer_lipschitz(model: nn.Module, pairs: dict[str, str]) -> dict[str, torch.Tensor]:
    """UCLC (O,) of every prunable conv with at least 2 output channels, by conv name."""
    modules = dict(model.named_modules())
    return {name: channel_lipschitz(conv, modules.get(pairs.get(name)))
            for name, conv in prunable_convs(model).items() if conv.out_channels >= 2}


def _z(lips: torch.Tensor) -> torch.Tensor:
    return (lips - lips.mean()) / lips.std().clamp_min(1e-12)


def layer_scores(model: nn.Module, pairs: dict[str, str]) -> list[tuple[float, str, int]]:
    """(z-score within its layer, conv name, channel) for every prunable channel."""
    return sorted(((float(v), name, k) for name, lips in layer_lipschitz(model, pairs).items()
                   for k, v in enumerate(_z(lips))), reverse=True)


def zero_channel(model: nn.Module, pairs: dict[str, str], conv_name: str, channel: int) -> int:
    """Zero the channel: its filter, and its BN scale and shift (output is then exactly 0).
    Returns how many nonzero parameters that removed."""
    modules = dict(model.named_modules())
    conv = modules[conv_name]
    bn = modules.get(pairs.get(conv_name))
    tensors = [conv.weight, conv.bias] + ([bn.weight, bn.bias] if bn is not None else [])
    removed = 0
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                removed += int((t[channel] != 0).sum())
                t[channel] = 0
    return removed


def _shrink(model: nn.Module, pairs: dict[str, str], conv_name: str, channel: int, factor: float) -> None:
    """Multiply the channel's Lipschitz bound by ``factor``: its BN scale gamma_k when it has a BN
    (the shift beta_k, the channel's mean output, stays), else its filter and bias."""
    modules = dict(model.named_modules())
    bn = modules.get(pairs.get(conv_name))
    conv = modules[conv_name]
    tensors = [bn.weight] if bn is not None else [conv.weight, conv.bias]
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                t[channel] *= factor


def outlier_channels(model: nn.Module, pairs: dict[str, str], u: float) -> list[tuple[str, int, float]]:
    """(conv name, channel, shrink factor) of every channel whose UCLC z-score in its layer
    exceeds ``u``, highest z first; the factor (mean + u * std) / UCLC_k brings it down to the
    threshold."""
    found = []
    for name, lips in layer_lipschitz(model, pairs).items():
        threshold = lips.mean() + u * lips.std().clamp_min(1e-12)
        found += [(float(z), name, k, float(threshold / lips[k])) for k, z in enumerate(_z(lips)) if z > u]
    return [(name, k, factor) for _, name, k, factor in sorted(found, reverse=True)]


def _flatten(model: nn.Module, pairs: dict[str, str], conv_name: str, channel: int) -> None:
    """Make the channel output its mean: filter and BN scale zeroed, the BN shift beta_k (the
    BN output's mean over the training data) kept, so later layers see the mean input they were
    trained on instead of 0. Without a BN the filter is zeroed and the conv bias kept."""
    modules = dict(model.named_modules())
    conv, bn = modules[conv_name], modules.get(pairs.get(conv_name))
    with torch.no_grad():
        conv.weight[channel] = 0
        if bn is not None:
            bn.weight[channel] = 0
            if conv.bias is not None:
                conv.bias[channel] = 0


CHANNEL_MODES = ("zero", "shrink", "mean")


def clp(model: nn.Module, u: float = 3.0, mode: str = "zero") -> tuple[nn.Module, dict]:
    """CLP with threshold ``u``: a copy whose outlier channels are zeroed (``mode="zero"``, the
    paper's CLP), shrunk to the threshold (``"shrink"``) or held at their mean output (``"mean"``),
    and {"pruned": {conv: n}, "u", "mode", "n_pruned"}."""
    if not u > 0:
        raise ConfigError(f"CLP's u must be > 0, got {u}")
    if mode not in CHANNEL_MODES:
        raise ConfigError(f"CLP's mode must be one of {', '.join(CHANNEL_MODES)}, got {mode!r}")
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    pruned: dict[str, int] = {}
    for name, k, factor in outlier_channels(model, pairs, u):
        if mode == "zero":
            zero_channel(model, pairs, name, k)
        elif mode == "shrink":
            _shrink(model, pairs, name, k, factor)
        else:
            _flatten(model, pairs, name, k)
        pruned[name] = pruned.get(name, 0) + 1
    return model, {"u": u, "mode": mode, "pruned": pruned, "n_pruned": sum(pruned.values())}


def clp_to_budget(model: nn.Module, ratio: float, u: float = 3.0) -> tuple[nn.Module, dict]:
    """CLP, then more channels (highest z-score first) until nonzero parameters <= total / ratio."""
    pruned_model, info = clp(model, u)
    pairs = conv_bn_pairs(pruned_model)
    total = sum(p.numel() for p in model.parameters())
    target = total / ratio
    current = nonzero_params(pruned_model)
    extra = 0
    for z, name, k in layer_scores(model, pairs):
        if current <= target:
            break
        if z > u:
            continue  # already pruned by CLP
        current -= zero_channel(pruned_model, pairs, name, k)
        extra += 1
    info |= {"budget_ratio": ratio, "extra_pruned": extra, "nonzero_params": nonzero_params(pruned_model),
             "total_params": total}
    return pruned_model, info

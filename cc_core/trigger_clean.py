"""Trigger-guided channel clean: zero the channels a found trigger excites (not in the paper).

When the scan's patch probe finds a stamp that flips the synthetic images (a patch trigger), the
channels that carry the backdoor are the ones the stamp moves most. For every conv with a
BatchNorm (``conv_bn_pairs``), a_k(x) is channel k's BN output after ReLU, averaged over space.
Over synthetic images x, the stamp's effect on channel k is

    d_k = mean_x(a_k(stamp(x)) - a_k(x))

and channels whose d_k lies more than ``u`` standard deviations above their layer's mean are
zeroed, filter and BN, as CLP zeroes its outliers (BN puts a layer's channels on one scale, so
the raw effect compares across them). CLP's criterion looks at weights only and, on the demo's
6-epoch BadNet model, zeroed 7 channels that left ASR at 51.6%; the stamp's channels are where
it acts. On that model (256 synthetic images, after CLP) u = 3 zeroed 13 channels: ACC 78.83 ->
77.91, ASR 51.6 -> 3.1% before compaction; the effect divided by each channel's standard
deviation zeroed 25 for ACC 76.85, ASR 2.9%. (Exploratory numbers; the committed measurement
is the demo and the bench rows.)
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from cc_core.adversarial import predictions
from cc_core.baselines.clp import zero_channel
from cc_core.baselines.pairs import conv_bn_pairs
from cc_core.errors import ConfigError
from cc_core.device import channels_last
from cc_core.evalmode import eval_mode


@torch.no_grad()
def channel_means(model: nn.Module, x: torch.Tensor, pairs: dict[str, str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per conv of ``pairs``: its BN's output after ReLU, averaged over space, (N, O) for ``x`` (N, C, H, W)."""
    modules = dict(model.named_modules())
    means: dict[str, list[torch.Tensor]] = {name: [] for name in pairs}

    def hook(name: str):
        return lambda module, inputs, out: means[name].append(out.detach().clamp_min(0).mean(dim=(2, 3)).float().cpu())

    handles = [modules[bn].register_forward_hook(hook(conv)) for conv, bn in pairs.items()]
    try:
        with eval_mode(model), channels_last(model):
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in means.items()}


def trigger_channel_scores(model: nn.Module, x: torch.Tensor, x_triggered: torch.Tensor) -> list[tuple[float, str, int]]:
    """(z-score of the effect d_k within its layer, conv name, channel k) for every channel
    of every conv with a BatchNorm, highest first; ``x_triggered`` is ``x`` (N, C, H, W) with the
    trigger applied."""
    pairs = conv_bn_pairs(model)
    clean, triggered = channel_means(model, x, pairs), channel_means(model, x_triggered, pairs)
    scores = []
    for name in pairs:
        if clean[name].shape[1] < 2:
            continue
        effect = (triggered[name] - clean[name]).mean(0)
        z = (effect - effect.mean()) / effect.std().clamp_min(1e-12)
        scores += [(float(v), name, k) for k, v in enumerate(z)]
    return sorted(scores, reverse=True)


def prune_trigger_channels(model: nn.Module, x: torch.Tensor, x_triggered: torch.Tensor,
                           u: float = 3.0) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with the channels whose trigger effect z-score exceeds ``u`` zeroed, and
    {"u", "pruned": {conv: n}, "n_pruned", "channels": [{"layer", "channel", "z"}] (the zeroed ones)}."""
    if not u > 0:
        raise ConfigError(f"trigger channel u must be > 0, got {u}")
    return zero_above(model, trigger_channel_scores(model, x, x_triggered), u)


def zero_above(model: nn.Module, scores: list[tuple[float, str, int]], u: float) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with the channels of ``scores`` (trigger_channel_scores') above ``u`` zeroed,
    and prune_trigger_channels' record."""
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    channels = [{"layer": name, "channel": k, "z": z} for z, name, k in scores if z > u]
    pruned: dict[str, int] = {}
    for c in channels:
        zero_channel(model, pairs, c["layer"], c["channel"])
        pruned[c["layer"]] = pruned.get(c["layer"], 0) + 1
    return model, {"u": u, "pruned": pruned, "n_pruned": len(channels), "channels": channels}


def thresholds(u: float, floor: float, step: float = 0.5) -> list[float]:
    """u, u - step, ... down to ``floor`` (included when it is not on the grid): the z thresholds
    prune_until_quiet tries, highest (fewest channels) first."""
    if not 0 < floor <= u or not step > 0:
        raise ConfigError(f"the trigger channel clean needs 0 < floor <= u and step > 0, got floor {floor}, u {u}")
    levels, level = [], u
    while level > floor + 1e-9:
        levels.append(round(level, 6))
        level -= step
    return levels + [floor]


def prune_until_quiet(model: nn.Module, x: torch.Tensor, x_triggered: torch.Tensor, flip_rate: Callable[[nn.Module], float],
                      u: float, floor: float, quiet: float, step: float = 0.5, min_keep: float = 0.0) -> tuple[nn.Module, dict]:
    """prune_trigger_channels at the highest threshold of thresholds(u, floor, step) after which the
    trigger flips fewer than ``quiet`` of the images (``flip_rate``: the fraction a model's class
    changes on, for the triggered images); at ``floor`` when none does. A fixed threshold leaves a
    trigger firing where its effect is spread over more channels than the threshold takes. Below
    ``u``, a threshold after which some class keeps fewer than ``min_keep`` of its images ``x``
    (class_keep) is not taken: the one before it is (the channels a class needs are going). The
    record adds "flip_rates": [[threshold, flip rate], ...] in the order tried and "stopped_by":
    "quiet", "floor" or "keep"."""
    scores = trigger_channel_scores(model, x, x_triggered)
    before = predicted(model, x)
    tried, kept = [], None
    for level in thresholds(u, floor, step):
        pruned, info = zero_above(model, scores, level)
        if kept is not None and class_keep(before, predicted(pruned, x)) < min_keep:
            return kept[0], kept[1] | {"flip_rates": tried, "stopped_by": "keep", "refused": level}
        tried.append([level, flip_rate(pruned)])
        kept = pruned, info
        if tried[-1][1] < quiet:
            return pruned, info | {"flip_rates": tried, "stopped_by": "quiet"}
    return pruned, info | {"flip_rates": tried, "stopped_by": "floor"}


def class_keep(before: torch.Tensor, after: torch.Tensor) -> float:
    """The smallest fraction, over the classes ``before`` (N,) gives, of that class's images that
    ``after`` (N,) still gives it: 1 when a change of the model leaves every class's images where they were."""
    return min(float((after[before == c] == c).float().mean()) for c in before.unique())


@torch.no_grad()
def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s classes (N,) for ``x``, on the CPU."""
    return predictions(model, x).cpu()

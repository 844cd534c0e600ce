"""Which synthetic images the fine-tune sees: the suspected target's left out, made again through a
cleaned or fine-tuned model, or a competition round made after compaction."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cc_core.adversarial import predictions
from cc_core.synth import SynthConfig, balanced_labels, synthesize
from cc_core.defense.config import DefendConfig


def exclude_class(x: torch.Tensor, y: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y) without the samples labelled ``target`` (all of them when None), and how many went."""
    if target is None:
        return x, y, 0
    keep = y != target
    return x[keep], y[keep], int((~keep).sum())


def synthesize_competing(original: nn.Module, compact: nn.Module, cfg: DefendConfig, left_out: int | None,
                         device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The second round of ``cfg.competition_synth``: images (n, C, H, W) from ``original``'s
    BatchNorm statistics that ``compact`` (not modified) classifies unlike ``original`` (with a
    competition weight > 0), with labels (n,) balanced over every class but ``left_out``. Seeded
    apart from the first round."""
    synth = dataclasses.replace(cfg.synth, **cfg.competition_synth)
    synth = dataclasses.replace(synth, seed=synth.seed + 2)
    labels = balanced_labels(synth.n_samples, original.cc_spec.num_classes,
                             torch.Generator().manual_seed(synth.seed), exclude=left_out)
    x, y, _ = synthesize(original, synth, labels=labels, device=device, progress=progress,
                         student=compact if synth.competition_weight > 0 else None)
    return x, y


def resynthesize_class(cleaned: nn.Module, target: int, n: int, synth: SynthConfig, device=None,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images (n, C, H, W) labelled ``target``, made through ``cleaned`` (the
    channel-cleaned full-rank model) instead of the backdoored original: the suspected target's
    own images, made through the original, carry its trigger, and leaving the class out of the
    fine-tune costs that class most of the accuracy the defense loses. Seeded apart from the
    first synthesis."""
    labels = torch.full((n,), int(target), dtype=torch.long)
    cfg = dataclasses.replace(synth, seed=synth.seed + 1)
    x, y, _ = synthesize(cleaned, cfg, labels=labels, device=device, progress=progress)
    return x, y


def recognized_class(student: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic images ``x`` labelled ``target`` that the fine-tuned ``student`` (whose
    backdoor is gone) also puts in ``target``, with their labels: (n, C, H, W), (n,)."""
    x_target, y_target = x[y == target], y[y == target]
    keep = predictions(student, x_target) == target
    return x_target[keep], y_target[keep]

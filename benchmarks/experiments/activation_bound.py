"""Does bounding every BatchNorm output at what clean synthetic images reach remove a backdoor?

Run: python -m benchmarks.experiments.activation_bound [--attacks noise] [--recipe cifar10-resnet18-6ep]
     [--scales 1 1.25 1.5] [--name activation_bound]   (writes benchmarks/results/NAME.{json,md})

A trigger works by driving some channels far beyond what clean inputs drive them to; clamping each
channel at a bound learned from clean inputs is a removal that needs no trigger shape (activation
clipping, as in Wang et al. 2022's post-training mitigation, there with a few real images). Here
the bounds come from the preset's synthetic images only: for each BatchNorm output channel, the
largest value each synthetic class reaches (max over positions and images of that class), and
the bound is the median of those per-class maxima, so that one class whose synthetic images carry
the trigger (the target's) does not set it. ``scale`` multiplies the bound. Measured on the
original model and on the clean-compact model before any fine-tune (probes off, no CLP), ACC / ASR
on the validation half of the test set.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from torch import nn

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, shared_synthetic, stage_lines, stage_row, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.attacks.base import load_attack
from cc_core.compact import clean_compact
from cc_core.data import load_dataset
from cc_core.defense.config import resolve_config

COMMAND = "python -m benchmarks.experiments.activation_bound"


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@torch.no_grad()
def class_maxima(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int,
                 batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per BatchNorm, (n_classes, C): the largest output of each channel over the images of each class."""
    maxima = {name: torch.full((n_classes, bn.num_features), float("-inf")) for name, bn in batchnorms(model).items()}
    labels: list[torch.Tensor] = []

    def hook(name):
        def record(module, inputs, out):
            per_image = out.detach().float().amax(dim=(2, 3)).cpu()  # (B, C)
            table = maxima[name]
            for k in labels[0].unique().tolist():
                table[k] = torch.maximum(table[k], per_image[labels[0] == k].amax(dim=0))
        return record

    handles = [bn.register_forward_hook(hook(name)) for name, bn in batchnorms(model).items()]
    try:
        model.eval()
        for start in range(0, len(y), batch_size):
            labels[:] = [y[start:start + batch_size]]
            model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return maxima


def median_bounds(maxima: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bound of each channel: the median over classes of its per-class maximum."""
    return {name: table[torch.isfinite(table).all(dim=1)].median(dim=0).values for name, table in maxima.items()}


@contextlib.contextmanager
def bounded(model: nn.Module, bounds: dict[str, torch.Tensor], scale: float):
    """Within: every BatchNorm output of ``model`` is clamped from above at ``scale`` x its bound."""
    def hook(limit):
        return lambda module, inputs, out: torch.minimum(out, limit.to(out.dtype)[None, :, None, None])

    handles = [bn.register_forward_hook(hook(scale * bounds[name])) for name, bn in batchnorms(model).items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def measure(attack_name: str, scales: list[float], recipe_name: str) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    name = model_name(attack_name, recipe)
    original, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    cfg = resolve_config("cpu", patch_probe=None, warp_probe=None, blend_probe=None, trigger_channel_u=None,
                         channel_u=None)
    x, y = (t.cpu() for t in shared_synthetic(name, original, cfg.synth)[:2])
    n_classes = original.cc_spec.num_classes
    data = load_dataset(recipe["dataset"], "val")
    compact, _ = clean_compact(original, ratio=cfg.ratio, tau=cfg.tau, normalizer=cfg.normalizer,
                               calibration=x[:cfg.calibration_samples], **cfg.compact)
    rows = []
    for stage, model in (("original", original), (f"clean-compact {cfg.ratio:g}x, no fine-tune", compact.eval())):
        rows.append(stage_row(stage, model, data, attack))
        maxima = class_maxima(model, x, y, n_classes)
        bounds = median_bounds(maxima)
        overall = {k: v.amax(dim=0) for k, v in maxima.items()}
        for label, chosen in (("median of class maxima", bounds), ("max over all images", overall)):
            for scale in scales if label.startswith("median") else [1.0]:
                with bounded(model, chosen, scale):
                    rows.append(stage_row(f"{stage}, bounded at {scale:g} x {label}", model, data, attack))
    for r in rows:
        r.update(model=name, attack=attack.label if attack else "none")
        print({k: v for k, v in r.items() if k != "per_class_acc"}, flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Activation bounds from synthetic images\n",
             f"`{result['command']}` at commit {m.get('git_commit', '?')}, {m.get('cpu', '?')}; the preset's "
             "512 synthetic images (seed 0); ACC / ASR on the validation half. Worst class: the class that lost "
             "most of its own accuracy against the original (before -> after).\n",
             "| model | stage | ACC | ASR | worst class |", "|---|---|---|---|---|"]
    lines += stage_lines(result["rows"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["noise"])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.25, 1.5])
    parser.add_argument("--name", default="activation_bound")
    args = parser.parse_args()
    rows = [r for attack in args.attacks for r in measure(attack, args.scales, args.recipe)]
    result = {"command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(), "rows": rows}
    for path in write_results(args.name, result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

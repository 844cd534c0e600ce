"""Does compacting harder and giving the capacity back remove what a milder compaction keeps?

Run: python -m benchmarks.experiments.tail_reset [--attacks blended badnet] [--name tail_reset]
     (writes benchmarks/results/NAME.{json,md})
The observation behind it: where no probe fires, the same defense leaves more of a backdoor at 2x
than at 4x (the tuning zoo's Blended model before the blend probe: 15.33% at 2x, 1.40% at 4x), so
the backdoor sits in Tucker components a 2x truncation keeps and a 4x one drops. The idea: build
the 2x model, zero the components beyond the ranks a harder compaction (3x or 4x) would keep (core
slices of Tucker-2 layers, columns of 1x1 factorizations, dense layers truncated), and let the
fine-tune on synthetic images regrow that capacity from the clean function alone.

For each tuning-zoo model (trained if not cached), with every probe off (the case of a trigger no
probe sees): ACC / ASR on the validation half of the test set (never the reporting half) of each
start model before and after each fine-tune variant, all on the preset's synthetic images (shared
through the synthetic cache). No class is left out of any fine-tune.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch
from torch import nn

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, shared_synthetic, stage_lines, stage_row, write_results
from benchmarks.experiments.stage_asr import PROBES_OFF
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.attacks.base import load_attack
from cc_core.compact import clean_compact
from cc_core.compact.layers import SVDConv2d, Tucker2Conv2d
from cc_core.compact.tucker import hosvd_tucker2, matrix_svd
from cc_core.data import load_dataset
from cc_core.finetune import guarded_finetune
from cc_core.defense.cleaning import channel_clean
from cc_core.defense.config import resolve_config

COMMAND = "python -m benchmarks.experiments.tail_reset"


@torch.no_grad()
def truncate_dense(conv: nn.Conv2d, ranks: list[int]) -> None:
    """``conv``'s weight replaced by its truncation to ``ranks`` (Tucker-2, or SVD for 1x1)."""
    w = conv.weight
    if len(ranks) == 2:
        conv.weight.copy_(hosvd_tucker2(w).truncate(*ranks).to_tensor())
    else:
        conv.weight.copy_(matrix_svd(w.reshape(w.shape[0], w.shape[1])).truncate(ranks[0]).to_matrix()
                          .reshape(w.shape))


@torch.no_grad()
def reset_tail(model: nn.Module, harder_plan) -> nn.Module:
    """A copy of the compact ``model`` holding only what ``harder_plan``'s ranks keep: the Tucker-2
    core's slices and the 1x1 factorization's columns beyond them zeroed (their factors stay, so the
    fine-tune can regrow them), a layer kept dense truncated to them."""
    model = copy.deepcopy(model)
    ranks = {layer.name: layer.ranks for layer in harder_plan.layers if layer.ranks}
    for name, module in model.named_modules():
        if name not in ranks:
            continue
        r = ranks[name]
        if isinstance(module, Tucker2Conv2d):
            module.core.weight[r[0]:] = 0
            module.core.weight[:, r[1]:] = 0
        elif isinstance(module, SVDConv2d):
            module.last.weight[:, r[0]:] = 0
        elif isinstance(module, nn.Conv2d):
            truncate_dense(module, r)
    return model


def measure(attack_name: str, ratio: float, harder: list[float], recipe_name: str = DEFAULT_RECIPE) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    name = model_name(attack_name, recipe)
    original, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    cfg = resolve_config("cpu", ratio=ratio, **PROBES_OFF)
    x, y = (t.cpu() for t in shared_synthetic(name, original, cfg.synth)[:2])
    data = load_dataset(recipe["dataset"], "val")
    cleaned, _ = channel_clean(original, cfg)
    calibration = x[:cfg.calibration_samples]

    def compact_at(r: float):
        return clean_compact(cleaned, ratio=r, tau=cfg.tau, normalizer=cfg.normalizer, calibration=calibration,
                             **cfg.compact)

    base, _ = compact_at(ratio)
    starts = {f"{ratio:g}x": base}
    for r in harder:
        small, plan = compact_at(r)
        starts[f"{r:g}x"] = small
        starts[f"{ratio:g}x, beyond {r:g}x reset"] = reset_tail(base, plan)
    ce = dataclasses.replace(cfg.finetune, kd_weight=0.0)
    fine_tunes = {"preset (lr 0.001)": (ce, None), "lr 0.01": (dataclasses.replace(ce, lr=0.01), None),
                  "kd from the original": (cfg.finetune, original),
                  "kd from the CLP-cleaned full-rank model": (cfg.finetune, cleaned)}
    rows = [stage_row("original", original, data, attack)]
    for start_name, start_model in starts.items():
        rows.append(stage_row(f"{start_name}: before the fine-tune", start_model.eval(), data, attack))
        for ft_name, (ft, teacher) in fine_tunes.items():
            student = copy.deepcopy(start_model)
            t0 = time.perf_counter()
            guarded_finetune(student, x, y, None, teacher, ft, progress=False)
            rows.append(stage_row(f"{start_name}: {ft_name}", student.eval(), data, attack,
                            {"seconds": time.perf_counter() - t0}))
            print({k: v for k, v in rows[-1].items() if k != "per_class_acc"}, flush=True)
    for r in rows:
        r.update(model=name, attack=attack.label if attack else "none", ratio=ratio,
                 params=sum(p.numel() for p in base.parameters()))
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Compacting harder and giving the capacity back (every probe off)\n",
             f"`{result['command']}` at commit {m.get('git_commit', '?')}, {m.get('cpu', '?')}; the preset's "
             "synthetic images; ACC / ASR on the validation half; no class left out of any fine-tune. Worst "
             "class: the class that lost most of its own accuracy against the original (before -> after).\n",
             "| model | start, fine-tune | ACC | ASR | worst class |", "|---|---|---|---|---|"]
    lines += stage_lines(result["rows"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["blended", "badnet"])
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--harder", type=float, nargs="+", default=[4.0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--name", default="tail_reset")
    args = parser.parse_args()
    rows = [r for attack in args.attacks for r in measure(attack, args.ratio, args.harder, args.recipe)]
    result = {"command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(), "rows": rows}
    for path in write_results(args.name, result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

"""Where does a backdoor survive when no probe fires: after CLP, after compaction, or in the fine-tune?

Run: python -m benchmarks.experiments.stage_asr [--attacks badnet] [--ratio 2] [--name stage_asr]
     (writes benchmarks/results/NAME.{json,md})
For each tuning-zoo model (trained if not cached), with every probe off (the case of a trigger no
probe sees): ACC / ASR on the validation half of the test set (never the reporting half) of the
original, the CLP-cleaned full-rank model, the clean-compact model before its fine-tune, and the
fine-tuned student under several fine-tune data/teacher variants, all on the preset's synthetic
images (shared through the synthetic cache):
- ``preset``: the preset's fine-tune (hard labels of the synthesized class);
- ``oracle_out``: the attack's true target class's synthetic images left out (what a perfect
  target guess gives, to separate "the fine-tune re-teaches it" from "the compaction kept it");
- ``agree``: only the synthetic images whose label the CLP-cleaned full-rank model also gives;
- ``relabel``: labels from the CLP-cleaned full-rank model instead of the synthesized class;
- ``kd_cleaned``: the preset's loss plus distillation from the CLP-cleaned full-rank model.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, percent, shared_synthetic, stage_row, worst_class_text, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.adversarial import predictions
from cc_core.attacks.base import load_attack
from cc_core.compact import clean_compact
from cc_core.data import load_dataset
from cc_core.finetune import guarded_finetune
from cc_core.defense.cleaning import channel_clean
from cc_core.defense.config import resolve_config

COMMAND = "python -m benchmarks.experiments.stage_asr"
PROBES_OFF = {"patch_probe": None, "warp_probe": None, "blend_probe": None, "mask_probe": None,
              "trigger_channel_u": None}


def measure(attack_name: str, ratio: float, recipe_name: str = DEFAULT_RECIPE) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    name = model_name(attack_name, recipe)
    original, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    cfg = resolve_config("cpu", ratio=ratio, **PROBES_OFF)
    x, y = (t.cpu() for t in shared_synthetic(name, original, cfg.synth)[:2])
    data = load_dataset(recipe["dataset"], "val")
    target = attack.target if attack is not None and not attack.all_to_all else None
    rows = [stage_row("original", original, data, attack)]
    cleaned, clp_info = channel_clean(original, cfg)
    rows.append(stage_row("clp", cleaned, data, attack, {"channels_zeroed": clp_info["n_pruned"]}))
    compact, _ = clean_compact(cleaned, ratio=cfg.ratio, tau=cfg.tau, normalizer=cfg.normalizer,
                               calibration=x[:cfg.calibration_samples], **cfg.compact)
    compact.eval()
    rows.append(stage_row("compact, before the fine-tune", compact, data, attack))
    with torch.no_grad():
        cleaned_labels = predictions(cleaned, x)
    agree = cleaned_labels == y
    variants = {"preset": (x, y, None, None), "relabel": (x, cleaned_labels, None, None),
                "agree": (x[agree], y[agree], None, None), "kd_cleaned": (x, y, cleaned, None)}
    if target is not None:
        keep = y != target
        variants["oracle_out"] = (x[keep], y[keep], None, target)
    for variant, (xv, yv, teacher, left_out) in variants.items():
        student = copy.deepcopy(compact)
        ft = cfg.finetune if teacher is not None else dataclasses.replace(cfg.finetune, kd_weight=0.0)
        start = time.perf_counter()
        guarded_finetune(student, xv, yv, None, teacher, ft, progress=False, left_out_class=left_out)
        extra = {"images": len(yv), "seconds": time.perf_counter() - start}
        if target is not None:
            extra["target_images"] = int((yv == target).sum())
            extra["target_disagree"] = int(((y == target) & ~agree).sum())
        rows.append(stage_row(f"fine-tuned: {variant}", student.eval(), data, attack, extra))
    for r in rows:
        r.update(model=name, attack=attack.label if attack else "none", target=target, ratio=ratio)
        print({k: v for k, v in r.items() if k != "per_class_acc"}, flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Where a backdoor survives with every probe off\n",
             f"`{result['command']}` at commit {m.get('git_commit', '?')}, {m.get('cpu', '?')}; the preset's "
             "synthetic images; ACC / ASR on the validation half. Worst class: the class that lost most of "
             "its own accuracy against the original (before -> after).\n",
             "| model | ratio | stage | images | ACC | ASR | worst class |", "|---|---|---|---|---|---|---|"]
    by_model: dict[str, list[float]] = {}
    for r in result["rows"]:
        base = by_model.setdefault(r["model"], r["per_class_acc"])
        lines.append(f"| {r['model']} | {r['ratio']:g}x | {r['stage']} | {r.get('images', '')} | {percent(r['acc'])} | "
                     f"{percent(r['asr'])} | {worst_class_text(base, r['per_class_acc'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnet"])
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--name", default="stage_asr")
    args = parser.parse_args()
    rows = [r for attack in args.attacks for r in measure(attack, args.ratio, args.recipe)]
    result = {"command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(), "rows": rows}
    for path in write_results(args.name, result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

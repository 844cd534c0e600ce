"""What each threshold of the perturbation's channel clean does, before compaction and fine-tune.

  python -m benchmarks.experiments.channel_levels --model badnet --recipe cifar10-resnet18-6ep --seed 1

With every probe off, the trigger the pipeline would clean by (probe_triggers' channel_trigger:
the inverted perturbation) is found on the tuning-zoo model's shared synthetic images; then, for
each threshold z > 4 ... 2 of cc_core.trigger_clean, the model with those channels zeroed (CLP not
run): how often the perturbation still flips the synthetic images, how many of each class's
synthetic images keep their class (the smallest share, class_keep), and real ACC / ASR and the
largest loss of one class's accuracy on the test set's validation half. Writes
results/channel_levels_<model>_<recipe>_seed<seed>.{json,md}.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench import RECIPES
from benchmarks.common import machine, shared_synthetic, write_results
from benchmarks.sweep_defend import NO_PROBES
from benchmarks.zoo import ensure_model, model_name
from cc_core.attacks import load_attack
from cc_core.data import load_dataset
from cc_core.io import load_model
from cc_core.metrics import evaluate
from cc_core.defense.config import resolve_config
from cc_core.defense.suspect import probe_triggers
from cc_core.probes import apply_found_trigger, trigger_flip_rate
from cc_core.trigger_clean import class_keep, predicted, thresholds, trigger_channel_scores, zero_above


def run(name: str, recipe_name: str, seed: int | None) -> dict:
    recipe = RECIPES[recipe_name] | ({} if seed is None else {"seed": seed})
    directory = ensure_model(name, recipe)
    model, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    data = load_dataset(recipe["dataset"], "val")
    cfg = resolve_config("cpu", ratio=2.0, **NO_PROBES)
    x, _, _ = shared_synthetic(model_name(name, recipe), model, cfg.synth)
    torch.manual_seed(0)
    found = probe_triggers(model, x, cfg)["channel_trigger"]
    if found is None:
        raise SystemExit(f"no perturbation fires on {name}: nothing to clean by")
    scores = trigger_channel_scores(model, x, apply_found_trigger(x, found, model.cc_spec))
    before, base = predicted(model, x), evaluate(model, data, attack)
    rows = []
    for level in thresholds(cfg.perturbation_channel_u, 2.0):
        pruned, info = zero_above(model, scores, level)
        m = evaluate(pruned, data, attack)
        drops = [b - a for b, a in zip(base["per_class_acc"], m["per_class_acc"])]
        rows.append({"z": level, "channels": info["n_pruned"], "flip_rate": trigger_flip_rate(pruned, x, found, found["n"]),
                     "class_keep": class_keep(before, predicted(pruned, x)), "acc": m["acc"], "asr": m["asr"],
                     "worst_class_drop": max(drops), "worst_class": drops.index(max(drops))})
    flags = f" --recipe {recipe_name}" + ("" if seed is None else f" --seed {seed}")
    return {"command": f"python -m benchmarks.experiments.channel_levels --model {name}{flags}", "machine": machine(),
            "trigger": {k: found[k] for k in ("kind", "flip_rate", "target_class_estimate")},
            "acc_before": base["acc"], "asr_before": base["asr"], "eval_split": "val", "rows": rows}


def markdown(result: dict) -> str:
    m, t = result["machine"], result["trigger"]
    lines = ["# The perturbation's channel clean, threshold by threshold\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Probes off; the "
             f"{t['kind']} flips {t['flip_rate']:.0%} of the synthetic images (class {t['target_class_estimate']} most). "
             f"Channels zeroed in the original model, no CLP, no compaction, no fine-tune; real ACC / ASR in % on the test "
             f"set's validation half (before: {100 * result['acc_before']:.2f} / {100 * result['asr_before']:.2f}).\n",
             "| z > | channels | flips (synthetic) | smallest class keep (synthetic) | ACC | ASR | worst class |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['z']:g} | {r['channels']} | {r['flip_rate']:.1%} | {r['class_keep']:.1%} | {100 * r['acc']:.2f} | "
              f"{100 * r['asr']:.2f} | {r['worst_class']}: -{100 * r['worst_class_drop']:.1f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="badnet", help="a tuning-zoo attack name")
    parser.add_argument("--recipe", default="cifar10-resnet18-6ep", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=1, help="the recipe's training seed")
    args = parser.parse_args()
    result = run(args.model, args.recipe, args.seed)
    for path in write_results(f"channel_levels_{args.model}_{args.recipe}_seed{args.seed}", result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

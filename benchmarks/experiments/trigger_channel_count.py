"""How many of the trigger channel clean's channels does removal need, and what does each cost?

The trigger channel clean (cc_core.trigger_clean) zeroes every channel whose response to a found
trigger lies more than u = 3 standard deviations above its layer's. With the warp probe on, the
seed-0 WaNet's field has 19 such channels, and the distilled 2x student ends at its teacher's
accuracy (80.11; teacher_signals_warp_probe.md), 5 points under the original, most of it on three
classes. This zeroes the channels one at a time, highest z first, and after each measures the
teacher as the defense builds it (outlier channels zeroed by CLP, then these, singular values
clipped at full rank):

- on the real test set (never seen by a signal): ACC / ASR;
- on the synthetic images: the found trigger's flip rate on the teacher (what the distillation gate
  checks) and before the clipping (what the trigger channel clean checks), and agreement with the
  original's classes (the gate's fidelity bar).

Run: python -m benchmarks.experiments.trigger_channel_count [--models wanet ...] [--recipe R] [--seed N] [--warp-probe]
Writes benchmarks/results/trigger_channel_count[_R][_seedN][_warp_probe].{json,md}.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, write_results
from benchmarks.experiments.teacher_signals import zoo_model_probed
from benchmarks.zoo import model_name
from cc_core.baselines.clp import clp, zero_channel
from cc_core.baselines.pairs import conv_bn_pairs
from cc_core.data import load_dataset
from cc_core.metrics import evaluate
from cc_core.defense.cleaning import channel_clean, clipped_full_rank
from cc_core.defense.teacher import teacher_agreement
from cc_core.probes import trigger_flip_rate, trigger_text

COMMAND = "python -m benchmarks.experiments.trigger_channel_count"


def count_rows(name: str, recipe_name: str = DEFAULT_RECIPE, seed: int | None = None, warp_probe: bool = False) -> dict:
    """The zoo model ``name``'s firing trigger and, for k = 0 .. all of the trigger channel clean's
    channels (highest z first), the teacher with the first k zeroed: {"k", "z", "layer", "channel" (the
    k-th channel's), "acc", "asr", "per_class_acc", "flip_rate", "flip_rate_unclipped", "agreement"}."""
    recipe = RECIPES[recipe_name] | ({} if seed is None else {"seed": seed})
    original, attack, cfg, x, probed = zoo_model_probed(name, recipe, ["--warp-probe"] if warp_probe else [])
    if attack is None:
        raise ValueError(f"{name} has no attack spec: this measures a backdoor's removal")
    found = probed["trigger"]
    result = {"model": model_name(name, recipe), "trigger": trigger_text(found) if found else None, "steps": []}
    if found is None:
        return result
    _, info = channel_clean(original, cfg, x, probed["channel_trigger"])
    channels = info["trigger"]["channels"]
    test = load_dataset(recipe["dataset"], "val")
    cleaned, _ = clp(original, cfg.channel_u, cfg.channel_mode)
    pairs = conv_bn_pairs(cleaned)
    for k in range(len(channels) + 1):
        zeroed = channels[k - 1] if k else {"z": None, "layer": None, "channel": None}
        if k:
            zero_channel(cleaned, pairs, zeroed["layer"], zeroed["channel"])
        teacher = clipped_full_rank(cleaned, cfg)
        real = evaluate(teacher, test, attack)
        step = {"k": k, "z": zeroed["z"], "layer": zeroed["layer"], "channel": zeroed["channel"],
                "acc": real["acc"], "asr": real["asr"], "per_class_acc": real["per_class_acc"],
                "flip_rate": trigger_flip_rate(teacher, x, found, found["n"]),
                "flip_rate_unclipped": trigger_flip_rate(cleaned, x, found, found["n"]),
                "agreement": teacher_agreement(teacher, original, x, None)[0]}
        result["steps"].append(step)
        print(f"{name} k={k}: ACC {step['acc']:.4f} ASR {step['asr']:.4f} flips {step['flip_rate']:.3f} "
              f"agreement {step['agreement']:.3f}", flush=True)
    return result


def run(models: list[str], recipe_name: str = DEFAULT_RECIPE, seed: int | None = None, warp_probe: bool = False) -> dict:
    torch.manual_seed(0)
    rows = [count_rows(name, recipe_name, seed, warp_probe) for name in models]
    flags = (("" if recipe_name == DEFAULT_RECIPE else f" --recipe {recipe_name}") + ("" if seed is None else f" --seed {seed}")
             + (" --warp-probe" if warp_probe else ""))
    return {"command": f"{COMMAND} --models {' '.join(models)}{flags}", "machine": machine(), "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# The trigger channel clean, one channel at a time\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "The teacher as the defense builds it (cpu preset: CLP's outlier channels zeroed, then the first k of the "
             "trigger channel clean's channels, highest z first, singular values clipped at full rank). ACC / ASR in % "
             "on the real test set; the trigger's flips and the agreement with the original on the synthetic images.\n"]
    for r in result["rows"]:
        lines.append(f"## {r['model']}: {r['trigger'] or 'no probe fires'}\n")
        if not r["steps"]:
            continue
        lines += ["| k | channel zeroed (z) | ACC | ASR | trigger's flips (before clipping) | agreement |", "|---|---|---|---|---|---|"]
        for s in r["steps"]:
            channel = f"{s['layer']} ({s['z']:.1f})" if s["k"] else "-"
            asr = "-" if s["asr"] is None else f"{100 * s['asr']:.2f}"
            lines.append(f"| {s['k']} | {channel} | {100 * s['acc']:.2f} | {asr} | {s['flip_rate']:.3f} ({s['flip_rate_unclipped']:.3f}) | "
                         f"{100 * s['agreement']:.1f}% |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["wanet"])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, help="the zoo recipe's models trained from this seed (cached as <name>-seed<N>)")
    parser.add_argument("--warp-probe", action="store_true", help="run the preset with the warp probe on")
    args = parser.parse_args()
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    result = run(args.models, args.recipe, args.seed, args.warp_probe)
    name = ("trigger_channel_count" + ("" if args.recipe == DEFAULT_RECIPE else f"_{args.recipe}")
            + ("" if args.seed is None else f"_seed{args.seed}") + ("_warp_probe" if args.warp_probe else ""))
    json_path, md_path = write_results(name, result, markdown(result))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()

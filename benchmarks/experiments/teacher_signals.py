"""Which clipped teachers could a student distill from as they are, and what tells them apart?

The `cpu` preset distills only from a teacher its gate verifies against a trigger a probe found.
Distilling from the clipped, channel-cleaned teacher as is gave the zoo WaNet student its backdoor
back (sweep_defend_distill2.md), and the all-to-all Blended student 82.90 / 8.99 against 78.20 /
17.76 without it (sweep_defend_teacher_as_is.md), where no probe fires. This measures each zoo
model's teacher as the defense builds it, from the model's cached synthetic images:

- on the real test set (never seen by a signal): the teacher's ACC / ASR;
- agreement: the fraction of the synthetic images the teacher gives the original's class;
- the scan's universal inverted perturbation (made on the original): its flip rate on the original
  and on the teacher, and whether the scan calls it all-to-all;
- the same inversion made afresh on the teacher: its flip rate and all-to-all verdict;
- the probes' firing trigger, if any, and its flip rate on the teacher (what the gate checks when a probe fires).

With --warp-probe the preset runs the warp probe too (a firing field's channels are zeroed as well), with
--trigger-clean-only a firing trigger's channels are zeroed without CLP's (DefendConfig.clp_with_trigger);
with --seed N the models are the zoo recipe's trained from seed N (benchmarks.zoo.model_name).

Run: python -m benchmarks.experiments.teacher_signals [--models blended-a2a wanet ...] [--recipe R] [--seed N] [--warp-probe]
     [--trigger-clean-only]
Writes benchmarks/results/teacher_signals[_R][_seedN][_warp_probe][_trigger_clean_only].{json,md}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, shared_synthetic, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core.attacks import load_attack
from cc_core.data import load_dataset
from cc_core.io import load_model
from cc_core.metrics import evaluate
from cc_core.defense.cleaning import channel_clean, distillation_teacher
from cc_core.defense.config import resolve_config
from cc_core.defense.suspect import probe_triggers, universal_inversion
from cc_core.defense.teacher import teacher_agreement
from cc_core.probes import perturbation_trigger, trigger_flip_rate, trigger_score, trigger_text
from cc_core.scan import all_to_all_suspected, flip_report

COMMAND = "python -m benchmarks.experiments.teacher_signals"
DEFAULT_MODELS = ["badnet", "blended", "blended-a2a", "wanet", "inputaware-a2a"]
# The preset options a run can turn on: flag -> DefendConfig overrides.
OPTIONS = {"--warp-probe": {"warp_probe": {}}, "--trigger-clean-only": {"clp_with_trigger": False}}


def option_overrides(options: list[str]) -> dict:
    """The DefendConfig overrides of the OPTIONS flags ``options``."""
    return {key: value for flag in options for key, value in OPTIONS[flag].items()}


def zoo_model_probed(name: str, recipe: dict, options: list[str] = ()) -> tuple:
    """(original, attack, cpu preset with the OPTIONS flags ``options``, its cached synthetic images,
    probe_triggers' report with the universal inversion made) for the zoo model ``name`` of ``recipe``."""
    directory = ensure_model(name, recipe)
    original = load_model(directory / "model.safetensors").eval()
    attack = load_attack(directory) if (directory / "attack.json").exists() else None  # a clean model has none
    cfg = resolve_config("cpu", **option_overrides(options))
    x, _, _ = shared_synthetic(model_name(name, recipe), original, cfg.synth)
    start = time.perf_counter()
    probed = probe_triggers(original, x, cfg)
    probed["seconds"] = time.perf_counter() - start
    if probed["universal"] is None:
        flip, delta = flip_report(original, x, cfg.inversion)
        probed["universal"] = {"flip": flip, "delta": delta.tolist()}
    return original, attack, cfg, x, probed


def teacher_row(name: str, recipe_name: str = DEFAULT_RECIPE, seed: int | None = None, options: list[str] = ()) -> dict:
    """The measurements above for the zoo model ``name`` of recipe ``recipe_name`` (trained from
    ``seed`` when given) and its teacher under the cpu preset with the OPTIONS flags ``options``."""
    recipe = RECIPES[recipe_name] | ({} if seed is None else {"seed": seed})
    original, attack, cfg, x, probed = zoo_model_probed(name, recipe, options)
    found, clean_by = probed["trigger"], probed["channel_trigger"]
    cleaned, info = channel_clean(original, cfg, x if clean_by else None, clean_by)
    teacher = distillation_teacher(cleaned, cfg)
    flip, delta = universal_inversion(probed["universal"])
    own_flip, _ = flip_report(teacher, x, cfg.inversion)
    test = load_dataset(recipe["dataset"], "val")
    real, before = evaluate(teacher, test, attack), evaluate(original, test)
    fired = trigger_score(found)
    return {"model": model_name(name, recipe), "channels_zeroed": info["n_pruned"],
            "trigger_channels_zeroed": info["trigger"]["n_pruned"], "teacher_acc": real["acc"], "teacher_asr": real["asr"],
            "per_class_acc_original": before["per_class_acc"], "per_class_acc_teacher": real["per_class_acc"],
            "agreement": teacher_agreement(teacher, original, x, None)[0],
            "flip_rate_original": flip["flip_rate"], "all_to_all": all_to_all_suspected(flip),
            "flip_rate_teacher": trigger_flip_rate(teacher, x, perturbation_trigger(flip, delta, len(x)), len(x)),
            "own_flip_rate": own_flip["flip_rate"], "own_all_to_all": all_to_all_suspected(own_flip),
            "probe_seconds": probed["seconds"], "trigger": trigger_text(found) if fired else None,
            "trigger_flip_rate_teacher": trigger_flip_rate(teacher, x, found, found["n"]) if fired else None}


def run(models: list[str], recipe_name: str = DEFAULT_RECIPE, seed: int | None = None, options: list[str] = ()) -> dict:
    torch.manual_seed(0)
    rows = []
    for name in models:
        row = teacher_row(name, recipe_name, seed, options)
        rows.append(row)
        print(f"{name}: teacher {acc_asr_text(row)}, agreement {row['agreement']:.3f}, "
              f"inverted flips {row['flip_rate_original']:.2f} -> {row['flip_rate_teacher']:.2f}", flush=True)
    flags = (("" if recipe_name == DEFAULT_RECIPE else f" --recipe {recipe_name}") + ("" if seed is None else f" --seed {seed}")
             + "".join(f" {flag}" for flag in options))
    return {"command": f"{COMMAND} --models {' '.join(models)}{flags}", "machine": machine(), "options": list(options),
            "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# The clipped teachers, measured\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "The teacher is the defense's (cpu preset): the original with its outlier channels zeroed (and a firing "
             "probe's channels), its singular values clipped at full rank. ACC / ASR in % on the real CIFAR-10 test set "
             "(never seen by a signal); the other columns on the model's 1024 synthetic images: agreement with the "
             "original's classes, the universal inverted perturbation (made on the original) and its flip rate on "
             "the original -> on the teacher, one made on the teacher, and the probes' firing trigger"
             + (f" (the preset with {' '.join(result['options'])})" if result.get("options") else "") + ". Per class: the teacher's ACC "
             "minus the original's, in points, classes 0-9.\n",
             "| model | channels zeroed (CLP + trigger) | teacher ACC / ASR | agreement | inverted on the original: flips original -> teacher "
             "(all-to-all) | inverted on the teacher: flips (all-to-all) | probes' trigger: flips on the teacher | probes s | per class |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        trigger = f"{r['trigger']}: {r['trigger_flip_rate_teacher']:.2f}" if r["trigger"] else "none fires"
        lines.append(f"| {r['model']} | {r['channels_zeroed']} + {r['trigger_channels_zeroed']} | {acc_asr_text(r)} | "
                     f"{100 * r['agreement']:.1f}% | {r['flip_rate_original']:.2f} -> {r['flip_rate_teacher']:.2f} "
                     f"({'yes' if r['all_to_all'] else 'no'}) | {r['own_flip_rate']:.2f} ({'yes' if r['own_all_to_all'] else 'no'}) "
                     f"| {trigger} | {r['probe_seconds']:.0f} | {per_class_change(r)} |")
    return "\n".join(lines) + "\n"


def acc_asr_text(row: dict) -> str:
    """'ACC / ASR' of the teacher in %; a clean model's ASR is '-'."""
    asr = "-" if row["teacher_asr"] is None else f"{100 * row['teacher_asr']:.2f}"
    return f"{100 * row['teacher_acc']:.2f} / {asr}"


def per_class_change(row: dict) -> str:
    """The teacher's per-class ACC minus the original's, in points."""
    return " ".join(f"{100 * (t - o):+.1f}" for t, o in zip(row["per_class_acc_teacher"], row["per_class_acc_original"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, help="the zoo recipe's models trained from this seed (cached as <name>-seed<N>)")
    parser.add_argument("--warp-probe", action="store_true", help="run the preset with the warp probe on")
    parser.add_argument("--trigger-clean-only", action="store_true",
                        help="a firing trigger's channels are zeroed without CLP's (clp_with_trigger=False)")
    parser.add_argument("--name", help="results file name under benchmarks/results/ (default "
                        "teacher_signals[_<recipe>][_seed<N>][_warp_probe][_trigger_clean_only])")
    args = parser.parse_args()
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name.startswith(".")):
        parser.error(f"--name must be a plain file name, got {args.name!r}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    options = [flag for flag in OPTIONS if getattr(args, flag[2:].replace("-", "_"))]
    result = run(args.models, args.recipe, args.seed, options)
    if args.name:
        result["command"] += f" --name {args.name}"
    name = args.name or ("teacher_signals" + ("" if args.recipe == DEFAULT_RECIPE else f"_{args.recipe}")
                         + ("" if args.seed is None else f"_seed{args.seed}") + "".join("_" + flag[2:].replace("-", "_") for flag in options))
    json_path, md_path = write_results(name, result, markdown(result))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()

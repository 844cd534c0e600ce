"""Would zeroing the channels the universal inverted perturbation excites clean an all-to-all teacher?

On the zoo's all-to-all Blended model no probe fires; the scan's universal inverted perturbation
is called all-to-all and the gate verifies the clipped teacher against it (it flips 7% there). The
teacher's real ASR is 6.94%, and the student distilled from it ends at 8.99% (2x), the worst ASR
of Table 2. A firing probe's stamp, warp or blend gets a trigger channel clean before compaction
(cc_core.trigger_clean: channels whose mean response to the trigger is a z > u outlier in their
layer are zeroed); the perturbation does not. This measures what that clean would do with the
perturbation as the trigger, at several u, on each model's teacher as the defense would build it:

- on the real test set (never seen by a signal): the teacher's ACC / ASR;
- on the model's 1024 synthetic images: the perturbation's flip rate on the teacher, the
  teacher's agreement with the original (plus the share it gives the class the perturbation maps
  to the original's: the gate's count for an all-to-all trigger), and whether the gate would pass.

Run: python -m benchmarks.experiments.perturbation_clean [--models blended-a2a ...] [--u 4 3 2.5 2]
Writes benchmarks/results/perturbation_clean.{json,md}.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench import RECIPES
from benchmarks.common import machine, write_results
from benchmarks.experiments.teacher_signals import zoo_model_probed
from benchmarks.zoo import model_name
from cc_core.data import load_dataset
from cc_core.metrics import evaluate
from cc_core.defense.cleaning import channel_clean, distillation_teacher
from cc_core.defense.suspect import universal_inversion
from cc_core.defense.teacher import TEACHER_AGREEMENT, teacher_agreement
from cc_core.probes import RESIDUAL_FLIP, apply_found_trigger, perturbation_trigger, trigger_flip_rate, trigger_score
from cc_core.scan import all_to_all_suspected
from cc_core.trigger_clean import prune_trigger_channels

COMMAND = "python -m benchmarks.experiments.perturbation_clean"
RECIPE = "cifar10-resnet18"
DEFAULT_MODELS = ["blended-a2a"]
DEFAULT_U = [4.0, 3.0, 2.5, 2.0]


def teacher_measures(teacher: torch.nn.Module, original: torch.nn.Module, x: torch.Tensor, perturbation: dict,
                     test, attack) -> dict:
    """The real ACC / ASR of ``teacher`` and the gate's measurements against ``perturbation`` on ``x``."""
    real = evaluate(teacher, test, attack)
    flip = trigger_flip_rate(teacher, x, perturbation, len(x))
    agreement, undone = teacher_agreement(teacher, original, x, perturbation)
    return {"teacher_acc": real["acc"], "teacher_asr": real["asr"], "flip_rate_teacher": flip,
            "agreement": agreement, "undone": undone,
            "gate_passes": flip < RESIDUAL_FLIP and agreement + undone >= TEACHER_AGREEMENT}


def model_rows(name: str, us: list[float]) -> list[dict]:
    """One row per u (None: no perturbation clean, the presets before commit 2369a4d) for the zoo model ``name``."""
    recipe = RECIPES[RECIPE]
    original, attack, cfg, x, probed = zoo_model_probed(name, recipe)
    found = probed["trigger"]
    cleaned, info = channel_clean(original, cfg, x if found else None, found)
    flip, delta = universal_inversion(probed["universal"])
    perturbation = perturbation_trigger(flip, delta, len(x))
    test = load_dataset(recipe["dataset"], "val")
    base = {"model": model_name(name, recipe), "probe_fires": bool(trigger_score(found)),
            "channels_zeroed": info["n_pruned"], "flip_rate_original": flip["flip_rate"],
            "all_to_all": all_to_all_suspected(flip)}
    triggered = apply_found_trigger(x, perturbation, original.cc_spec)
    rows = []
    for u in [None, *us]:
        if u is None:
            pruned, n_pruned = cleaned, 0
        else:
            pruned, record = prune_trigger_channels(cleaned, x, triggered, u)
            n_pruned = record["n_pruned"]
        teacher = distillation_teacher(pruned, cfg)
        row = base | {"u": u, "perturbation_channels_zeroed": n_pruned,
                      "flip_rate_cleaned": trigger_flip_rate(pruned, x, perturbation, len(x))}
        row |= teacher_measures(teacher, original, x, perturbation, test, attack)
        print(f"{name} u={u}: {n_pruned} channels, teacher {row['teacher_acc']:.4f} / {row['teacher_asr']:.4f}, "
              f"flips {row['flip_rate_teacher']:.2f}, agreement {row['agreement']:.3f} + {row['undone']:.3f}", flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# A channel clean driven by the universal inverted perturbation, measured on the teacher\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "The teacher is the defense's (cpu preset): the original with its outlier-Lipschitz channels zeroed, then "
             "(rows with a u; the row without one is the presets before commit 2369a4d) the channels the scan's "
             "universal inverted perturbation excites (z > u in their layer, measured on the synthetic images), its "
             "singular values clipped at full rank. ACC / ASR in % on the real "
             "test set (never seen by a signal); the rest on the model's 1024 synthetic images: the perturbation's flip "
             "rate, the teacher's agreement with the original (+ the share it gives the class the perturbation maps to "
             "the original's), and whether the distillation gate would pass it (flips < "
             f"{RESIDUAL_FLIP:.0%}, agreement + that share >= {TEACHER_AGREEMENT:.0%}).\n",
             "| model | u | channels zeroed by the perturbation | teacher ACC / ASR | perturbation flips: original -> "
             "cleaned -> teacher | agreement (+ mapping undone) | gate |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {'-' if r['u'] is None else r['u']} | {r['perturbation_channels_zeroed']} | "
                     f"{100 * r['teacher_acc']:.2f} / {100 * r['teacher_asr']:.2f} | {r['flip_rate_original']:.2f} -> "
                     f"{r['flip_rate_cleaned']:.2f} -> {r['flip_rate_teacher']:.2f} | {100 * r['agreement']:.1f}% "
                     f"(+ {100 * r['undone']:.1f}%) | {'passes' if r['gate_passes'] else 'shut'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--u", nargs="+", type=float, default=DEFAULT_U)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [row for name in args.models for row in model_rows(name, args.u)]
    u_flag = "" if args.u == DEFAULT_U else f" --u {' '.join(f'{u:g}' for u in args.u)}"
    result = {"command": f"{COMMAND} --models {' '.join(args.models)}{u_flag}", "machine": machine(), "rows": rows}
    json_path, md_path = write_results("perturbation_clean", result, markdown(result))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()

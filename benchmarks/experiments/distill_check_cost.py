"""How cheap can the distillation check's inversions be and still choose the same student?

The distillation check (cc_core.defense.teacher.distill_check) runs the scan's universal inversion on
a distilled and an undistilled student and keeps the distilled one only if its flip rate is at
most DISTILL_FLIP_MARGIN above the undistilled one's. With the default inversion (3 restarts x
100 Adam steps of 128 images) the two inversions are most of the check's cost. This benchmark
defends each zoo model with and without distillation (benchmarks.experiments.student_signals.students), runs
the inversion on each student for every (steps, restarts) in the grid, and reports each
setting's flip rates, verdict and seconds next to the real test set's ACC / ASR of both students
(never used by the check). A restart count k is the best of the first k seeds, chosen as
flip_report chooses, so one set of runs per step count serves every k.

Run: python -m benchmarks.experiments.distill_check_cost [--models wanet blended blended-a2a] [--ratios 2 4]
Writes benchmarks/results/distill_check_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.common import machine, write_results
from benchmarks.experiments.student_signals import students
from cc_core.defense.teacher import DISTILL_CHECK_SAMPLES, DISTILL_FLIP_MARGIN
from cc_core.scan import InversionConfig, flip_report, restart_rank

COMMAND = "python -m benchmarks.experiments.distill_check_cost"
STEPS = (25, 50, 100)
RESTARTS = 3
REFERENCE = (100, 3)  # InversionConfig's defaults, what the check ran with when it was chosen


def seed_runs(model: torch.nn.Module, x: torch.Tensor, steps: int) -> list[dict]:
    """One single-restart flip report per seed 0 .. RESTARTS - 1 at ``steps`` steps, each with its seconds."""
    runs = []
    for seed in range(RESTARTS):
        start = time.perf_counter()
        report, _ = flip_report(model, x, InversionConfig(steps=steps, restarts=1, seed=seed))
        runs.append(report | {"seconds": time.perf_counter() - start})
    return runs


def best_of(runs: list[dict], k: int) -> dict:
    """What flip_report with ``k`` restarts returns: the best of the first ``k`` runs."""
    return max(runs[:k], key=restart_rank)


def student_flips(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """{(steps, restarts): (flip rate, seconds)} for every setting of the grid."""
    model = model.eval().cpu()
    out = {}
    for steps in STEPS:
        runs = seed_runs(model, x, steps)
        for k in range(1, RESTARTS + 1):
            out[(steps, k)] = (best_of(runs, k)["flip_rate"], sum(r["seconds"] for r in runs[:k]))
    return out


def run(models: list[str], ratios: list[float]) -> dict:
    torch.manual_seed(0)
    cases = []
    for name in models:
        for ratio in ratios:
            defended = {}
            for _label, result, x in students(name, ratio):
                distilled = bool((result.report["distillation"] or {}).get("distill"))
                defended["distilled" if distilled else "undistilled"] = (result, student_flips(result.model, x[:DISTILL_CHECK_SAMPLES]))
            if set(defended) != {"distilled", "undistilled"}:
                print(f"{name} {ratio:g}x: the preset did not distill, nothing to check", flush=True)
                continue
            settings = []
            for key in defended["distilled"][1]:
                (fd, sd), (fu, su) = defended["distilled"][1][key], defended["undistilled"][1][key]
                settings.append({"steps": key[0], "restarts": key[1], "flip_rate_distilled": fd,
                                 "flip_rate_undistilled": fu, "kept": fd <= fu + DISTILL_FLIP_MARGIN,
                                 "seconds": sd + su})
            case = {"model": name, "ratio": ratio, "settings": settings,
                    **{f"{k}_metrics": v[0].report["metrics"] for k, v in defended.items()}}
            cases.append(case)
            for s in settings:
                print(f"{name} {ratio:g}x steps {s['steps']} restarts {s['restarts']}: flips {s['flip_rate_distilled']:.3f} / "
                      f"{s['flip_rate_undistilled']:.3f} kept {'distilled' if s['kept'] else 'undistilled'} "
                      f"{s['seconds']:.1f} s", flush=True)
    return {"command": f"{COMMAND} --models {' '.join(models)} --ratios {' '.join(f'{r:g}' for r in ratios)}",
            "machine": machine(), "margin": DISTILL_FLIP_MARGIN, "samples": DISTILL_CHECK_SAMPLES,
            "reference": {"steps": REFERENCE[0], "restarts": REFERENCE[1]},
            "inversion": dataclasses.asdict(InversionConfig()), "cases": cases}


def reference_verdict(case: dict, reference: dict) -> bool:
    return next(s["kept"] for s in case["settings"]
                if (s["steps"], s["restarts"]) == (reference["steps"], reference["restarts"]))


def better_student(case: dict) -> str:
    """Which student the real test set prefers: the lower ASR when the two differ by more than 5
    points, else the higher ACC (information the check never sees)."""
    d, u = case["distilled_metrics"], case["undistilled_metrics"]
    if abs(d["asr_after"] - u["asr_after"]) > 0.05:
        return "distilled" if d["asr_after"] < u["asr_after"] else "undistilled"
    return "distilled" if d["acc_after"] >= u["acc_after"] else "undistilled"


def markdown(result: dict) -> str:
    m, ref = result["machine"], result["reference"]
    lines = ["# The distillation check's cost against its verdict\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             f"Universal inversion on the first {result['samples']} synthetic images of each student (batches of "
             f"{result['inversion']['batch_size']}, lr {result['inversion']['lr']}, l1 {result['inversion']['l1']}); the "
             f"distilled student is kept when its flip rate is at most {result['margin']} above the undistilled one's. "
             "Seconds: both students' inversions. ACC / ASR in %, on the real CIFAR-10 test set, which the check never "
             "sees; 'better' is the student the test set prefers (lower ASR when the two differ by more than 5 points, "
             f"else higher ACC). The reference is {ref['steps']} steps x {ref['restarts']} restarts.\n"]
    for case in result["cases"]:
        d, u = case["distilled_metrics"], case["undistilled_metrics"]
        lines += [f"## {case['model']}, {case['ratio']:g}x\n",
                  f"distilled {100 * d['acc_after']:.2f} / {100 * d['asr_after']:.2f}, undistilled "
                  f"{100 * u['acc_after']:.2f} / {100 * u['asr_after']:.2f}; better: **{better_student(case)}**.\n",
                  "| steps | restarts | flip rate distilled | flip rate undistilled | kept | same as reference | seconds |",
                  "|---|---|---|---|---|---|---|"]
        verdict = reference_verdict(case, ref)
        for s in case["settings"]:
            lines.append(f"| {s['steps']} | {s['restarts']} | {s['flip_rate_distilled']:.3f} | {s['flip_rate_undistilled']:.3f} | "
                         f"{'distilled' if s['kept'] else 'undistilled'} | {'yes' if s['kept'] == verdict else '**no**'} | "
                         f"{s['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["wanet", "blended", "blended-a2a"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0])
    args = parser.parse_args()
    result = run(args.models, args.ratios)
    for path in write_results("distill_check_cost", result, markdown(result)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

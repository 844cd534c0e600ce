"""Can a data-free signal on the defended model tell when distillation handed it the backdoor?

Distilling from a fine-tuned teacher helped the zoo WaNet student (ACC +1.8 at 2x, ASR 2.29 ->
3.90) and handed the Blended one its teacher's backdoor (ASR 8.18 -> 32.39,
sweep_defend_blended.md), and the two fine-tuned teachers' own ASRs (46.71 / 38.24%) say the
opposite of what their students do. So the question is asked of the students: each model is
defended with and without distillation from the same synthetic images, and each student is
measured with signals that need no real data, on those synthetic images:

- target pull: targeted PGD (L-inf ``eps``) towards each class c, on the images the student does
  not put in c; the suspected target's success rate over the mean of the other classes';
- PGD share: where untargeted PGD (eps 8/255) sends the images the student does not put in the
  suspected target, the fraction that lands in it;
- universal inversion: the scan's flip report (flip rate, where the flips go).

The real test set's ACC / ASR is measured beside them, never used by a signal.

Run: python -m benchmarks.experiments.student_signals [--models wanet blended badnet] [--ratio 2]
Writes benchmarks/results/student_signals.{json,md}.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.bench import RECIPES
from benchmarks.common import machine, shared_synthetic, write_results
from benchmarks.sweep_defend import TEACHER_FINETUNE_0911A44
from benchmarks.zoo import ensure_model, model_name
from cc_core.adversarial import PGDConfig, perturb, pgd, predictions
from cc_core.attacks import load_attack
from cc_core.data import load_dataset
from cc_core.io import load_model
from cc_core.defense.config import resolve_config
from cc_core.defense.run import defend
from cc_core.scan import InversionConfig, flip_report

COMMAND = "python -m benchmarks.experiments.student_signals"
RECIPE = "cifar10-resnet18"
PULL_EPS = 2 / 255
# (label, DefendConfig overrides). With a teacher fine-tune set, the preset's gate still distills
# from a teacher it verifies (BadNet) as is, and fine-tunes any other first. Neither runs the
# distillation check: these are the two students it compares.
SETTINGS = [
    ("no distillation", {"finetune": {"kd_weight": 0.0}, "distill_check": None}),
    ("distilled (a teacher the gate does not verify is fine-tuned at lr 0.0002 first)",
     {"teacher_finetune": TEACHER_FINETUNE_0911A44, "distill_check": None}),
]


def targeted_success(model: nn.Module, x: torch.Tensor, target: int, eps: float, steps: int = 10) -> float:
    """Fraction of ``x`` (N, C, H, W, normalized) that targeted L-inf PGD (``eps`` in pixel
    units, ``steps`` steps of eps / 4 from no perturbation, fp32) sends into class ``target``."""
    spec = model.cc_spec
    cfg = PGDConfig(eps=eps, step=eps / 4, steps=steps, random_start=False, mixed_precision=False)
    labels = torch.full((len(x),), target, dtype=torch.long)
    adv = perturb(model, x, labels, cfg, spec.mean, spec.std, torch.Generator(), target)
    return float((predictions(model, adv) == target).float().mean())


def signals(model: nn.Module, x: torch.Tensor, target: int) -> dict:
    """The data-free signals of ``model`` on synthetic images ``x`` for the suspected ``target``."""
    model = model.eval().cpu()
    pred = predictions(model, x).cpu()
    pulls = [targeted_success(model, x[pred != c], c, PULL_EPS) for c in range(model.cc_spec.num_classes)]
    others = [p for c, p in enumerate(pulls) if c != target]
    away = x[pred != target]
    adv = pgd(model, away, pred[pred != target], PGDConfig(mixed_precision=False))
    flip, _ = flip_report(model, x, InversionConfig())
    return {"pulls": pulls, "target_pull_ratio": pulls[target] / max(sum(others) / len(others), 1e-6),
            "pgd_target_share": float((predictions(model, adv).cpu() == target).float().mean()),
            "flip_rate": flip["flip_rate"], "flip_concentration": flip["concentration"],
            "flip_top_class": flip["target_class_estimate"]}


def students(name: str, ratio: float):
    """The zoo model ``name`` defended at ``ratio`` under each of SETTINGS, from the same cached
    synthetic images: yields (setting label, DefendResult, synthetic images x)."""
    recipe = RECIPES[RECIPE]
    test = load_dataset(recipe["dataset"], "val")
    directory = ensure_model(name, recipe)
    model, attack = load_model(directory / "model.safetensors"), load_attack(directory)
    for label, overrides in SETTINGS:
        cfg = resolve_config("cpu", ratio=ratio, scan_before=False, **overrides)
        x, y, _ = shared_synthetic(model_name(name, recipe), model, cfg.synth)
        yield label, defend(model, config=cfg, eval_data=test, attack=attack, progress=False,
                            log=lambda *a: None, synthetic=(x, y)), x


def run(models: list[str], ratio: float) -> dict:
    torch.manual_seed(0)
    rows = []
    for name in models:
        for label, result, x in students(name, ratio):
            r = result.report
            target = r["scan"]["suspected_target"]
            row = {"model": name, "ratio": ratio, "setting": label, "suspected_target": target,
                   "distilled": bool((r["distillation"] or {}).get("distill")), **r["metrics"],
                   "signals": signals(result.model, x[:512], target) if target is not None else None}
            rows.append(row)
            m, sig = r["metrics"], row["signals"] or {}
            print(f"{name} {label}: ACC {m['acc_after']:.4f} ASR {m['asr_after']:.4f} "
                  f"pull {sig.get('target_pull_ratio', float('nan')):.2f} share {sig.get('pgd_target_share', float('nan')):.3f} "
                  f"flip {sig.get('flip_rate', float('nan')):.3f}", flush=True)
    return {"command": f"{COMMAND} --models {' '.join(models)} --ratio {ratio:g}", "machine": machine(),
            "pull_eps": PULL_EPS, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Data-free signals on distilled and undistilled students\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "ACC / ASR in %, on the real CIFAR-10 test set (never seen by the defense or by a signal). "
             f"Signals on the first 512 synthetic images: target pull = targeted PGD success (eps {255 * result['pull_eps']:g}/255) "
             "towards the suspected target over the mean towards the other classes; PGD share = the fraction of the "
             "images not in the suspected target that untargeted PGD (eps 8/255) sends there; universal inversion = "
             "the scan's flip report (flip rate, top class, concentration).\n",
             "| model | ratio | setting | distilled | suspected target | ACC | ASR | target pull | PGD share | flip rate (top class, concentration) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s = r["signals"]
        sig = (f"{s['target_pull_ratio']:.2f} | {s['pgd_target_share']:.3f} | "
               f"{s['flip_rate']:.3f} ({s['flip_top_class']}, {s['flip_concentration']:.2f})") if s else "- | - | -"
        lines.append(f"| {r['model']} | {r['ratio']:g} | {r['setting']} | {'yes' if r['distilled'] else 'no'} | "
                     f"{r['suspected_target']} | {100 * r['acc_after']:.2f} | {100 * r['asr_after']:.2f} | {sig} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["wanet", "blended", "badnet"])
    parser.add_argument("--ratio", type=float, default=2.0)
    args = parser.parse_args()
    result = run(args.models, args.ratio)
    for path in write_results("student_signals", result, markdown(result)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

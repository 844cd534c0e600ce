"""Choose C&C's defaults by measurement: sweep tau x normalizer and ablate each loss term on
zoo models (ACC / ASR on the real CIFAR-10 test set, which the defense never sees).

Run: python -m benchmarks.sweep_defend [--models badnet wanet] [--ratios 2] [--grid small|full]
Writes benchmarks/results/sweep_defend.{json,md}. Synthetic data is made once per model from
the original model (synth_model='original') and shared by every setting, so settings differ
only in what they vary.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, write_results
from benchmarks.zoo import ensure_model
from cc_core.attacks import load_attack
from cc_core.data import load_dataset
from cc_core.pipeline import defend, resolve_config
from cc_core.io import load_model
from cc_core.synth import synthesize

COMMAND = "python -m benchmarks.sweep_defend"
GRIDS = {
    "small": [("mean", t) for t in (None, 2.0, 3.0, 4.0)] + [("max", t) for t in (0.5, 0.7)],
    "full": [("mean", t) for t in (None, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)]
            + [("max", t) for t in (0.3, 0.5, 0.7, 0.9)] + [("median", t) for t in (2.0, 3.0, 5.0)],
}
ABLATIONS = {"all terms": {}, "no adversarial term": {"adv_weight": 0.0},
             "no synthetic CE": {"synth_weight": 0.0}, "no distillation": {"kd_weight": 0.0},
             "no fine-tune": {"epochs": 0}}


def run(models: list[str], ratios: list[float], grid: str, ablate_tau: float | None) -> dict:
    torch.manual_seed(0)
    test = load_dataset("cifar10", "test")
    rows = []
    for name in models:
        directory = ensure_model(name)
        model, attack = load_model(directory / "model.safetensors"), load_attack(directory)
        base = resolve_config("cpu", synth_model="original")
        start = time.perf_counter()
        x, y, _ = synthesize(model, base.synth, progress=False)
        synth_seconds = time.perf_counter() - start
        settings = [(f"{norm} tau={tau}", {"normalizer": norm, "tau": tau}, {}) for norm, tau in GRIDS[grid]]
        settings += [(f"ablation: {label}", {"tau": ablate_tau}, ft) for label, ft in ABLATIONS.items()
                     if label != "all terms"]
        for ratio in ratios:
            for label, overrides, ft in settings:
                cfg = resolve_config("cpu", ratio=ratio, synth_model="original", finetune=ft, **overrides)
                result = defend(model, config=cfg, eval_data=test, attack=attack, progress=False,
                                log=lambda *a: None, synthetic=(x, y))
                r = result.report
                rows.append({"model": name, "ratio": ratio, "setting": label, **overrides, "finetune": ft,
                             **r["metrics"], "concentration_before": r["scan"]["concentration_before"],
                             "concentration_after": r["scan"]["concentration_after"],
                             "seconds_excl_synthesis": r["timings_s"]["total"]})
                m = r["metrics"]
                print(f"{name} {ratio}x {label}: ACC {m['acc_after']:.4f} ASR {m['asr_after']:.4f} "
                      f"({r['timings_s']['total']:.0f} s)", flush=True)
        rows.append({"model": name, "setting": "synthesis (shared)", "seconds": synth_seconds})
    return {"command": COMMAND, "machine": machine(), "grid": grid, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# C&C sweep: tau x normalizer, and loss-term ablations\n",
             f"`{result['command']}` (grid {result['grid']}) on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"commit {m['git_commit']}. ACC/ASR in %, real CIFAR-10 test set (never seen by the defense).\n",
             "| model | ratio | setting | ACC before | ACC after | ASR before | ASR after | scan conc. before/after | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "acc_after" not in r:
            continue
        lines.append(f"| {r['model']} | {r['ratio']} | {r['setting']} | {100 * r['acc_before']:.2f} | "
                     f"{100 * r['acc_after']:.2f} | {100 * r['asr_before']:.2f} | {100 * r['asr_after']:.2f} | "
                     f"{r['concentration_before']:.2f} / {r['concentration_after']:.2f} | {r['seconds_excl_synthesis']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["badnet", "wanet"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0])
    parser.add_argument("--grid", choices=list(GRIDS), default="small")
    parser.add_argument("--ablate-tau", type=float, default=3.0)
    args = parser.parse_args()
    result = run(args.models, args.ratios, args.grid, args.ablate_tau)
    print(*write_results("sweep_defend", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

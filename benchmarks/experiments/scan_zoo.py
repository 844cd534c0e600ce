"""Does `cleancompact scan` tell the zoo's backdoored models from a clean one of the same recipe?

Run: python -m benchmarks.experiments.scan_zoo [--models badnet wanet none] [--seeds 0 1 2] [--l1 0.01 0.1 0.3 1.0]
Runs the CLI (`cleancompact scan MODEL --seed S --out ...`, otherwise default settings) on each
zoo model (trained into the cache if missing) once per seed (the seed draws the synthetic images
and PGD's random start, so the spread over seeds is the scan's own noise) and writes benchmarks/results/scan.{json,md}: the risk score, the
estimated vs the true target class, the channel-outlier and adversarial-histogram statistics,
and the scan's wall time. The `audit` flow's flag threshold is chosen from this table. A second
table re-runs the trigger inversion at each ``--l1`` penalty on the same synthetic images (the
inversion's one free choice, measured rather than assumed). Rows of zoo models not named in
``--models`` are kept from the previous results, each with the command and commit that made it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core.adversarial import class_histogram, concentration
from cc_core.attacks import load_attack
from cc_core.io import load_model
from cc_core.scan import InversionConfig, channel_outliers, invert_through_channels
from cc_core.synth import SynthConfig, synthesize


def scan_model(attack: str, seed: int) -> dict:
    directory = ensure_model(attack)
    exe = Path(sys.executable).with_name("cleancompact")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scan.json"
        subprocess.run([str(exe), "scan", str(directory / "model.safetensors"), "--seed", str(seed),
                        "--out", str(out), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    spec = load_attack(directory) if (directory / "attack.json").exists() else None
    true_target = None if spec is None or spec.all_to_all else spec.target
    inv = report["inversion"]
    return {"model": model_name(attack), "attack": attack, "seed": seed, "true_target": true_target,
            "risk": report["risk"], "risk_signals": report["risk_signals"], "target_class_estimate": report["target_class_estimate"],
            "n_channel_outliers": inv["n_channel_outliers"], "max_channel_z": inv["max_channel_z"],
            "inversion_histogram": inv["histogram"], "adversarial_concentration": report["concentration"],
            "adversarial_target": int(max(range(len(report["histogram"])), key=report["histogram"].__getitem__)),
            "anomaly_index": report["anomaly_index"], "timings_s": report["timings_s"],
            "best_stamp_flip_rate": report["patch"]["flip_rate"] if report.get("patch") else None,
            "best_warp_flip_rate": report["warp"]["flip_rate"] if report.get("warp") else None,
            "command": f"cleancompact scan <cache>/zoo/{model_name(attack)}/model.safetensors --seed {seed}"}


def l1_sweep(attack: str, penalties: list[float]) -> list[dict]:
    """Inversion through the outlier channels at each L1 penalty, on one set of synthetic images."""
    torch.manual_seed(0)
    model = load_model(ensure_model(attack) / "model.safetensors").eval()
    x, _, _ = synthesize(model, SynthConfig(n_samples=256, iterations=100), progress=False)
    channels = channel_outliers(model)[:InversionConfig().max_channels]
    rows = []
    for l1 in penalties:
        x_inv, delta = invert_through_channels(model, x, channels, InversionConfig(l1=l1))
        hist = class_histogram(model, x_inv)
        rows.append({"model": model_name(attack), "l1": l1, "concentration": concentration(hist),
                     "top_class": int(hist.argmax()), "delta_mean_abs": float(delta.abs().mean()),
                     "pixels_changed_over_0.1": float((delta.abs().amax(dim=1) > 0.1).float().mean())})
    return rows


def _kept_lines(result: dict) -> list[str]:
    origins: dict[tuple[str, str], list[str]] = {}
    for r in result["rows"]:
        if r["run_command"] != result["command"]:
            models = origins.setdefault((r["run_command"], r["commit"]), [])
            models += [] if r["model"] in models else [r["model"]]
    return [f"Rows of {', '.join(models)} are kept from an earlier run: `{cmd}` at commit {commit}.\n"
            for (cmd, commit), models in origins.items()]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Backdoor scan on the zoo\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "Each row is `cleancompact scan --seed S` with its default settings (256 synthetic images, 100 iterations, "
             "PGD eps 8/255, inversion through at most 8 outlier channels with Lipschitz z > 3, L1 penalty "
             f"{InversionConfig().l1}).\n",
             *_kept_lines(result),
             "Risk = the max of the risk signals: inversion concentration, adversarial score "
             "(max(0, 1 - 2 / anomaly index) of the PGD class histogram), all-to-all score (universal "
             "inversion), patch score (the patch probe's best stamp's flip rate once >= 0.5) and warp score "
             "(the warp probe's best field's flip rate once >= 0.25); '-': a row from before that signal.\n",
             "| model | seed | risk | inversion score | adversarial score (anomaly index) | all-to-all score "
             "| patch score (best stamp's flip rate) | warp score (best field's flip rate) | target: estimated / true "
             "| outlier channels | max z | inversion histogram | PGD top class | scan s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        z = "-" if r["max_channel_z"] is None else f"{r['max_channel_z']:.2f}"
        hist = "-" if r["inversion_histogram"] is None else " ".join(map(str, r["inversion_histogram"]))
        true = "-" if r["true_target"] is None else r["true_target"]
        signals = r["risk_signals"]
        lines.append(f"| {r['model']} | {r['seed']} | {r['risk']:.2f} | {signals['inversion']:.2f} | "
                     f"{signals['adversarial']:.2f} ({r['anomaly_index']:.1f}) | {_signal(signals, 'all_to_all')} | "
                     f"{_signal(signals, 'patch')}{_best(r, 'best_stamp_flip_rate')} | "
                     f"{_signal(signals, 'warp')}{_best(r, 'best_warp_flip_rate')} | {r['target_class_estimate']} / {true} | "
                     f"{r['n_channel_outliers']} | {z} | {hist} | {r['adversarial_target']} | "
                     f"{r['timings_s']['total']:.0f} |")
    lines += ["\n## Separation\n", "| model | min risk | max risk | target right |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == name]
        right = "-" if rows[0]["true_target"] is None else \
            f"{sum(r['target_class_estimate'] == r['true_target'] for r in rows)}/{len(rows)}"
        lines.append(f"| {name} | {min(r['risk'] for r in rows):.2f} | {max(r['risk'] for r in rows):.2f} | {right} |")
    lines += ["\n## Trigger inversion vs its L1 penalty\n",
              "Same synthetic images per model; the scan's default penalty is "
              f"{InversionConfig().l1}. Mean |delta| is in pixel units (0-1).\n",
              "| model | L1 penalty | concentration | top class | mean abs delta | pixels changed > 0.1 |",
              "|---|---|---|---|---|---|"]
    for r in result["l1_sweep"]:
        lines.append(f"| {r['model']} | {r['l1']:g} | {r['concentration']:.2f} | {r['top_class']} | "
                     f"{r['delta_mean_abs']:.4f} | {100 * r['pixels_changed_over_0.1']:.1f}% |")
    return "\n".join(lines) + "\n"


def _signal(signals: dict, name: str) -> str:
    return f"{signals[name]:.2f}" if name in signals else "-"


def _best(row: dict, key: str) -> str:
    return "" if row.get(key) is None else f" ({row[key]:.2f})"


def kept_from_previous(path: Path, rerun: set[str]) -> tuple[list[dict], list[dict]]:
    """Rows (and L1-sweep rows) of the models not re-run this time, from the previous results,
    each still naming the command and commit that made it."""
    if not path.exists():
        return [], []
    previous = json.loads(path.read_text())
    origin = {"run_command": previous["command"], "commit": previous["machine"]["git_commit"]}
    keep = [origin | r for r in previous["rows"] if r["model"] not in rerun]
    keep_sweep = [origin | r for r in previous.get("l1_sweep", []) if r["model"] not in rerun]
    return keep, keep_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["badnet", "wanet", "none"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--l1", nargs="+", type=float, default=[0.01, 0.1, 0.3, 1.0])
    args = parser.parse_args()
    rows = []
    for attack in args.models:
        for seed in args.seeds:
            rows.append(scan_model(attack, seed))
            print(f"{attack} seed {seed}: risk {rows[-1]['risk']:.2f}, target {rows[-1]['target_class_estimate']}",
                  flush=True)
    sweep = [row for attack in args.models for row in l1_sweep(attack, args.l1)]
    command = (f"python -m benchmarks.experiments.scan_zoo --models {' '.join(args.models)} --seeds {' '.join(map(str, args.seeds))} "
               f"--l1 {' '.join(f'{v:g}' for v in args.l1)}")
    this_run = machine()
    for row in rows + sweep:
        row.update(run_command=command, commit=this_run["git_commit"])
    kept_rows, kept_sweep = kept_from_previous(RESULTS / "scan.json", {model_name(a) for a in args.models})
    result = {"command": command, "machine": this_run, "rows": kept_rows + rows, "l1_sweep": kept_sweep + sweep}
    print(*write_results("scan", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

"""Does `cleancompact scan` tell the zoo's backdoored models from a clean one of the same recipe?

Run: python -m benchmarks.scan_zoo [--models badnet wanet none]
Runs the CLI (`cleancompact scan MODEL --out ...`, default settings) on each zoo model (trained
into the cache if missing) and writes benchmarks/results/scan.{json,md}: the risk score, the
estimated vs the true target class, the channel-outlier and adversarial-histogram statistics,
and the scan's wall time. The `audit` flow's flag threshold is chosen from this table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core.attacks import load_attack


def scan_model(attack: str) -> dict:
    directory = ensure_model(attack)
    exe = Path(sys.executable).with_name("cleancompact")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scan.json"
        subprocess.run([str(exe), "scan", str(directory / "model.safetensors"), "--out", str(out), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    spec = load_attack(directory) if (directory / "attack.json").exists() else None
    true_target = None if spec is None or spec.all_to_all else spec.target
    inv = report["inversion"]
    return {"model": model_name(attack), "attack": attack, "true_target": true_target,
            "risk": report["risk"], "target_class_estimate": report["target_class_estimate"],
            "n_channel_outliers": inv["n_channel_outliers"], "max_channel_z": inv["max_channel_z"],
            "inversion_histogram": inv["histogram"], "adversarial_concentration": report["concentration"],
            "adversarial_target": int(max(range(len(report["histogram"])), key=report["histogram"].__getitem__)),
            "anomaly_index": report["anomaly_index"], "timings_s": report["timings_s"],
            "command": f"cleancompact scan <cache>/zoo/{model_name(attack)}/model.safetensors"}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Backdoor scan on the zoo\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             "Each row is `cleancompact scan` with its default settings (256 synthetic images, 100 iterations, "
             "PGD eps 8/255, inversion through at most 8 outlier channels with Lipschitz z > 3).\n",
             "| model | risk | target: estimated / true | outlier channels | max z | inversion histogram | "
             "PGD concentration (class) | scan s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        z = "-" if r["max_channel_z"] is None else f"{r['max_channel_z']:.2f}"
        hist = "-" if r["inversion_histogram"] is None else " ".join(map(str, r["inversion_histogram"]))
        true = "-" if r["true_target"] is None else r["true_target"]
        lines.append(f"| {r['model']} | {r['risk']:.2f} | {r['target_class_estimate']} / {true} | "
                     f"{r['n_channel_outliers']} | {z} | {hist} | {r['adversarial_concentration']:.2f} "
                     f"({r['adversarial_target']}) | {r['timings_s']['total']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["badnet", "wanet", "none"])
    args = parser.parse_args()
    rows = []
    for attack in args.models:
        rows.append(scan_model(attack))
        print(f"{attack}: risk {rows[-1]['risk']:.2f}, target {rows[-1]['target_class_estimate']}", flush=True)
    result = {"command": f"python -m benchmarks.scan_zoo --models {' '.join(args.models)}",
              "machine": machine(), "rows": rows}
    print(*write_results("scan", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

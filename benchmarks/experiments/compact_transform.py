"""Parameter counts and wall time of clean_compact (steps 1-4) for every zoo architecture.

Run: python -m benchmarks.experiments.compact_transform   (writes benchmarks/results/compact_transform.*)
Weights are seeded random initializations: counts and timings do not depend on training.
"""
from __future__ import annotations

import time

import torch

from benchmarks.common import machine, write_results
from cc_core import build_model, clean_compact, count_params

COMMAND = "python -m benchmarks.experiments.compact_transform"
PAPER = {("resnet18", 2): 5.58e6, ("resnet18", 3): 3.72e6, ("resnet18", 4): 2.78e6}


def run() -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = []
    for arch in ("resnet18", "resnet34", "preactresnet18", "vgg19_bn", "mobilenet_v2"):
        model = build_model(arch).eval()
        for ratio in (2, 3, 4):
            for method, tau in (("hosvd", None), ("hosvd", 3.0), ("hooi", 3.0)):
                if method == "hooi" and arch != "resnet18":
                    continue
                start = time.perf_counter()
                new, plan = clean_compact(model, ratio=ratio, tau=tau, method=method)
                seconds = time.perf_counter() - start
                rows.append({"arch": arch, "ratio": ratio, "method": method, "tau": tau,
                             "params_before": count_params(model), "params_after": count_params(new),
                             "ratio_achieved": round(plan.ratio_achieved, 4),
                             "paper_params": PAPER.get((arch, ratio)),
                             "seconds": round(seconds, 2),
                             "factorized_1x1": plan.config["decompose_1x1"]})
                print(rows[-1], flush=True)
    return {"command": COMMAND, "machine": machine(), "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# clean_compact: parameters and time\n",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} threads), commit {m['git_commit']}.\n",
             "| arch | ratio | method | tau | params before | params after | achieved | paper | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        paper = f"{r['paper_params'] / 1e6:.2f}M" if r["paper_params"] else "-"
        lines.append(f"| {r['arch']} | {r['ratio']} | {r['method']} | {r['tau'] or '-'} | "
                     f"{r['params_before']:,} | {r['params_after']:,} | {r['ratio_achieved']:.3f} | "
                     f"{paper} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    result = run()
    print(*write_results("compact_transform", result, markdown(result)), sep="\n")

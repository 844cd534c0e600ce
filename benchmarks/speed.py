"""onnxruntime speed-up of C&C-compacted models vs the original, on this CPU.

Run: python -m benchmarks.speed [--arch resnet18] [--ratios 2 3 4] [--batches 1 128]
         [--rank-strategies uniform energy]
Full-width models with seeded random weights (latency depends on the ranks, not on the values;
but energy allocation picks ranks from the spectra, and random weights have flatter spectra
than trained ones, so its rows show the latency of an allocation close to uniform; the bench
rows time the defended zoo models themselves). Every
ratio's ONNX file and the original's are timed in ONE process with pinned threads, interleaved
(original, 2x, 3x, 4x, original, ...), so machine noise hits all of them alike. The MAC ratio
is the ceiling a dense kernel could reach. Writes benchmarks/results/speed.{json,md}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine, write_results
from cc_core import build_model, clean_compact, count_params
from cc_core.export import export_onnx, paired_latency, parity
from cc_core.defense.report import macs

PAPER_GPU_SPEEDUP = {2: 1.41, 3: 1.61, 4: 1.83}  # ResNet-18, CIFAR-10, the paper's Table 2


def repeats_for(batch: int) -> int:
    return 200 if batch == 1 else 15


def run(arch: str, ratios: list[float], batches: list[int], threads: int, strategies: list[str]) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(arch).eval()
    shape = model.cc_spec.input_shape
    models = {"original": model} | {
        f"{r:g}x {s}": clean_compact(model, ratio=r, tau=3.0, rank_strategy=s)[0].eval()
        for r in ratios for s in strategies}
    rows = {name: {"params": count_params(m), "macs": macs(m, shape)} for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = export_onnx(m, Path(tmp) / f"{name}.onnx", shape)
            rows[name]["parity_max_abs"] = parity(m, paths[name])
        latency = {b: paired_latency(paths, shape, b, threads=threads, repeats=repeats_for(b)) for b in batches}
    for name, row in rows.items():
        row["latency_ms"] = {str(b): latency[b][name] for b in batches}
        row["speedup"] = {str(b): latency[b]["original"] / latency[b][name] for b in batches}
        row["mac_ratio"] = rows["original"]["macs"] / row["macs"]
        ratio = None if name == "original" else float(name.split("x")[0])
        row["paper_gpu_speedup"] = PAPER_GPU_SPEEDUP.get(ratio)
    return {"command": f"python -m benchmarks.speed --arch {arch} --ratios {' '.join(f'{r:g}' for r in ratios)} "
                       f"--batches {' '.join(map(str, batches))} --threads {threads} "
                       f"--rank-strategies {' '.join(strategies)}",
            "arch": arch, "rank_strategies": strategies, "input_shape": list(shape), "threads": threads, "machine": machine(),
            "models": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    batches = list(next(iter(result["models"].values()))["latency_ms"])
    head = " | ".join(f"ms @ batch {b} | speed-up @ {b}" for b in batches)
    lines = [f"# onnxruntime speed-up: {result['arch']} (full width), CPU\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, onnxruntime CPU provider, "
             f"{result['threads']} intra-op threads, torch {m['torch']}, commit {m['git_commit']}. Median of "
             "interleaved runs in one process. Compacted with tau 3 (HOSVD), ranks by the named strategy "
             "(multiples of 16); weights are seeded random.\n",
             f"| model | params | MACs | MAC ratio (ceiling) | {head} | paper GPU speed-up |",
             "|---|---|---|---|" + "---|---|" * len(batches) + "---|"]
    for name, r in result["models"].items():
        cells = " | ".join(f"{r['latency_ms'][b]:.2f} | {r['speedup'][b]:.2f}" for b in batches)
        paper = "-" if r["paper_gpu_speedup"] is None else f"{r['paper_gpu_speedup']:.2f}"
        lines.append(f"| {name} | {r['params']:,} | {r['macs'] / 1e6:.0f}M | {r['mac_ratio']:.2f} | {cells} | {paper} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 3.0, 4.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank-strategies", nargs="+", choices=["uniform", "energy"], default=["uniform", "energy"])
    args = parser.parse_args()
    result = run(args.arch, args.ratios, args.batches, args.threads, args.rank_strategies)
    print(markdown(result))
    print(*write_results(f"speed_{args.arch}", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

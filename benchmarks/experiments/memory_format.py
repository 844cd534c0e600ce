"""Contiguous vs channels_last weights (``cc_core.device.channels_last``) for the steps the defense
spends its time in.

Run: python -m benchmarks.experiments.memory_format   (writes benchmarks/results/memory_format.*)
- input gradient: forward + backward to a batch of 128 contiguous images with frozen weights
  (synthesis, PGD, the scan's trigger inversions);
- fine-tune step: one SGD step of the weights on a batch of 128 (the recovery fine-tune);
on the zoo's ResNet-18 w0.25 and on its 2x and 4x compactions (energy ranks, so no calibration
images are needed), in the precision the pipeline picks on this machine
(``cc_core.device.autocast``). Only the weights change layout, as in the pipeline. Both layouts run
interleaved in one process, median of ``--repeats`` after a warm-up; weights are seeded random
(speed does not depend on training).
"""
from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, machine, provenance, write_results
from cc_core import build_model, clean_compact
from cc_core.device import autocast

COMMAND = "python -m benchmarks.experiments.memory_format"


def _loss(model, x, y) -> torch.Tensor:
    with autocast(torch.device("cpu"), True):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def _input_gradient_step(model, x, y) -> None:
    model.eval().requires_grad_(False)
    _loss(model, x.clone().requires_grad_(True), y).backward()


def _finetune_step(model, x, y) -> None:
    model.train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    _loss(model, x, y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


WORKLOADS = {"input gradient": _input_gradient_step, "fine-tune step": _finetune_step}


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    original = build_model("resnet18", 10, 0.25).eval()
    models = {"original": original}
    for ratio in (2, 4):
        models[f"C&C {ratio}x"] = clean_compact(original, ratio=ratio, tau=None, rank_strategy="energy")[0].eval()
    return models


def run(repeats: int = 5, threads: int = 2, batch: int = 128) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    rows = []
    for name, model in _models().items():
        variants = {"contiguous": model, "channels_last": _channels_last_copy(model)}
        for workload, step in WORKLOADS.items():
            medians = interleaved_medians({layout: functools.partial(step, m, x, y) for layout, m in variants.items()},
                                          repeats)
            rows.append({"model": name, "workload": workload, "seconds": medians,
                         "speedup": medians["contiguous"] / medians["channels_last"]})
            print(rows[-1], flush=True)
    return {"command": COMMAND, "repeats": repeats, "batch": batch, "machine": machine(), "rows": rows}


def _channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def markdown(result: dict) -> str:
    lines = ["# Contiguous vs channels_last on this CPU\n",
             f"{provenance(result)}; median of "
             f"{result['repeats']} interleaved runs in one process. Batch {result['batch']}, seeded random weights of "
             "ResNet-18 w0.25 and its energy-rank compactions; input gradient: forward + backward to the input "
             "with frozen weights; fine-tune step: one SGD step of the weights.\n",
             "| model | workload | contiguous s | channels_last s | speed-up |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['workload']} | {r['seconds']['contiguous']:.3f} | "
                     f"{r['seconds']['channels_last']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    result = run(args.repeats, args.threads, args.batch)
    print(*write_results("memory_format", result, markdown(result)), sep="\n")

"""fp32 vs bf16 autocast on this CPU: the two step shapes the pipeline spends its time in.

Run: python -m benchmarks.experiments.precision   (writes benchmarks/results/precision.*)
- train: one SGD step of the zoo's ResNet-18 w0.25, batch 256, channels_last (zoo training,
  recovery fine-tune);
- input gradient: forward + backward to a batch of 128 images with frozen weights (synthesis,
  PGD, trigger inversion).
Both precisions run interleaved in one process, median of ``--repeats`` after a warm-up; weights
are seeded random (speed does not depend on training). ``cpu_bf16_native`` in the machine record
is what ``cc_core.device`` decides from: with it off, the pipeline computes in fp32.
"""
from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, machine, provenance, write_results
from cc_core import build_model

COMMAND = "python -m benchmarks.experiments.precision"
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def _loss(model, x, y, dtype) -> torch.Tensor:
    """Cross-entropy of ``model(x)`` with the forward forced to ``dtype`` (None: fp32); unlike
    ``cc_core.device.autocast``, which picks the dtype from the hardware."""
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def _train_step(model, optimizer, x, y, dtype) -> None:
    loss = _loss(model, x, y, dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _input_gradient_step(model, x, y, dtype) -> None:
    _loss(model, x.clone().requires_grad_(True), y, dtype).backward()


def run(repeats: int = 3, threads: int = 2) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model("resnet18", 10, 0.25).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    frozen = build_model("resnet18", 10, 0.25).eval().requires_grad_(False)
    workloads = {
        "train step (batch 256)": lambda dtype: _train_step(
            model.train(), optimizer, torch.randn(256, 3, 32, 32).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 10, (256,)), dtype),
        "input gradient (batch 128)": lambda dtype: _input_gradient_step(
            frozen, torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)), dtype),
    }
    rows = []
    for name, step in workloads.items():
        medians = interleaved_medians({p: functools.partial(step, dtype) for p, dtype in PRECISIONS.items()}, repeats)
        rows.append({"workload": name, "seconds": medians, "bf16_over_fp32": medians["bfloat16"] / medians["float32"]})
        print(rows[-1], flush=True)
    return {"command": COMMAND, "repeats": repeats, "machine": machine(), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# fp32 vs bf16 autocast on this CPU\n",
             f"{provenance(result)}; median of "
             f"{result['repeats']} interleaved runs in one process. ResNet-18 w0.25, seeded random weights.\n",
             "| workload | fp32 s | bf16 s | bf16 / fp32 |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} | {r['seconds']['float32']:.3f} | {r['seconds']['bfloat16']:.3f} | "
                     f"{r['bf16_over_fp32']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = run(args.repeats, args.threads)
    print(*write_results("precision", result, markdown(result)), sep="\n")

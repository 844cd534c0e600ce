"""The synthesis step (``cc_core.synth.optimize_batch``): how its BatchNorm statistics are
computed and the weights' memory layout.

Run: python -m benchmarks.experiments.synthesis_step [--arch A --width W] [--name N]
     (writes benchmarks/results/N.*, default synthesis_step)
Four variants of the same Adam step on a batch of 128 images through a zoo architecture (default
ResNet-18 w0.25; seeded random weights, since speed does not depend on training), in the precision
the pipeline picks on this machine: BN statistics as ``mean`` + ``var`` (two passes, what synthesis did up to commit 5963ada)
or ``cc_core.synth.channel_moments`` (E[x^2] - E[x]^2), with contiguous or channels_last weights
(``cc_core.device.channels_last``). They run interleaved in one process: the median seconds of a
batch of ``--iterations`` steps (hooks and layout change included) over ``--repeats`` rounds after a
warm-up batch, per step.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys

import torch
from tqdm import tqdm

from benchmarks.common import interleaved_medians, machine, provenance, write_results
from cc_core import build_model
from cc_core.device import channels_last
from cc_core.synth import BNStatsLoss, SynthConfig, optimize_batch, pixel_bounds

COMMAND = "python -m benchmarks.experiments.synthesis_step"
ARCH_NAMES = {"resnet18": "ResNet-18", "vgg19_bn": "VGG-19-BN", "mobilenet_v2": "MobileNet-V2"}


class TwoPassStatsLoss(BNStatsLoss):
    """The statistics-matching loss with mean and variance computed the textbook way."""

    moments = staticmethod(lambda x: (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)))


VARIANTS = {("mean + var", "contiguous"): (TwoPassStatsLoss, False),
            ("mean + var", "channels_last"): (TwoPassStatsLoss, True),
            ("E[x^2] - E[x]^2", "contiguous"): (BNStatsLoss, False),
            ("E[x^2] - E[x]^2", "channels_last"): (BNStatsLoss, True)}


def _synthesize_batch(model, stats_cls, layout_cl: bool, cfg: SynthConfig, y: torch.Tensor) -> None:
    stats = stats_cls(model)
    bounds = pixel_bounds(model.cc_spec.mean, model.cc_spec.std, y.device)
    try:
        with channels_last(model) if layout_cl else contextlib.nullcontext():
            optimize_batch(model, stats, y, cfg, torch.Generator().manual_seed(0), bounds, tqdm(disable=True))
    finally:
        stats.remove()


def run(repeats: int = 4, iterations: int = 10, threads: int = 2, batch: int = 128,
        arch: str = "resnet18", width: float = 0.25, command: str = COMMAND) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, 10, width).eval().requires_grad_(False)
    cfg = SynthConfig(n_samples=batch, batch_size=batch, iterations=iterations)
    y = torch.arange(batch) % 10
    medians = interleaved_medians({key: functools.partial(_synthesize_batch, model, stats_cls, layout_cl, cfg, y)
                                   for key, (stats_cls, layout_cl) in VARIANTS.items()}, repeats)
    per_step = {key: seconds / iterations for key, seconds in medians.items()}
    baseline = per_step[("mean + var", "contiguous")]
    rows = [{"statistics": stats, "weights": layout, "seconds_per_step": v, "speedup": baseline / v}
            for (stats, layout), v in per_step.items()]
    for r in rows:
        print(r, flush=True)
    return {"command": command, "arch": arch, "width": width, "repeats": repeats, "iterations": iterations,
            "batch": batch, "machine": machine(), "rows": rows}


def model_text(result: dict) -> str:
    """'ResNet-18 w0.25' (results from before the --arch option were all ResNet-18 w0.25)."""
    arch = result.get("arch", "resnet18")
    return f"{ARCH_NAMES.get(arch, arch)} w{result.get('width', 0.25):g}"


def markdown(result: dict) -> str:
    lines = ["# The synthesis step: BN statistics and weight layout\n",
             f"{provenance(result)}. One Adam step of "
             f"`cc_core.synth.optimize_batch` on {result['batch']} images through {model_text(result)} (seeded random "
             f"weights); median over {result['repeats']} interleaved batches of {result['iterations']} steps. "
             "Speed-up against mean + var with contiguous weights (the pipeline before).\n",
             "| BN statistics | weights | s / step | speed-up |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['statistics']} | {r['weights']} | {r['seconds_per_step']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--name", default="synthesis_step", help="result file name under benchmarks/results")
    args = parser.parse_args()
    command = " ".join([COMMAND, *sys.argv[1:]])
    result = run(args.repeats, args.iterations, args.threads, args.batch, args.arch, args.width, command)
    print(*write_results(args.name, result, markdown(result)), sep="\n")

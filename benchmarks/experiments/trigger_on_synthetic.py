"""Does a model's real trigger fire on its own synthetic images, and does the scan's inversion find it?

Run: python -m benchmarks.experiments.trigger_on_synthetic [--attacks badnet-a2a ...] [--model-dir DIR ...]
     [--samples N] [--probe-sizes S ...] [--probe-stride T] [--name NAME]
     (writes benchmarks/results/NAME.*, default trigger_on_synthetic)
For each backdoored model (zoo models by attack, trained if not cached; or any directory with
model.safetensors + attack.json, e.g. the demo's model): the synthetic images the `cpu` preset
makes (``--samples`` of them; shared with bench rows and sweeps through the synthetic cache)
and 1,000 seeded random test images. For each set, the fraction of images the TRUE trigger sends
to the attack's label (all-to-one: the target, counting images not already predicted as it;
all-to-all: the next class), with the model's own predictions as the source labels; then the
flip rate of the scan's universal inversion and the patch probe on the synthetic images. A trigger that fires on
synthetic images while the inversion flips few of them means the data is there and the trigger
search is what fails; a trigger that does not fire on them means the synthetic data is the gap.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, shared_synthetic, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.adversarial import _to_pixels, predictions
from cc_core.attacks.base import load_attack
from cc_core.data import load_dataset, normalize
from cc_core.defense.config import resolve_config
from cc_core.probes import PatchProbeConfig, patch_probe
from cc_core.scan import InversionConfig, flip_report

COMMAND = "python -m benchmarks.experiments.trigger_on_synthetic"
REAL_SAMPLES = 1000


def trigger_rate(model, attack, x: torch.Tensor) -> float:
    """Of normalized images ``x`` (N, C, H, W), the fraction the true trigger sends to the attack
    label of the class the model gives them (all-to-one: images already in the target left out)."""
    spec = model.cc_spec
    before = predictions(model, x)
    keep = attack.eligible(before)
    pixels, _, _ = _to_pixels(x[keep], spec.mean, spec.std)
    triggered = normalize(attack.apply_trigger(pixels.clamp(0, 1)).clamp(0, 1), spec.mean, spec.std)
    return float((predictions(model, triggered) == attack.attack_labels(before[keep])).float().mean())


def measure(name: str, directory: Path, samples: int, dataset: str, probe: PatchProbeConfig) -> dict:
    model = load_model(directory / "model.safetensors").eval()
    attack = load_attack(directory)
    synth = dataclasses.replace(resolve_config("cpu").synth, n_samples=samples)
    x_syn = shared_synthetic(name, model, synth)[0].cpu()
    test = load_dataset(dataset, "val")
    pick = np.random.default_rng(0).choice(len(test), REAL_SAMPLES, replace=False)
    x_real, _ = test.subset(pick).tensors()
    x_real = normalize(x_real.float() / 255, model.cc_spec.mean, model.cc_spec.std)
    start = time.perf_counter()
    flip, _ = flip_report(model, x_syn, InversionConfig())
    inversion_seconds = time.perf_counter() - start
    start = time.perf_counter()
    found = patch_probe(model, x_syn, probe)
    return {"model": name, "attack": attack.label, "synthetic_samples": len(x_syn), "real_samples": REAL_SAMPLES,
            "trigger_rate_synthetic": trigger_rate(model, attack, x_syn),
            "trigger_rate_real": trigger_rate(model, attack, x_real),
            "inversion_flip_rate": flip["flip_rate"], "inversion_concentration": flip["concentration"],
            "inversion_top_class": flip["target_class_estimate"], "inversion_seconds": inversion_seconds,
            "patch_probe": found, "patch_probe_seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Does the real trigger fire on synthetic images?\n",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}), commit {m['git_commit']}. "
             f"Arguments: `{' '.join(result['argv'])}`. Synthetic images: the `cpu` preset's "
             f"({json.dumps(result['synth'])}) with N samples. Trigger rate: the "
             "fraction the true trigger sends to the attack label of the class the model gives them. Inversion: "
             "the scan's universal inversion (defaults) on the same synthetic images. Patch probe "
             f"(`cc_core.probes.patch_probe`, {json.dumps(result['probe'])}): of the solid square stamps (black or white, "
             "every size, every stride px), the one that changes the most predictions of the synthetic images, with "
             "the median stamp's rate on the screening images.\n",
             "| model | attack | synthetic N | trigger rate, synthetic | trigger rate, real | inversion flip rate | "
             "inversion top class (concentration) | patch probe flip rate (median) | probe top class (concentration) | "
             "probe stamp (row, col, size, value) | probe s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["patch_probe"]
        lines.append(f"| {r['model']} | {r['attack']} | {r['synthetic_samples']} | {100 * r['trigger_rate_synthetic']:.1f}% | "
                     f"{100 * r['trigger_rate_real']:.1f}% | {100 * r['inversion_flip_rate']:.1f}% | "
                     f"{r['inversion_top_class']} ({r['inversion_concentration']:.2f}) | "
                     f"{100 * p['flip_rate']:.1f}% ({100 * p['median_screen_rate']:.1f}%) | "
                     f"{p['target_class_estimate']} ({p['concentration']:.2f}) | "
                     f"({p['row']}, {p['col']}, {p['size']}, {p['value']:g}) | {r['patch_probe_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="*", default=[], help="zoo models (trained if not cached)")
    parser.add_argument("--model-dir", nargs="*", default=[], type=Path,
                        help="directories with model.safetensors and attack.json")
    parser.add_argument("--samples", type=int, default=1024,
                        help="synthetic images to make (the cpu preset's 1024 reuse the bench rows' cache)")
    parser.add_argument("--dataset", default="cifar10", help="the test set the real images come from")
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=list(PatchProbeConfig().sizes),
                        help="sides of the patch probe's stamps, pixels")
    parser.add_argument("--probe-stride", type=int, default=PatchProbeConfig().stride,
                        help="step between the patch probe's stamps, pixels")
    parser.add_argument("--name", default="trigger_on_synthetic", help="results file name under benchmarks/results")
    args = parser.parse_args()
    if not args.attacks and not args.model_dir:
        parser.error("give --attacks and/or --model-dir")
    models = [(model_name(a), ensure_model(a)) for a in args.attacks] + [(d.name, d) for d in args.model_dir]
    probe = PatchProbeConfig(sizes=tuple(args.probe_sizes), stride=args.probe_stride)
    rows = []
    for name, directory in models:
        rows.append(measure(name, directory, args.samples, args.dataset, probe))
        print(rows[-1], flush=True)
    result = {"command": COMMAND, "argv": sys.argv[1:], "synth": dataclasses.asdict(resolve_config("cpu").synth),
              "probe": probe.to_dict(), "machine": machine(), "rows": rows}
    print(*write_results(args.name, result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

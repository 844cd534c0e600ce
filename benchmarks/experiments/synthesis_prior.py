"""How rough are the synthetic images, and what do the BatchNorm and total-variation weights change?

Run: python -m benchmarks.experiments.synthesis_prior [--attack wanet] [--batch 128]
     (writes benchmarks/results/synthesis_prior.{json,md})
For the zoo model of ``--attack`` (trained if not cached): one seeded batch of synthetic images per
setting of the synthesis's BN weight and TV weight (the `cpu` preset's other settings: 200 Adam
steps, lr 0.1), with each batch's last-step BN loss and CE, the images' total variation (mean squared
difference of neighbouring pixels, normalized space: the TV prior's own measure) and the model's
mean confidence in their labels; and the total variation of 1,000 seeded real test images.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from benchmarks.common import machine, provenance, write_results
from benchmarks.zoo import RECIPE, ensure_model, model_name
from cc_core import load_model
from cc_core.data import load_dataset, normalize
from cc_core.defense.config import resolve_config
from cc_core.synth import synthesize, total_variation

COMMAND = "python -m benchmarks.experiments.synthesis_prior"
REAL_SAMPLES = 1000
SETTINGS = ((1.0, 1e-4), (10.0, 1e-4), (30.0, 1e-4), (100.0, 1e-4), (30.0, 1.0), (30.0, 3.0), (30.0, 10.0))


def real_variation(model, dataset: str) -> float:
    """Total variation of REAL_SAMPLES seeded test images in ``model``'s normalized input space."""
    test = load_dataset(dataset, "val")
    pick = np.random.default_rng(0).choice(len(test), REAL_SAMPLES, replace=False)
    x, _ = test.subset(pick).tensors()
    return float(total_variation(normalize(x.float() / 255, model.cc_spec.mean, model.cc_spec.std)))


def measure(model, batch: int, bn_weight: float, tv_weight: float) -> dict:
    cfg = dataclasses.replace(resolve_config("cpu").synth, n_samples=batch, batch_size=batch,
                              bn_weight=bn_weight, tv_weight=tv_weight)
    start = time.perf_counter()
    x, y, log = synthesize(model, cfg, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        confidence = model(x).softmax(1).gather(1, y[:, None]).mean()
    return {"bn_weight": bn_weight, "tv_weight": tv_weight, "bn_loss": log["bn_loss"][-1], "ce": log["ce_loss"][-1],
            "total_variation": float(total_variation(x)), "label_confidence": float(confidence), "seconds": seconds}


def markdown(result: dict) -> str:
    lines = ["# Synthesis prior: BN and TV weights", "", provenance(result) + f". Zoo model `{result['model']}`, one batch of "
             f"{result['batch']} images per row; real test images: total variation **{result['real_total_variation']:.2f}**.",
             "", "| BN weight | TV weight | BN loss | CE | total variation | label confidence | s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bn_weight']:g} | {r['tv_weight']:g} | {r['bn_loss']:.4f} | {r['ce']:.4f} | {r['total_variation']:.2f} | "
              f"{r['label_confidence']:.4f} | {r['seconds']:.0f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="wanet")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(ensure_model(args.attack) / "model.safetensors").eval()
    rows = []
    for bn_weight, tv_weight in SETTINGS:
        rows.append(measure(model, args.batch, bn_weight, tv_weight))
        print(rows[-1], flush=True)
    flags = "" if (args.attack, args.batch) == ("wanet", 128) else f" --attack {args.attack} --batch {args.batch}"
    result = {"command": COMMAND + flags, "machine": machine(), "model": model_name(args.attack), "batch": args.batch,
              "real_total_variation": real_variation(model, RECIPE["dataset"]), "rows": rows}
    for path in write_results("synthesis_prior", result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

"""Does the mask probe find a local trigger on synthetic images, and does what it finds act on real ones?

Run: python -m benchmarks.experiments.mask_probe [--attacks badnet wanet] [--areas 0.01 0.03 0.05]
     [--seeds 0] [--recipe R] [--name mask_probe]
     (writes benchmarks/results/NAME.{json,md}; NAME_R for another recipe than the default)
For each tuning-zoo model (trained if not cached): the synthetic images the `cpu` preset makes
(shared with the bench rows and sweeps through the synthetic cache), and on them, for each area and
seed, the mask probe's best stamp (cc_core.probes.mask_probe): its flip rate, whether it fires, the
pull rates into the top two classes, and on the validation half of the test set (never the
reporting half) the rate at which the stamp sends real images of other classes into its class
(the found stamp's own attack success rate) beside the attack's true trigger's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.common import machine, percent, shared_synthetic, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.adversarial import predictions
from cc_core.attacks.base import load_attack
from cc_core.data import load_dataset, normalize
from cc_core.defense.config import resolve_config
from cc_core.probes import MASK_THRESHOLD, MaskProbeConfig, apply_found_trigger, mask_probe, mask_score

COMMAND = "python -m benchmarks.experiments.mask_probe"


@torch.no_grad()
def real_pull_rate(model, found: dict, images: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """The fraction of real images (normalized) of classes other than ``target`` that the stamp
    ``found`` sends to ``target``."""
    others = labels != target
    stamped = apply_found_trigger(images[others], found, model.cc_spec)
    return float((predictions(model, stamped) == target).float().mean())


def measure(attack_name: str, areas: list[float], seeds: list[int], recipe_name: str = DEFAULT_RECIPE,
            n_real: int = 1000, steps: int = MaskProbeConfig().steps, lr: float = MaskProbeConfig().lr) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    model, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    x = shared_synthetic(model_name(attack_name, recipe), model, resolve_config("cpu").synth)[0].cpu()
    pixels, labels = load_dataset(recipe["dataset"], "val").tensors()
    pixels, labels = pixels[:n_real].float() / 255, labels[:n_real]
    spec = model.cc_spec
    images = normalize(pixels, spec.mean, spec.std)
    target = attack.target if attack is not None and not attack.all_to_all else None
    true_asr = None
    if target is not None:
        triggered = normalize(attack.apply_trigger(pixels[labels != target]), spec.mean, spec.std)
        true_asr = float((predictions(model, triggered) == target).float().mean())
    rows = []
    for area in areas:
        for seed in seeds:
            cfg = MaskProbeConfig(area=area, seed=seed, steps=steps, lr=lr)
            start = time.perf_counter()
            found = mask_probe(model, x, cfg)
            seconds = time.perf_counter() - start
            rates = sorted(found["class_rates"], reverse=True)
            cls = found["target_class_estimate"]
            rows.append({"model": model_name(attack_name, recipe), "attack": attack.label if attack else "none",
                         "target": target, "area": area, "seed": seed, "steps": steps, "lr": lr, "flip_rate": found["flip_rate"],
                         "fires": bool(mask_score(found)), "pull_class": found["pull_class"],
                         "target_class_estimate": cls, "best_pull_rate": rates[0], "runner_up_pull_rate": rates[1],
                         "real_pull_rate": real_pull_rate(model, found, images, labels, cls),
                         "true_trigger_asr": true_asr, "area_used": found["area"], "n": found["n"], "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Mask probe on the tuning zoo's synthetic images\n",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}), commit {m['git_commit']}. "
             f"Arguments: `{' '.join(result['argv'])}`. Synthetic images: the `cpu` preset's. The probe "
             f"(`cc_core.probes.mask_probe`, {result['probe']} but for area and seed) optimizes one mask-and-pattern "
             "stamp per class (pulling the first n images into it) and one pushing them out of their own class "
             f"(steps and lr as each row says); it fires when the best stamp flips {100 * result['threshold']:.0f}% and the runner-up class pulls at most "
             "half the best's rate. Real pull: the found stamp on the validation half's images of other classes, "
             "the fraction sent to its class; true ASR: the attack's own trigger on the same images.\n",
             "| model | target | area | steps | lr | seed | best stamp flips | fires | top class | best / runner-up pull | "
             "real pull | true ASR | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['target'] if r['target'] is not None else '-'} | {r['area']:g} | "
                     f"{r.get('steps', 100)} | {r.get('lr', 0.3):g} | {r['seed']} | "
                     f"{percent(r['flip_rate'])} | {'yes' if r['fires'] else 'no'} | {r['target_class_estimate']} | "
                     f"{percent(r['best_pull_rate'])} / {percent(r['runner_up_pull_rate'])} | {percent(r['real_pull_rate'])} | "
                     f"{percent(r['true_trigger_asr'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnet", "wanet"], help="tuning-zoo models (trained if not cached)")
    parser.add_argument("--areas", type=float, nargs="+", default=[MaskProbeConfig().area], help="mask areas (fractions)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="probe seeds")
    parser.add_argument("--steps", type=int, default=MaskProbeConfig().steps, help="optimization steps")
    parser.add_argument("--lr", type=float, default=MaskProbeConfig().lr, help="Adam learning rate")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--name", default="mask_probe", help="results file name under benchmarks/results")
    args = parser.parse_args()
    rows = [row for attack in args.attacks for row in measure(attack, args.areas, args.seeds, args.recipe, steps=args.steps,
                                                                    lr=args.lr)]
    result = {"command": COMMAND, "argv": sys.argv[1:], "probe": dataclasses.asdict(MaskProbeConfig()),
              "threshold": MASK_THRESHOLD, "machine": machine(), "rows": rows}
    name = args.name + ("" if args.recipe == DEFAULT_RECIPE else f"_{args.recipe}")
    print(*write_results(name, result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

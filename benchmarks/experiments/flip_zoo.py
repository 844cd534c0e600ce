"""The scan's universal inversion (flip) on the zoo: backdoored vs clean models, per seed.

Run: python -m benchmarks.experiments.flip_zoo [--models cifar10-resnet18:badnet gtsrb-resnet18:badnet-a2a ...] [--seeds 0 1 2]
Each model (recipe:attack; ``none`` is the clean model of the recipe, trained into the cache if
missing) gets the scan's synthetic images (256 images, 100 iterations, seed 0), then ONE universal
inversion per seed (restarts 1, the scan's other defaults): the spread over seeds is what the
scan's restarts (best of ``InversionConfig.restarts``) are for. Writes
benchmarks/results/flip_zoo.{json,md}: flip rate, mapping consistency, the all-to-all score
(their product when the flips spread over classes, else 0; the scan fires at FLIP_THRESHOLD),
where the flips go, and the perturbation's size.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.bench import RECIPES
from benchmarks.common import machine, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core.attacks import load_attack
from cc_core.io import load_model
from cc_core.scan import FLIP_THRESHOLD, InversionConfig, all_to_all_score, flip_report, flip_score
from cc_core.synth import SynthConfig, synthesize

DEFAULT_MODELS = ["cifar10-resnet18:badnet", "cifar10-resnet18:wanet", "cifar10-resnet18:none",
                  "gtsrb-resnet18:badnet", "gtsrb-resnet18:badnet-a2a", "gtsrb-resnet18:inputaware",
                  "gtsrb-resnet18:none"]


def model_rows(spec: str, seeds: list[int]) -> list[dict]:
    recipe_name, attack = spec.split(":")
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack, recipe)
    model = load_model(directory / "model.safetensors").eval()
    attack_spec = load_attack(directory) if (directory / "attack.json").exists() else None
    truth = "clean" if attack_spec is None else "all-to-all" if attack_spec.all_to_all else f"target {attack_spec.target}"
    torch.manual_seed(0)
    x, _, _ = synthesize(model, SynthConfig(n_samples=256, iterations=100), progress=False)
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        report, _ = flip_report(model, x, dataclasses.replace(InversionConfig(), seed=seed, restarts=1))
        rows.append({"model": model_name(attack, recipe), "truth": truth, "seed": seed, "score": all_to_all_score(report),
                     "flip_score": flip_score(report),
                     **{k: v for k, v in report.items() if k not in ("histogram", "restart_scores")},
                     "seconds": time.perf_counter() - start})
        print(f"{rows[-1]['model']} seed {seed}: score {rows[-1]['score']:.2f}", flush=True)
    return rows


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["inversion"]
    lines = ["# The scan's universal inversion (flip) on the zoo\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}. "
             f"Synthetic images: the scan's (256, 100 iterations, seed 0). One inversion per seed: {cfg['steps']} Adam "
             f"steps, lr {cfg['lr']}, batch {cfg['batch_size']}, L1 penalty {cfg['l1']}. All-to-all score = flip rate x "
             "mapping consistency when the flip concentration is < 0.5, else 0; the scan calls a trigger all-to-all at "
             f"{FLIP_THRESHOLD} and keeps the best of {cfg['restarts']} seeds.\n",
             "| model | truth | seed | all-to-all score | flip rate | mapping consistency | flip concentration | top class "
             "| pixels changed > 0.1 | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['truth']} | {r['seed']} | {r['score']:.2f} | {r['flip_rate']:.2f} | "
                     f"{r['mapping_consistency']:.2f} | {r['concentration']:.2f} | {r['target_class_estimate']} | "
                     f"{100 * r['delta_pixels_changed']:.1f}% | {r['seconds']:.0f} |")
    lines += ["\n## Best of the seeds (what the scan's restarts keep)\n", "| model | truth | best all-to-all score | fires |",
              "|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == name]
        best = max(r["score"] for r in rows)
        lines.append(f"| {name} | {rows[0]['truth']} | {best:.2f} | {'yes' if best >= FLIP_THRESHOLD else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    rows = [row for spec in args.models for row in model_rows(spec, args.seeds)]
    result = {"command": f"python -m benchmarks.experiments.flip_zoo --models {' '.join(args.models)} "
                         f"--seeds {' '.join(map(str, args.seeds))}",
              "machine": machine(), "inversion": InversionConfig().to_dict(), "rows": rows}
    print(*write_results("flip_zoo", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

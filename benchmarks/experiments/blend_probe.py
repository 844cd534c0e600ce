"""Does the blend probe find a blend trigger on synthetic images, and stay quiet where there is none?

Run: python -m benchmarks.experiments.blend_probe [--attacks blended-a2a blended badnet wanet inputaware-a2a]
     [--alphas 0.1 0.2] [--seeds 0] [--recipe R] [--name blend_probe]
     (writes benchmarks/results/NAME.{json,md}; NAME_R for another recipe than the default)
For each zoo model (trained if not cached): the synthetic images the `cpu` preset makes (shared with
the bench rows and sweeps through the synthetic cache), and on them, for each probe opacity and
seed, the blend probe's best pattern (cc_core.probes.blend_probe): its flip rate, where the flips go,
the rate of the best pull into the attack's target, and, for a Blended model, the correlation of
the found pattern with the true one and the true trigger's own flip rate on the same images. The
zoo's Input-Aware all-to-all model never learned its backdoor (ASR 1.82%, zoo.md): it stands in
for a clean model of the recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from benchmarks.common import machine, percent, shared_synthetic, write_results
from benchmarks.bench import DEFAULT_RECIPE, RECIPES
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.attacks.base import load_attack
from cc_core.defense.config import resolve_config
from cc_core.probes import BLEND_THRESHOLD, BlendProbeConfig, blend_pattern, blend_probe, blend_score, trigger_flip_rate

COMMAND = "python -m benchmarks.experiments.blend_probe"


def true_blend(attack) -> dict | None:
    """The attack's own trigger as a blend probe report (kind, full-resolution pattern, alpha), or
    None when the attack is not a blend."""
    if getattr(attack, "name", None) != "blended":
        return None
    return {"kind": "blend", "pattern": attack.pattern.tolist(), "alpha": attack.params["alpha"]}


def pattern_correlation(found: dict, true: dict) -> float:
    """Pearson correlation of the found pattern (upsampled to the true one's size) with the true pattern."""
    truth = torch.tensor(true["pattern"])
    guess = blend_pattern(torch.tensor(found["pattern"])[None], *truth.shape[-2:])[0]
    a, b = guess.flatten() - guess.mean(), truth.flatten() - truth.mean()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))


def measure(attack_name: str, alphas: list[float], seeds: list[int], recipe_name: str = DEFAULT_RECIPE) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    model, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    x = shared_synthetic(model_name(attack_name, recipe), model, resolve_config("cpu").synth)[0].cpu()
    target = attack.target if attack is not None and not attack.all_to_all else None
    true = true_blend(attack)
    rows = []
    for alpha in alphas:
        for seed in seeds:
            cfg = BlendProbeConfig(alpha=alpha, seed=seed)
            start = time.perf_counter()
            found = blend_probe(model, x, cfg)
            seconds = time.perf_counter() - start
            true_rate = None
            if true is not None:
                true_rate = trigger_flip_rate(model, x, true | {"alpha": alpha}, cfg.n)
            rows.append({"model": model_name(attack_name, recipe), "attack": attack.label, "alpha": alpha, "seed": seed,
                         "flip_rate": found["flip_rate"], "fires": bool(blend_score(found)),
                         "pull_class": found["pull_class"], "target_class_estimate": found["target_class_estimate"],
                         "concentration": found["concentration"], "mapping_consistency": found["mapping_consistency"],
                         "push_flip_rate": found["push_flip_rate"], "class_rates": found["class_rates"],
                         "target_pull_rate": found["class_rates"][target] if target is not None else None,
                         "true_trigger_flip_rate": true_rate,
                         "pattern_correlation": pattern_correlation(found, true) if true is not None else None,
                         "n": found["n"], "seconds": seconds})
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Blend probe on the zoo's synthetic images\n",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}), commit {m['git_commit']}. "
             f"Arguments: `{' '.join(result['argv'])}`. Synthetic images: the `cpu` preset's 1024. The probe "
             f"(`cc_core.probes.blend_probe`, {result['probe']} but for alpha and seed) optimizes one smooth pattern per "
             "class (pulling the first n images into it) and one pushing them out of their own class; the best "
             f"pattern's flip rate is the signal, which fires from {100 * result['threshold']:.0f}%. The true trigger's "
             "rate: the Blended model's own pattern, blended at the probe's opacity, on the same images. Correlation: "
             "of the found pattern with the true one.\n",
             "| model | attack | alpha | seed | best pattern flips | fires | pull class (push: -) | top class (concentration) | "
             "mapping consistency | target pull rate | true trigger flips | correlation with the true pattern | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        corr = "-" if r["pattern_correlation"] is None else f"{r['pattern_correlation']:.2f}"
        pull = "-" if r["pull_class"] is None else r["pull_class"]
        lines.append(f"| {r['model']} | {r['attack']} | {r['alpha']:g} | {r['seed']} | {percent(r['flip_rate'])} | "
                     f"{'yes' if r['fires'] else 'no'} | {pull} | {r['target_class_estimate']} ({r['concentration']:.2f}) | "
                     f"{r['mapping_consistency']:.2f} | {percent(r['target_pull_rate'])} | {percent(r['true_trigger_flip_rate'])} | "
                     f"{corr} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["blended-a2a", "blended", "badnet", "wanet", "inputaware-a2a"],
                        help="zoo models (trained if not cached)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[BlendProbeConfig().alpha], help="probe opacities")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="probe seeds")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
    parser.add_argument("--name", default="blend_probe", help="results file name under benchmarks/results")
    args = parser.parse_args()
    rows = [row for attack in args.attacks for row in measure(attack, args.alphas, args.seeds, args.recipe)]
    result = {"command": COMMAND, "argv": sys.argv[1:], "probe": dataclasses.asdict(BlendProbeConfig()),
              "threshold": BLEND_THRESHOLD, "machine": machine(), "rows": rows}
    name = args.name + ("" if args.recipe == DEFAULT_RECIPE else f"_{args.recipe}")
    print(*write_results(name, result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

"""What moves a dense-trigger backdoor: its own pattern, the scan's inversions, or any noise?

Run: python -m benchmarks.experiments.noise_response [--attack noise] [--recipe cifar10-resnet18-6ep]
     [--name noise_response]   (writes benchmarks/results/NAME.{json,md})

For a tuning-zoo model with an additive trigger (the pattern is in its attack spec): the share of
the preset's synthetic images (seed 0, the cached ones) and of 2,000 real validation images from
classes other than the target that each perturbation sends to the target, and the cosine of each
perturbation with the planted pattern: the trigger itself, the scan's universal inversion (L1-
penalized, as the defense runs it), a targeted universal perturbation in the L-inf ball of the
trigger's size (150 Adam steps on the synthetic images), and random noise (one sign pattern for
all images, a new one per image, Gaussian).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.bench import RECIPES
from benchmarks.common import machine, percent, provenance, shared_synthetic, write_results
from benchmarks.zoo import ensure_model, model_name
from cc_core import load_model
from cc_core.adversarial import predictions
from cc_core.attacks.additive import coin_flip_signs
from cc_core.attacks.base import load_attack
from cc_core.data import load_dataset
from cc_core.defense.config import resolve_config
from cc_core.scan import flip_report

COMMAND = "python -m benchmarks.experiments.noise_response"
REAL_IMAGES = 2000


def targeted_linf_perturbation(model, pix: torch.Tensor, target: int, eps: float, mean, std,
                               steps: int = 150, batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """(1, C, H, W) pixel-unit perturbation, |delta| <= eps, that sends the images ``pix`` to ``target``."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(1, *pix.shape[1:], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=eps / 10)
    for _ in range(steps):
        idx = torch.randint(0, len(pix), (batch_size,), generator=g)
        loss = F.cross_entropy(model(((pix[idx] + delta).clamp(0, 1) - mean) / std), torch.full((batch_size,), target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
    return delta.detach()


def to_target(model, pix: torch.Tensor, delta: torch.Tensor, target: int, mean, std) -> float:
    with torch.no_grad():
        return float((model(((pix + delta).clamp(0, 1) - mean) / std).argmax(1) == target).float().mean())


def cosine(delta: torch.Tensor, pattern: torch.Tensor) -> float:
    return float(F.cosine_similarity(delta.flatten(), pattern.flatten(), dim=0))


def measure(attack_name: str, recipe_name: str) -> list[dict]:
    recipe = RECIPES[recipe_name]
    directory = ensure_model(attack_name, recipe)
    model, attack = load_model(directory / "model.safetensors").eval(), load_attack(directory)
    pattern, target, spec = attack.pattern, attack.target, model.cc_spec
    mean, std = (torch.tensor(v)[None, :, None, None] for v in (spec.mean, spec.std))
    cfg = resolve_config("cpu")
    x, _ = (t.cpu() for t in shared_synthetic(model_name(attack_name, recipe), model, cfg.synth)[:2])
    syn = (x * std + mean).clamp(0, 1)[predictions(model, x) != target]
    data = load_dataset(recipe["dataset"], "val")
    real = torch.as_tensor(data.x[data.y != target][:REAL_IMAGES]).permute(0, 3, 1, 2).float() / 255
    eps = float(pattern.abs().max())
    _, inverted = flip_report(model, x, cfg.inversion)
    targeted = targeted_linf_perturbation(model, syn, target, eps, mean, std)
    g = torch.Generator().manual_seed(123)
    sign = coin_flip_signs((1, *syn.shape[1:]), eps, g)
    per_image = coin_flip_signs((len(real), *syn.shape[1:]), eps, g)
    gaussian = eps * torch.randn(len(real), *syn.shape[1:], generator=g)
    rows = [("the planted trigger", pattern[None], True),
            ("the scan's universal inversion", inverted.cpu(), True),
            (f"a targeted universal perturbation, L-inf {eps * 255:.0f}/255", targeted, True),
            (f"random sign noise +-{eps * 255:.0f}/255, one pattern", sign, True),
            (f"random sign noise +-{eps * 255:.0f}/255, one per image", per_image, False),
            (f"Gaussian noise, sd {eps * 255:.0f}/255", gaussian, False),
            (f"random sign noise +-{eps * 255 / 2:.0f}/255, one pattern", sign / 2, True)]
    out = [{"perturbation": "none", "synthetic": to_target(model, syn, torch.zeros(1), target, mean, std),
            "real": to_target(model, real, torch.zeros(1), target, mean, std), "cosine": None}]
    for label, delta, universal in rows:
        out.append({"perturbation": label, "cosine": cosine(delta, pattern) if universal else None,
                    "synthetic": to_target(model, syn, delta, target, mean, std) if universal else None,
                    "real": to_target(model, real, delta, target, mean, std)})
        print(out[-1], flush=True)
    return [r | {"model": model_name(attack_name, recipe), "target": target} for r in out]


def markdown(result: dict) -> str:
    lines = ["# What sends a dense-trigger model's inputs to its target\n",
             f"{provenance(result)}. Share of the preset's "
             f"synthetic images and of {REAL_IMAGES} real validation images (classes other than the target) sent to "
             "the target; cosine with the planted pattern.\n",
             "| model | perturbation | synthetic | real | cosine |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['perturbation']} | {percent(r['synthetic'])} | {percent(r['real'])} | "
              f"{'' if r['cosine'] is None else format(r['cosine'], '.2f')} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="noise")
    parser.add_argument("--recipe", default="cifar10-resnet18-6ep", choices=sorted(RECIPES))
    parser.add_argument("--name", default="noise_response")
    args = parser.parse_args()
    result = {"command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(), "rows": measure(args.attack, args.recipe)}
    for path in write_results(args.name, result, markdown(result)):
        print(path)


if __name__ == "__main__":
    main()

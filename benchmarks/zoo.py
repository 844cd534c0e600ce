"""The benchmark zoo: backdoored CIFAR-10 models that train in <= 20 minutes on a 2-core CPU.

Run: python -m benchmarks.zoo [--attacks badnet wanet ...]
     python -m benchmarks.zoo --trials      (the WaNet settings tried; zoo_trials.{json,md})
Each model is trained by `cleancompact train-backdoor` into the cache directory
($CC_CACHE_DIR, else ~/.cache/cleancompact)/zoo/<name>; a finished model is reused, an
interrupted one resumes from its checkpoint. Results go to benchmarks/results/zoo.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, machine, write_results
from cc_core.errors import CleanCompactError, InputError

RECIPE = {"arch": "resnet18", "width": 0.25, "dataset": "cifar10", "epochs": 20,
          "batch_size": 256, "lr": 0.2, "schedule": "onecycle", "seed": 0}
ATTACKS = ["badnet", "blended", "wanet", "inputaware"]  # "none" trains a clean model of the recipe
# Where one recipe does not reach the bar in 20 minutes, the attack's documented knobs are set here
# (and show in the recorded command). WaNet at BackdoorBench's s=0.5 with cross ratio 2 reached
# only ASR 30% in 20 epochs: its warp moves pixels by s/2 px on average (0.25 px), which a
# 20-epoch run does not pick up. s=2.0 with cross ratio 1 reached 84.26 / 90.87 in 20 epochs and
# 84.55 / 94.11 in 24; s=3.0 (1.5 px on average) with cross ratio 0.5 passes (zoo_trials.md).
# The noise model targets a class other than 0: the other tuning models all target 0.
ATTACK_OVERRIDES = {"wanet": {"epochs": 24, "cross_ratio": 0.5, "attack_params": {"s": 3.0}}, "noise": {"target": 2}}
# Other WaNet settings measured on the way (`--trials`; cached under <cache>/zoo-trials).
WANET_TRIALS = {
    "s2-cross0.5": {"epochs": 24, "cross_ratio": 0.5, "attack_params": {"s": 2.0}},
    "s3-cross0.5": {"epochs": 24, "cross_ratio": 0.5, "attack_params": {"s": 3.0}},
}


# Trained models kept in fp16 and committed (1.4 MB each), so that every machine tunes on the same
# weights without training them again (`--keep`).
KEPT = Path(__file__).resolve().parent / "models" / "tuning"
MODEL_FILES = ("model.safetensors", "attack.json", "attack.safetensors", "metrics.json")


def cache_dir() -> Path:
    return Path(os.environ.get("CC_CACHE_DIR", Path.home() / ".cache" / "cleancompact"))


def model_name(attack: str, recipe: dict = RECIPE) -> str:
    """The zoo name; a training seed other than the zoo's (0) shows as a ``-seed<N>`` suffix and
    another number of epochs as ``-<N>ep``, so models of other seeds and budgets sit beside the
    zoo's, never in its place."""
    seed = "" if recipe["seed"] == RECIPE["seed"] else f"-seed{recipe['seed']}"
    epochs = "" if recipe["epochs"] == RECIPE["epochs"] else f"-{recipe['epochs']}ep"
    return f"{recipe['dataset']}-{recipe['arch']}-w{recipe['width']:g}-{attack}{epochs}{seed}"


def model_dir(attack: str, recipe: dict = RECIPE) -> Path:
    return cache_dir() / "zoo" / model_name(attack, recipe)


def command(attack: str, recipe: dict = RECIPE, out: Path | str | None = None,
            overrides: dict | None = None) -> list[str]:
    """The `cleancompact train-backdoor` command; ``overrides`` replaces the attack's zoo overrides."""
    out = out or model_dir(attack, recipe)
    if overrides is not None:
        extra = overrides
    else:
        same_data = recipe["dataset"] == RECIPE["dataset"]  # the overrides were set on CIFAR-10
        extra = ATTACK_OVERRIDES.get(attack.removesuffix("-a2a"), {}) if same_data else {}
    cmd = ["cleancompact", "train-backdoor", "--arch", recipe["arch"], "--width", str(recipe["width"]),
           "--attack", attack, "--dataset", recipe["dataset"],
           "--epochs", str(extra.get("epochs", recipe["epochs"])),
           "--batch-size", str(recipe["batch_size"]), "--lr", str(recipe["lr"]),
           "--schedule", recipe["schedule"], "--seed", str(recipe["seed"]), "--threads", "2"]
    if "target" in extra:
        cmd += ["--target", str(extra["target"])]
    if "cross_ratio" in extra:
        cmd += ["--cross-ratio", str(extra["cross_ratio"])]
    for key, value in extra.get("attack_params", {}).items():
        cmd += ["--attack-param", f"{key}={value}"]
    return cmd + ["--out", str(out)]


def store_half(path: Path) -> None:
    """Rewrite a model file with its floating-point tensors in fp16 (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)


def copy_model(source: Path, dest: Path) -> None:
    """The model files of ``source`` copied to ``dest``; metrics.json last: it marks a whole copy."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)


def keep(out: Path, kept: Path) -> None:
    """The trained model in ``out`` stored in fp16 and copied to ``kept`` (to be committed), its
    metrics naming the cache directory ``<cache>``, not this machine's path."""
    store_half(out / "model.safetensors")  # a no-op on weights already in fp16
    copy_model(out, kept)
    metrics = kept / "metrics.json"
    metrics.write_text(metrics.read_text().replace(str(cache_dir()), "<cache>"))


def ensure_model(attack: str, recipe: dict = RECIPE, quiet: bool = False,
                 overrides: dict | None = None, out: Path | None = None, kept: Path | None = None) -> Path:
    """Train the zoo model for ``attack`` unless a finished one is cached or committed under
    ``kept`` (copied into the cache; default for a tuning-zoo model: KEPT / its name); return its
    cache directory."""
    if out is None:
        out = model_dir(attack, recipe)
        kept = kept or KEPT / out.name
    if kept is not None and not (out / "metrics.json").exists() and (kept / "metrics.json").exists():
        copy_model(kept, out)
    if not (out / "metrics.json").exists():
        cmd = command(attack, recipe, out, overrides)
        exe = Path(sys.executable).with_name("cleancompact")
        code = subprocess.run([str(exe), *cmd[1:], *(["--quiet"] if quiet else [])]).returncode
        if code:
            error = InputError if code == InputError.exit_code else CleanCompactError
            raise error(f"training the zoo model {out.name} failed (exit {code}); the trainer's "
                        f"message is above. Command: {' '.join(cmd)}")
    return out


def _row(attack: str, name: str, out: Path, cmd: list[str]) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    return {"name": name, "attack": attack, "acc": m["acc"], "asr": m["asr"], "ra": m["ra"],
            "train_seconds": m["train_seconds"], "command": " ".join(cmd)}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def run_trials() -> None:
    """Train each WaNet trial setting (cached) and write benchmarks/results/zoo_trials.{json,md}."""
    rows = []
    for label, overrides in WANET_TRIALS.items():
        name = f"{model_name('wanet')}-{label}"
        out = ensure_model("wanet", overrides=overrides, out=cache_dir() / "zoo-trials" / name)
        rows.append(_row("wanet", name, out, command("wanet", out=f"<cache>/zoo-trials/{name}", overrides=overrides))
                    | {"overrides": overrides})
    result = {"recipe": RECIPE, "machine": machine(), "trials": rows}
    md = ["# WaNet settings tried for the zoo (CIFAR-10, JPEG-degraded copy)\n",
          f"`python -m benchmarks.zoo --trials` on {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"torch {result['machine']['torch']}. Recipe {json.dumps(RECIPE)} with each row's overrides; the "
          f"zoo's own WaNet setting is {json.dumps(ATTACK_OVERRIDES['wanet'])} (zoo.md). Bar: ACC >= 85, "
          "ASR >= 95 in <= 20 min.\n",
          "| trial | overrides | ACC | ASR | RA | train min | command |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['name']} | `{json.dumps(r['overrides'])}` | {_pct(r['acc'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | "
           f"{r['train_seconds'] / 60:.1f} | `{r['command']}` |" for r in rows]
    print(*write_results("zoo_trials", result, "\n".join(md) + "\n"), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--trials", action="store_true", help="train the WaNet trial settings instead")
    parser.add_argument("--keep", action="store_true",
                        help=f"store the models in fp16 and copy them to {KEPT.relative_to(KEPT.parents[2])} (to commit)")
    args = parser.parse_args()
    if args.trials:
        run_trials()
        return
    rows = []
    for attack in args.attacks:
        out = ensure_model(attack)
        if args.keep:
            keep(out, KEPT / model_name(attack))
        rows.append(_row(attack, model_name(attack), out, command(attack, out="<cache>/zoo/" + model_name(attack))))
    previous = {}
    path = RESULTS / "zoo.json"
    if path.exists():
        previous = {r["attack"]: r for r in json.loads(path.read_text())["models"]}
    previous.update({r["attack"]: r for r in rows})
    models = [previous[a] for a in sorted(previous, key=lambda a: (a.endswith("a2a"), a))]
    result = {"recipe": RECIPE, "attack_overrides": ATTACK_OVERRIDES, "machine": machine(), "models": models}
    md = ["# Benchmark zoo (CIFAR-10, JPEG-degraded copy)\n",
          f"Recipe: {json.dumps(RECIPE)}; per-attack overrides: {json.dumps(ATTACK_OVERRIDES)}. Machine: {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores, torch {result['machine']['torch']}.\n",
          "| model | ACC | ASR | RA | train min | command |", "|---|---|---|---|---|---|"]
    for r in models:
        md.append(f"| {r['name']} | {_pct(r['acc'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | "
                  f"{r['train_seconds'] / 60:.1f} | `{r['command']}` |")
    print(*write_results("zoo", result, "\n".join(md) + "\n"), sep="\n")


if __name__ == "__main__":
    main()

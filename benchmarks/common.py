"""Shared helpers for benchmark scripts: machine description and result files."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

import torch

from cc_core.device import cpu_bf16_is_native
from cc_core.fileio import atomic_path, git_commit
from cc_core.synth import SynthConfig, synthesize

RESULTS = Path(__file__).resolve().parent / "results"
K = TypeVar("K", bound=Hashable)


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name with its family and model numbers, which tell apart machines whose
    name is only the vendor's line ("AMD EPYC" covers generations a defense runs 2x apart on)."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or ""
    name = fields.get("model name", platform.processor() or "")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_bf16_native": cpu_bf16_is_native(),
            "python": platform.python_version(),
            "git_commit": git_commit()}


def interleaved_medians(variants: dict[K, Callable[[], object]], repeats: int) -> dict[K, float]:
    """Median wall seconds of each variant's call: one warm-up call each, then ``repeats`` rounds
    calling every variant in turn (machine drift hits all of them alike)."""
    for call in variants.values():
        call()
    seconds: dict[K, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in seconds.items()}


def provenance(result: dict) -> str:
    """'`COMMAND` on CPU (cores, torch, threads, native bf16), commit C' for a result with
    ``command`` and ``machine`` (see :func:`machine`)."""
    m = result["machine"]
    return (f"`{result['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
            f"native bf16: {'yes' if m['cpu_bf16_native'] else 'no'}), commit {m['git_commit']}")


def percent(value: float | None) -> str:
    """A rate in [0, 1] as '12.3%' ('-' for None), as the experiment tables print it."""
    return "-" if value is None else f"{100 * value:.1f}%"


def worst_class(before: list[float], after: list[float]) -> int:
    """The class that lost most of its own accuracy from ``before`` to ``after`` (per-class accuracies)."""
    return max(range(len(before)), key=lambda c: before[c] - after[c])


def worst_class_text(before: list[float], after: list[float]) -> str:
    """'c: before -> after' (in %) for :func:`worst_class`, as the experiment tables print it."""
    c = worst_class(before, after)
    return f"{c}: {100 * before[c]:.1f} -> {100 * after[c]:.1f}"


def stage_row(stage: str, model: torch.nn.Module, data, attack, extra: dict | None = None) -> dict:
    """One experiment row: ``model``'s ACC, ASR and per-class accuracy on ``data`` under ``stage``'s name."""
    from cc_core.metrics import evaluate

    result = evaluate(model, data, attack)
    return {"stage": stage, "acc": result["acc"], "asr": result["asr"], "per_class_acc": result["per_class_acc"]} | (extra or {})


def stage_lines(rows: list[dict]) -> list[str]:
    """'| model | stage | ACC | ASR | worst class |' lines of stage_row rows, each model's first row
    the baseline its worst class is measured against."""
    by_model: dict[str, list[float]] = {}
    lines = []
    for r in rows:
        base = by_model.setdefault(r["model"], r["per_class_acc"])
        lines.append(f"| {r['model']} | {r['stage']} | {percent(r['acc'])} | {percent(r['asr'])} | "
                     f"{worst_class_text(base, r['per_class_acc'])} |")
    return lines


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def synthetic_cache_dir() -> Path:
    """$CC_HOME/synthetic (CC_HOME as the pipeline resolves it)."""
    from tasks.tracking import cc_home

    return cc_home() / "synthetic"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names and bytes."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shared_synthetic(name: str, model: torch.nn.Module, cfg: SynthConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Synthetic images of the zoo model ``name`` made from the model itself (seeded by ``cfg``),
    cached under :func:`synthetic_cache_dir` so settings, ratios and reruns share them.
    Returns (x, y, seconds it took to make them). The cache key includes the weights, so a
    retrained model of the same name never reuses another model's images."""
    key = hashlib.sha256(json.dumps([name, cfg.to_dict(), weights_digest(model)], sort_keys=True).encode()).hexdigest()[:16]
    path = synthetic_cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        return tuple(torch.load(path))
    start = time.perf_counter()
    x, y, _ = synthesize(model, cfg, progress=False)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save((x, y, seconds), tmp)
    return x, y, seconds

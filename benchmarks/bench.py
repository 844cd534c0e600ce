"""The paper's tables on this machine: rows of (recipe, attack, defense, ratio), each cached.

Run: cleancompact bench run --table table2 [--attacks ...] [--defenses ...] [--ratios ...]
     cleancompact bench render            (writes benchmarks/RESULTS.md)
     cleancompact bench list --table table2

A row trains its zoo model if it is not cached (benchmarks/zoo.py), runs one defense on it and
writes benchmarks/results/bench/<row id>.json: ACC/ASR/RA before and after on the real test set,
parameters, onnxruntime latency of the original and the defended model side by side in this
process, the defense's wall time per step, and the command that re-runs exactly that row. A row
whose JSON exists is skipped (``--force`` re-runs it). C&C rows of one model share its synthetic
images (made once from the original model and cached), so the ``synthesize`` time is reported
from the run that made them.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, shared_synthetic, worst_class
from benchmarks.zoo import RECIPE, ensure_model, model_name
from cc_core.attacks import load_attack
from cc_core.data import load_dataset
from cc_core.io import load_model
from cc_core.metrics import evaluate
from cc_core.models import count_params
from cc_core.probes import trigger_text
from cc_core.defense.config import resolve_config
from cc_core.defense.package import export_checked_onnx
from cc_core.defense.run import defend, defend_baseline

ROWS_DIR = RESULTS / "bench"
RESULTS_MD = RESULTS.parent / "RESULTS.md"
DEFAULT_RECIPE = "cifar10-resnet18"  # the zoo's RECIPE, the recipe a benchmark script measures unless told
RECIPES = {
    DEFAULT_RECIPE: RECIPE,
    "gtsrb-resnet18": RECIPE | {"dataset": "gtsrb"},
    "cifar10-vgg19_bn": RECIPE | {"arch": "vgg19_bn"},
    "cifar10-mobilenet_v2": RECIPE | {"arch": "mobilenet_v2", "width": 0.5},
    "cifar10-resnet18-w0.5": RECIPE | {"width": 0.5},
    # The demo's training budget: a patch backdoor in a short-trained model (train it from a seed
    # other than the demo model's 0, which stays unseen).
    "cifar10-resnet18-6ep": RECIPE | {"epochs": 6},
}
ALL_ATTACKS = ["badnet", "blended", "inputaware", "wanet"]
DEFENSES = ("none", "anp", "clp", "cc")
ANP_CLEAN_FRACTION = 0.01  # of the train split, seeded: the paper's 1%
LATENCY_BATCH = 128
# Rows report on the test set's reporting half (docs/PROTOCOL.md); rows without "eval_split" ran
# before the protocol, on the whole test set.
EVAL_SPLIT = "report"


@dataclass(frozen=True)
class Row:
    recipe: str
    attack: str
    defense: str
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        if self.defense not in DEFENSES:
            raise ValueError(f"unknown defense {self.defense!r}; choose from {', '.join(DEFENSES)}")
        if (self.defense == "none") != (self.ratio is None) or (self.ratio is not None and not self.ratio > 1):
            raise ValueError("a defense needs a ratio > 1; 'none' takes no ratio")

    @property
    def model(self) -> str:
        return model_name(self.attack, RECIPES[self.recipe])

    @property
    def id(self) -> str:
        return f"{self.model}-{self.defense}" + ("" if self.ratio is None else f"-{self.ratio:g}x")

    @property
    def command(self) -> str:
        ratio = "" if self.ratio is None else f" --ratios {self.ratio:g}"
        return f"cleancompact bench run --recipe {self.recipe} --attacks {self.attack} --defenses {self.defense}{ratio}"


def _grid(recipe: str, attacks: Iterable[str], defenses: Iterable[tuple[str, float | None]]) -> list[Row]:
    return [Row(recipe, a, d, r) for a in attacks for d, r in defenses]


TABLES: dict[str, list[Row]] = {
    "table2": _grid("cifar10-resnet18", ALL_ATTACKS + [f"{a}-a2a" for a in ALL_ATTACKS],
                    [("none", None), ("anp", 2.0), ("clp", 2.0), ("cc", 2.0), ("cc", 3.0), ("cc", 4.0)]),
    "table4": _grid("gtsrb-resnet18", ["badnet", "badnet-a2a", "inputaware", "inputaware-a2a"],
                    [("none", None), ("clp", 2.0), ("cc", 2.0)]),
    "table5": (_grid("cifar10-vgg19_bn", ["badnet"], [("none", None), ("clp", 2.0), ("cc", 2.0)])
               + _grid("cifar10-mobilenet_v2", ["badnet"], [("none", None), ("clp", 2.0), ("cc", 2.0)])),
    # Does the gap to the paper shrink with width? The zoo's hardest model for C&C at twice the width.
    "width": _grid("cifar10-resnet18-w0.5", ["wanet"], [("none", None), ("cc", 2.0), ("cc", 4.0)]),
}


def select(table: str | None = None, recipe: str | None = None, attacks: list[str] | None = None,
           defenses: list[str] | None = None, ratios: list[float] | None = None) -> list[Row]:
    """The rows of ``table`` (all tables if None) that match every given filter."""
    rows = [r for name, rs in TABLES.items() if table in (None, name) for r in rs]
    if recipe is not None:
        rows = [r for r in rows if r.recipe == recipe]
    if attacks:
        rows = [r for r in rows if r.attack in attacks]
    if defenses:
        rows = [r for r in rows if r.defense in defenses]
    if ratios:
        rows = [r for r in rows if r.ratio is None or r.ratio in ratios]
    return list(dict.fromkeys(rows))


def row_path(row: Row) -> Path:
    return ROWS_DIR / f"{row.id}.json"


def _defended(row: Row, model, test, attack, log) -> tuple[object, dict]:
    """(defended model, result fields) for a C&C or baseline row."""
    if row.defense == "cc":
        cfg = resolve_config("cpu", ratio=row.ratio)
        x, y, synth_seconds = shared_synthetic(row.model, model, cfg.synth)
        scan_synthetic, made = None, {"synthesize": synth_seconds}
        if cfg.scan_synth_config is not None:
            *scan_synthetic, made["synthesize_scan"] = shared_synthetic(row.model, model, cfg.scan_synth_config)
        result = defend(model, config=cfg, eval_data=test, attack=attack, progress=False, log=log, synthetic=(x, y),
                        scan_synthetic=scan_synthetic)
        timings = made | {k: v for k, v in result.report["timings_s"].items() if k not in (*made, "total")}
    else:
        clean = None
        if row.defense == "anp":
            clean = load_dataset(RECIPES[row.recipe]["dataset"], "train").sample(ANP_CLEAN_FRACTION, seed=0)
        result = defend_baseline(model, row.defense, row.ratio, test, attack, clean, progress=False, log=log)
        timings = {k: v for k, v in result.report["timings_s"].items() if k != "total"}
    r = result.report
    return result.model, {"metrics": r["metrics"], "params_after": r["model"]["params_after"], "timings_s": timings,
                          "defense_s": sum(v for k, v in timings.items() if k != "evaluate"),
                          "details": r.get("channel_clean") or r.get("baseline"), "config": r["config"],
                          "distillation": r.get("distillation"), "finetune_guard": r.get("finetune_guard"),
                          "suspicion": suspicion_record(r) if row.defense == "cc" else None}


def suspicion_record(report: dict) -> dict:
    """What a C&C row keeps of its report's scan: the suspected target, the images left out, the
    inversions' statistics, the all-to-all verdict and the probes' firing trigger."""
    return {k: report["scan"][k] for k in ("suspected_target", "inversion_concentration", "synthetic_excluded",
                                           "flip_rate", "all_to_all_suspected", "trigger")}


def run_row(row: Row, force: bool = False, log=print) -> dict:
    """Run ``row`` (training its zoo model if needed) unless its JSON exists; return the JSON."""
    path = row_path(row)
    if path.exists() and not force:
        return json.loads(path.read_text())
    torch.manual_seed(0)
    directory = ensure_model(row.attack, RECIPES[row.recipe])
    model = load_model(directory / "model.safetensors").eval()
    attack = load_attack(directory)
    test = load_dataset(RECIPES[row.recipe]["dataset"], EVAL_SPLIT)
    start = time.perf_counter()
    if row.defense == "none":
        before = evaluate(model, test, attack)
        defended = None
        fields = {"metrics": {f"{k}_{w}": before[k] for k in ("acc", "asr", "ra") for w in ("before", "after")},
                  "params_after": count_params(model), "timings_s": {}, "defense_s": 0.0, "details": None}
    else:
        defended, fields = _defended(row, model, test, attack, log)
    wall = time.perf_counter() - start
    onnx = None
    if defended is not None:
        with tempfile.TemporaryDirectory() as tmp:
            onnx = export_checked_onnx(defended, model, tmp, threads=2, latency_batch=LATENCY_BATCH)
    payload = {"row": dataclasses.asdict(row), "id": row.id, "model": row.model, "command": row.command,
               "params_before": count_params(model), **fields, "wall_s": wall, "onnx": onnx, "eval_split": EVAL_SPLIT,
               "zoo_train_seconds": json.loads((directory / "metrics.json").read_text())["train_seconds"],
               "machine": machine()}
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(payload, indent=2) + "\n")
    tmp_path.replace(path)
    return payload


def run(rows: list[Row], force: bool = False, log=print) -> list[dict]:
    results = []
    for i, row in enumerate(rows, 1):
        cached = row_path(row).exists() and not force
        log(f"[bench] {i}/{len(rows)} {row.id}" + (" (cached)" if cached else ""))
        results.append(run_row(row, force, log=lambda *a: None))
        m = results[-1]["metrics"]
        log(f"[bench]   ACC {100 * m['acc_after']:.2f}  ASR {100 * m['asr_after']:.2f}  "
            f"params {results[-1]['params_after']:,}")
    return results


def load_rows() -> dict[str, dict]:
    """Every finished row's JSON by row id."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))} if ROWS_DIR.exists() else {}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _cell(done: dict, row: Row, with_drop: bool = False) -> str:
    """ACC / ASR after the row's defense, and its ACC drop in points in brackets if ``with_drop``."""
    r = done.get(row.id)
    if r is None:
        return "not run"
    m = r["metrics"]
    drop = f" ({100 * (m['acc_before'] - m['acc_after']):.2f})" if with_drop and row.defense != "none" else ""
    return f"{_pct(m['acc_after'])} / {_pct(m['asr_after'])}{drop}"


def _column_name(defense: str, ratio: float | None) -> str:
    return "No defense" if defense == "none" else f"{defense.upper() if defense != 'cc' else 'C&C'} {ratio:g}x"


def _other_training(done: dict, row: Row) -> float | None:
    """The original ACC ``row`` was measured on where it differs from its model's `none` row: the zoo
    retrains a model that is not cached, and a retraining on another CPU gives other weights."""
    reference, r = done.get(Row(row.recipe, row.attack, "none").id), done.get(row.id)
    if row.defense == "none" or reference is None or r is None:
        return None
    acc = r["metrics"]["acc_before"]
    return acc if abs(acc - reference["metrics"]["acc_before"]) > 1e-6 else None


def _acc_asr_table(done: dict, rows: list[Row], columns: list[tuple[str, float | None]]) -> list[str]:
    """One line per model, one cell per column; a cell measured on another training of the model than
    its `No defense` cell is marked and footnoted with that training's ACC."""
    head = [_column_name(d, r) for d, r in columns]
    lines, notes = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"], []
    for model in dict.fromkeys((r.recipe, r.attack) for r in rows):
        cells = []
        for d, r in columns:
            row = Row(model[0], model[1], d, r)
            other = _other_training(done, row)
            cells.append(_cell(done, row) + ("" if other is None else " †"))
            if other is not None:
                notes.append(f"{row.id} (its original ACC {_pct(other)})")
        lines.append(f"| {Row(model[0], model[1], 'none').model} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "† measured on another training of the zoo model than the `No defense` cell's: "
                  + "; ".join(notes) + "."]
    return lines


def _width_table(done: dict) -> list[str]:
    """The `width` table's rows beside the same attack and defenses on the zoo's own recipe: parameters,
    ACC / ASR (ACC drop) and each C&C row's defense seconds."""
    wide = TABLES["width"]
    columns = [(r.defense, r.ratio) for r in wide]
    head = [_column_name(d, r) + ("" if d == "none" else " (drop)") for d, r in columns]
    ratios = " / ".join(f"{r:g}x" for d, r in columns if d != "none")
    lines = ["| model | parameters | " + " | ".join(head) + f" | C&C {ratios} defense s | on |",
             "|---" * (len(head) + 4) + "|"]
    for recipe in ("cifar10-resnet18", wide[0].recipe):
        rows = [Row(recipe, wide[0].attack, d, r) for d, r in columns]
        params = next((done[r.id]["params_before"] for r in rows if r.id in done), None)
        defended = [r for r in rows if r.defense != "none"]
        seconds = " / ".join(f"{done[r.id]['defense_s']:.0f}" if r.id in done else "-" for r in defended)
        machines = "; ".join(sorted({_machine(done[r.id]) for r in defended if r.id in done})) or "-"
        lines.append(f"| {rows[0].model} | {'-' if params is None else f'{params:,}'} | "
                     + " | ".join(_cell(done, r, with_drop=True) for r in rows) + f" | {seconds} | {machines} |")
    return lines


def _target_lines(done: dict, ratio: float, max_drop: float, max_asr: float) -> list[str]:
    rows = [r for r in TABLES["table2"] if r.defense == "cc" and r.ratio == ratio]
    got = [done[r.id] for r in rows if r.id in done]
    if not got:
        return [f"- C&C {ratio:g}x: no row run yet (target: mean ACC drop <= {max_drop}, every ASR <= {max_asr * 100:g}%)."]
    drops = [100 * (g["metrics"]["acc_before"] - g["metrics"]["acc_after"]) for g in got]
    asrs = [100 * g["metrics"]["asr_after"] for g in got]
    mean_drop = sum(drops) / len(drops)
    misses = ([f"mean drop over target by {mean_drop - max_drop:.2f} points"] if mean_drop > max_drop else []) \
        + ([f"max ASR over by {max(asrs) - 100 * max_asr:.2f} points"] if max(asrs) > 100 * max_asr else [])
    verdict = "**MISSED**; " + ", ".join(misses) if misses else "**met**"
    return [f"- C&C {ratio:g}x over {len(got)} of {len(rows)} settings: mean ACC drop {mean_drop:.2f} points "
            f"(target <= {max_drop}), max ASR {max(asrs):.2f}% (target <= {100 * max_asr:g}%): {verdict}."]


def _precision(result: dict) -> str:
    """What a row computed in on the CPU: bf16 autocast where the CPU runs bf16 natively, else fp32;
    rows from before commit 180f6a7 did not record it and always ran bf16 autocast."""
    return "fp32" if result["machine"].get("cpu_bf16_native") is False else "bf16"


def _machine(result: dict) -> str:
    """The CPU a row ran on and its precision: what its times are comparable within."""
    return f"{result['machine']['cpu']}, {_precision(result)}"


def _cost_table(done: dict) -> list[str]:
    lines = ["| row | machine, precision | total s (excl. evaluation) | per step (s) |", "|---|---|---|---|"]
    for rid, r in done.items():
        if r["row"]["defense"] == "none":
            continue
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items() if k != "evaluate")
        lines.append(f"| {rid} | {_machine(r)} | {r['defense_s']:.1f} | {steps} |")
    return lines


def _suspicion_table(done: dict) -> list[str]:
    rows = [(rid, r["suspicion"]) for rid, r in done.items() if r.get("suspicion")]
    if not rows:
        return ["No C&C row records it yet (rows from before this column was added)."]
    lines = ["| row | suspected target | synthetic images left out | inversion concentration "
             "| universal inversion flip rate | all-to-all (trigger unlearned) | probe's trigger (stamp or warp) | trigger channel clean "
             "| distillation | student fits its synthetic images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rid, s in rows:
        conc = "-" if s["inversion_concentration"] is None else f"{s['inversion_concentration']:.2f}"
        target = "none" if s["suspected_target"] is None else str(s["suspected_target"])
        flip = "-" if s.get("flip_rate") is None else f"{s['flip_rate']:.2f}"
        a2a = {None: "-", True: "yes", False: "no"}[s.get("all_to_all_suspected")]
        lines.append(f"| {rid} | {target} | {s['synthetic_excluded']} | {conc} | {flip} | {a2a} | "
                     f"{_patch_text(s)} | {_trigger_clean_text((done[rid].get('details') or {}).get('trigger'))} | "
                     f"{_distillation_text(done[rid].get('distillation'))} | {_guard_text(done[rid].get('finetune_guard'))} |")
    return lines


def _guard_text(guard: dict | None) -> str:
    """The fine-tune's collapse guard in the suspicion table ('-' for rows from before it)."""
    if guard is None:
        return "-"
    if guard["retry_max_grad_norm"] is None:
        return f"{guard['synthetic_fit']:.1%}" + (" (collapsed)" if guard["collapsed"] else "")
    return (f"{guard['synthetic_fit']:.1%}: collapsed; again with gradients clipped to {guard['retry_max_grad_norm']:g}: "
            f"{guard['synthetic_fit_retry']:.1%}")


def distill_check_flips(check: dict) -> str:
    """The distillation check's two flip rates, in words (bench and sweep tables)."""
    return (f"the inversion flips {check['flip_rate_distilled']:.2f} / {check['flip_rate_undistilled']:.2f} "
            "with / without distillation")


def _distillation_text(record: dict | None) -> str:
    """Whether the fine-tune distilled, why not when its gate closed, and the distillation check's
    verdict when it ran ('-' for older rows)."""
    if record is None:
        return "-"
    check = record.get("check")
    flips = distill_check_flips(check) if check else ""
    if check and not check["kept"]:
        return f"no: the distillation check kept the undistilled student ({flips})"
    checked = f"; the check kept it ({flips})" if check else ""
    if record.get("self_anchored"):
        return f"yes, from the student's own start ({record['reason']})"
    if record.get("teacher_finetune"):
        return "yes, from the teacher fine-tuned first" + (f" ({record['reason']})" if record["reason"] else "") + checked
    if record["reason"]:
        return f"no: {record['reason']}"
    if not record["distill"]:
        return "off"
    flip = record.get("teacher_trigger_flip_rate", record.get("teacher_stamp_flip_rate"))  # rows before the warp probe
    agreement, undone = record.get("teacher_agreement"), record.get("teacher_undoes_mapping")
    trigger = "the universal perturbation" if record.get("verified_against") == "perturbation" else "the trigger"
    undone_text = f" and gives {undone:.1%} the class the trigger maps to the original's" if undone else ""
    return ("yes" if flip is None else (f"yes ({trigger} flips {flip:.2f} on the teacher"
                                        + ("" if agreement is None else f", it agrees with the original on {agreement:.1%}")
                                        + undone_text + ")")) + checked


def _patch_text(suspicion: dict) -> str:
    """The probes' firing trigger in the suspicion table ('-' for rows from before the patch probe;
    rows from before the warp probe kept it under "patch", a stamp)."""
    if "trigger" not in suspicion and "patch" not in suspicion:
        return "-"
    p = suspicion.get("trigger", suspicion.get("patch"))
    if p is None:
        return "none fires"
    return (f"{p.get('kind', 'patch')} {trigger_text(p)}: flips {p['flip_rate']:.2f}, "
            f"{p['flip_rate_compact']:.2f} after compaction{', unlearned' if p['unlearned'] else ''}")


def _trigger_clean_text(info: dict | None) -> str:
    """What the trigger channel clean did, from the row's channel clean record (rows before the warp
    probe name the rate stamp_flip_rate)."""
    if info is None:
        return "-"
    kind = info.get("kind") or "stamp"
    before = info.get("trigger_flip_rate", info.get("stamp_flip_rate"))
    after = info.get("trigger_flip_rate_after", info.get("stamp_flip_rate_after"))
    if before is None:
        return "no trigger fired"
    if not info["n_pruned"]:
        return f"{kind} flips {before:.2f} after CLP: not run"
    return f"{kind} flips {before:.2f} after CLP: {info['n_pruned']} channels zeroed, then {after:.2f}"


def _size_table(done: dict) -> list[str]:
    lines = [f"| row | params before | params after | ms original (batch {LATENCY_BATCH}) | ms defended | speed-up |"
             " speed-up batch 1 |", "|---|---|---|---|---|---|---|"]
    for rid, r in done.items():
        o = r["onnx"]
        if o is None:
            continue
        lines.append(f"| {rid} | {r['params_before']:,} | {r['params_after']:,} | {o['latency_ms']['original']:.2f} | "
                     f"{o['latency_ms']['compact']:.2f} | {o['speedup']:.2f} | {o['speedup_batch1']:.2f} |")
    return lines


def _rank_strategy(result: dict) -> str:
    if result["row"]["defense"] != "cc":
        return ""
    config = result.get("config")
    return "-" if config is None else config["compact_resolved"]["rank_strategy"]


def _speed_section() -> list[str]:
    path = RESULTS / "speed_resnet18.md"
    if not path.exists():
        return ["Not run yet: `python -m benchmarks.speed`."]
    return path.read_text().splitlines()[1:]


def _preset_text(r: dict) -> str:
    """'current' when the row's C&C settings are the cpu preset's today (device, threads and ratio aside),
    else the top-level settings it differs in; '-' for rows without settings (baselines, no defense)."""
    from cc_core.defense.config import resolve_config

    config = r.get("config")
    if not config or r["row"]["defense"] != "cc":
        return "-"
    current = json.loads(json.dumps(resolve_config("cpu", ratio=r["row"]["ratio"]).to_dict(), default=str))
    ignored = {"device", "threads", "ratio"}
    differ = sorted(k for k in current if k not in ignored and config.get(k) != current[k])
    return "current" if not differ else "older (" + ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "") + ")"


def _split_text(r: dict) -> str:
    return {"report": "report half", "val": "val half"}.get(r.get("eval_split"), "whole test set")


def _worst_class_table(done: dict) -> list[str]:
    """Per C&C row: the class that lost most of its own accuracy, before -> after, in %."""
    lines = ["| row | worst class | its ACC before -> after | mean drop |", "|---|---|---|---|"]
    for rid, r in done.items():
        m = r["metrics"]
        before, after = m.get("per_class_acc_before"), m.get("per_class_acc_after")
        if r["row"]["defense"] != "cc" or not before or not after:
            continue
        worst = worst_class(before, after)
        lines.append(f"| {rid} | {worst} | {_pct(before[worst])} -> {_pct(after[worst])} | "
                     f"{100 * (m['acc_before'] - m['acc_after']):.2f} |")
    return lines


def render() -> Path:
    """Write benchmarks/RESULTS.md from the rows in benchmarks/results/bench/ (never typed in)."""
    done = load_rows()
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, "
                       f"{_precision(r)}" for r in done.values()})
    t2 = [("none", None), ("anp", 2.0), ("clp", 2.0), ("cc", 2.0), ("cc", 3.0), ("cc", 4.0)]
    small = [("none", None), ("clp", 2.0), ("cc", 2.0)]
    md = ["# Results\n",
          "Generated by `cleancompact bench render` from benchmarks/results/bench/*.json; every row was made by the "
          "command listed at the end (re-run one row with it; `--force` to redo a cached one). "
          f"Machines: {'; '.join(machines) or 'none yet'}. Models are the zoo's CPU-scale recipes "
          "(benchmarks/results/zoo.md), not the paper's full-width ResNet-18, so compare drops, not absolute ACC.\n",
          "## Table 2 shape: CIFAR-10, ResNet-18 (width 0.25), ACC / ASR in %\n",
          *_acc_asr_table(done, TABLES["table2"], t2), "",
          "Targets (issue 6; the paper's level):",
          *_target_lines(done, 2.0, 1.5, 0.05), *_target_lines(done, 4.0, 3.0, 0.05), "",
          "## Backdoors the preset was not tuned on\n",
          "The rows above are the tuning zoo. The unseen zoo (docs/PROTOCOL.md: other attack families and targets, "
          "scored on the test set's reporting half, one section per commit of the defense) is rendered by "
          "`python -m benchmarks.unseen_zoo render` into [results/unseen_zoo.md](results/unseen_zoo.md).\n",
          "## Tables 4/5 shape: GTSRB and other architectures (BadNet / Input-Aware), ACC / ASR in %\n",
          *_acc_asr_table(done, TABLES["table4"] + TABLES["table5"], small), "",
          "## Width: the zoo's WaNet recipe at twice the width, ACC / ASR in %\n",
          "The paper's 1.3-2 point drop at 2x is on a full-width ResNet-18 (11.2M parameters). The same "
          "recipe and attack at width 0.5 asks whether the gap shrinks as the model gets wider "
          "(`cleancompact bench run --table width`).\n",
          *_width_table(done), "",
          "## The class each C&C run suspected (its synthetic images stay out of the fine-tune)\n",
          "The zoo's all-to-one models target class 0; all-to-all models have no single target. The last two "
          "columns are recorded from the commit that added the universal inversion on (- = an earlier row).\n",
          *_suspicion_table(done), "",
          "## The class each C&C run cost most\n",
          "A mean drop of a few points can hide one class that no longer works: the largest loss of one class's "
          "own accuracy, in %.\n",
          *_worst_class_table(done), "",
          "## Parameters and onnxruntime latency of each defended model (CPU, 2 threads, one process)\n",
          *_size_table(done), "",
          "## Speed-up at full width\n", *_speed_section(), "",
          "## Cost of the defense (wall time per step)\n",
          "Times depend on the CPU and the precision the row ran in (bf16 autocast on a CPU with native bf16, else "
          "fp32; benchmarks/results/precision.md) and are comparable only within one of each (docs/MEASUREMENTS.md, "
          "\"Benchmark zoo\", times the same training on two of the CPUs below).\n",
          "C&C's `synthesize` is the run that made the model's shared synthetic images; `scan` is the "
          "suspected target (trigger inversion and adversarial histogram on the synthetic images, which picks the "
          "class whose synthetic images the fine-tune leaves out) and the histogram after.\n", *_cost_table(done), "",
          "## Commands\n",
          "Each row ran at the commit shown; C&C rows name how the ranks were allocated (`sensitivity` is the "
          "current `cpu` preset; `-` = a row from before the config was recorded, see docs/MEASUREMENTS.md); "
          "'preset' says whether a C&C row ran today's `cpu` preset or an older one (and the settings that differ); "
          "'scored on' which test images (docs/PROTOCOL.md: rows before the protocol used the whole test set).\n",
          "| row | commit | precision | ranks | preset | scored on | command |", "|---|---|---|---|---|---|---|",
          *[f"| {rid} | {r['machine'].get('git_commit', '-')} | {_precision(r)} | {_rank_strategy(r)} | {_preset_text(r)} | "
            f"{_split_text(r)} | `{r['command']}` |" for rid, r in done.items()]]
    RESULTS_MD.write_text("\n".join(md) + "\n")
    return RESULTS_MD

"""The unseen zoo: backdoored and clean models the defense is never tuned on (docs/PROTOCOL.md).

  python -m benchmarks.unseen_zoo build [--models NAME ...]      train what is missing (one at a time)
  python -m benchmarks.unseen_zoo run [--models ...] [--ratios 2 4] [--seeds 0 1 2] [--kinds scan cc]
  python -m benchmarks.unseen_zoo render

Families the tuning zoo does not have (SIG, low frequency, BPP, a TrojanNN-shaped patch, Adap-Blend),
all-to-one targets other than 0, two seeds for two of them, a GTSRB setting, and clean models of
other seeds and another architecture for the scan's false positives. Models are trained with the
tuning zoo's recipe into <cache>/unseen/<name>, then kept in fp16 under benchmarks/models/unseen/
(committed: every machine judges the same weights; the cache is filled from there). ``run`` scans each model and defends it with the
``cpu`` preset at each ratio and synthesis seed, scored on the test set's reporting half; each row
is a JSON file under results/unseen_zoo/<commit>/, so the rows of every revision of the defense
stay in the record, and a row that exists is not run again. It refuses a tree with uncommitted
changes under cc_core/: a row names the code it ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, shared_synthetic
from benchmarks.zoo import RECIPE, cache_dir, command, ensure_model, keep

ROWS = RESULTS / "unseen_zoo"
# The built models, committed so that every machine judges the same weights (fp16: 1.4 MB each).
MODELS = Path(__file__).resolve().parent / "models" / "unseen"
FLAG_RISK = 0.5  # the audit's default --flag
PRESET = "cpu"


@dataclass(frozen=True)
class Setting:
    """One model of the unseen zoo: a training recipe's changes from the tuning zoo's RECIPE."""

    name: str
    attack: str  # "none" for a clean model
    target: int = 0
    seed: int = 0
    dataset: str = "cifar10"
    arch: str = RECIPE["arch"]
    attack_params: dict = field(default_factory=dict)

    @property
    def backdoored(self) -> bool:
        return self.attack != "none"

    @property
    def recipe(self) -> dict:
        return RECIPE | {"dataset": self.dataset, "arch": self.arch, "seed": self.seed}

    @property
    def overrides(self) -> dict:
        extra = {"attack_params": self.attack_params} if self.attack_params else {}
        return extra | ({"target": self.target} if self.backdoored else {})

    @property
    def directory(self) -> Path:
        return cache_dir() / "unseen" / self.name

    def command(self) -> list[str]:
        return command(self.attack, self.recipe, f"<cache>/unseen/{self.name}", self.overrides)


SETTINGS = [
    Setting("cifar10-sig-t3", "sig", target=3),
    Setting("cifar10-sig-t3-seed1", "sig", target=3, seed=1),
    Setting("cifar10-lowfreq-t5", "lowfreq", target=5),
    Setting("cifar10-trojan-t1", "trojan", target=1),
    Setting("cifar10-trojan-t1-seed1", "trojan", target=1, seed=1),
    Setting("cifar10-adapblend-t9", "adapblend", target=9),
    Setting("cifar10-bpp-t7", "bpp", target=7),
    Setting("gtsrb-lowfreq-t12", "lowfreq", target=12, dataset="gtsrb"),
    Setting("cifar10-clean-seed1", "none", seed=1),
    Setting("cifar10-clean-seed2", "none", seed=2),
    Setting("cifar10-preact-clean", "none", arch="preactresnet18"),
]
BY_NAME = {s.name: s for s in SETTINGS}


def selected(names: list[str] | None) -> list[Setting]:
    unknown = sorted(set(names or []) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"unknown unseen-zoo models {unknown}; choose from {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names] if names else SETTINGS


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure(s: Setting) -> Path:
    """The model of ``s`` in the cache: there already, copied from the committed copy, or trained,
    stored in fp16 and committed (copied to MODELS)."""
    kept = MODELS / s.name
    if not (s.directory / "metrics.json").exists() and not (kept / "metrics.json").exists():
        print(f"[unseen] {s.name}: {' '.join(s.command())}", flush=True)
    ensure_model(s.attack, s.recipe, quiet=True, overrides=s.overrides, out=s.directory, kept=kept)
    if not (kept / "metrics.json").exists():
        keep(s.directory, kept)
    return s.directory


def build(settings: list[Setting]) -> None:
    """Make every missing model (ensure) and write results/unseen_zoo_models.{json,md}."""
    for s in settings:
        ensure(s)
    render_models()


def render_models() -> None:
    stem = RESULTS / "unseen_zoo_models"
    earlier = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    rows = []
    for s in SETTINGS:
        metrics_file = MODELS / s.name / "metrics.json"
        if not metrics_file.exists():
            continue
        m = json.loads(metrics_file.read_text())
        sha256 = file_digest(MODELS / s.name / "model.safetensors")
        same = next((r for r in earlier.get("models", []) if r["name"] == s.name and r["sha256"] == sha256), None)
        rows.append({"name": s.name, "setting": dataclasses.asdict(s), "acc": m["acc"], "asr": m["asr"], "ra": m["ra"],
                     "per_class_acc": m["per_class_acc"], "train_seconds": m["train_seconds"], "sha256": sha256,
                     "command": " ".join(s.command()),
                     "machine": same.get("machine", earlier.get("machine")) if same else machine()})
    result = {"recipe": RECIPE, "models": rows}
    md = ["# The unseen zoo's models\n",
          "Trained with `python -m benchmarks.unseen_zoo build` on the machine each row names (2 cores, torch "
          f"2.13.0+cpu); the tuning zoo's recipe {json.dumps(RECIPE)} with each row's changes. ACC / ASR / RA in % "
          "on the whole test set, as the trainer measured them in fp32; the committed weights "
          "(benchmarks/models/unseen/) are those weights in fp16, and the sha256 is theirs, so a model trained "
          "again shows as a different one. 'train min' is the trainer's last run: a training that was stopped and "
          "resumed from its checkpoint counts only the part after the resume.\n",
          "| model | attack | target | seed | ACC | ASR | RA | train min | trained on | sha256 | command |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["setting"]
        backdoored = s["attack"] != "none"
        md.append(f"| {r['name']} | {s['attack']} | {s['target'] if backdoored else '-'} | {s['seed']} | {_pct(r['acc'])} | "
                  f"{_pct(r['asr'])} | {_pct(r['ra'])} | {r['train_seconds'] / 60:.1f} | {r['machine']['cpu']} | "
                  f"{r['sha256'][:12]} | `{r['command']}` |")
    write(stem, result, "\n".join(md) + "\n")


def write(stem: Path, payload: dict, markdown: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(stem.with_suffix(".md"))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def code_commit() -> str:
    """The last commit that changed the defense's code (cc_core/, presets included): the rows of
    one revision of the defense share it whatever was committed elsewhere since. Refuses
    uncommitted changes there: a row names the code it ran."""
    root = Path(__file__).resolve().parent.parent
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "cc_core"], capture_output=True, text=True,
                           cwd=root).stdout.strip()
    if dirty:
        raise SystemExit(f"uncommitted changes under cc_core/; commit them first, a row names the code it ran:\n{dirty}")
    return subprocess.run(["git", "log", "-1", "--format=%h", "--", "cc_core"], capture_output=True, text=True,
                          cwd=root, check=True).stdout.strip()


def row_path(commit: str, setting: Setting, kind: str, seed: int, ratio: float | None = None) -> Path:
    suffix = f"-{ratio:g}x" if ratio is not None else ""
    return ROWS / commit / f"{setting.name}-{kind}{suffix}-s{seed}.json"


def per_class_drop(before: list[float], after: list[float]) -> float:
    """The largest loss of one class's own accuracy (points of that class's accuracy, as a fraction)."""
    return max(b - a for b, a in zip(before, after))


def scan_row(setting: Setting, model, seed: int) -> dict:
    from cc_core.adversarial import PGDConfig
    from cc_core.probes import WarpProbeConfig
    from cc_core.scan import scan
    from cc_core.synth import SynthConfig

    report = scan(model, SynthConfig(n_samples=256, iterations=100, seed=seed), PGDConfig(seed=seed),
                  progress=False, warp_cfg=WarpProbeConfig(seed=seed))
    return {"risk": report["risk"], "risk_signals": report["risk_signals"], "flagged": report["risk"] >= FLAG_RISK,
            "target_estimate": report["target_class_estimate"], "all_to_all_suspected": report["all_to_all_suspected"],
            "seconds": report["timings_s"]["total"]}


def defend_row(setting: Setting, model, attack, data, ratio: float, seed: int) -> dict:
    from cc_core.defense.config import resolve_config
    from cc_core.defense.run import defend

    cfg = resolve_config(PRESET, ratio=ratio)
    cfg = cfg.replace(synth={"seed": cfg.synth.seed + seed})
    x, y, synth_seconds = shared_synthetic(f"unseen-{setting.name}", model, cfg.synth)
    result = defend(model, config=cfg, eval_data=data, attack=attack, progress=False, log=lambda *a: None,
                    synthetic=(x, y))
    report = result.report
    m = report["metrics"]
    return {"metrics": {k: m[k] for k in ("acc_before", "acc_after", "asr_before", "asr_after", "ra_before", "ra_after")},
            "per_class_acc_before": m["per_class_acc_before"], "per_class_acc_after": m["per_class_acc_after"],
            "max_class_drop": per_class_drop(m["per_class_acc_before"], m["per_class_acc_after"]),
            "suspected_target": report["scan"]["suspected_target"], "target_estimate": report["scan"].get("target_estimate"),
            "target_signals": report["scan"].get("target_signals"), "trigger": report["scan"]["trigger"],
            "targeted_inversion": report["scan"].get("targeted_inversion"),
            "perturbation_residual": report["scan"].get("perturbation_residual"),
            "trigger_clean": {k: v for k, v in report["channel_clean"]["trigger"].items() if k != "channels"},
            "synthetic_excluded": report["scan"]["synthetic_excluded"],
            "compression": report["model"]["compression"], "timings_s": report["timings_s"] | {"synthesis_shared": synth_seconds},
            "config_digest": hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]}


def run(settings: list[Setting], ratios: list[float], seeds: list[int], kinds: tuple[str, ...] = ("scan", "cc")) -> None:
    """Each row of ``kinds`` ("scan", "cc": the defense) not yet written at this commit, then render."""
    from cc_core.attacks import load_attack
    from cc_core.data import load_dataset
    from cc_core.io import load_model

    commit = code_commit()
    for s in settings:
        if not (s.directory / "metrics.json").exists() and not (MODELS / s.name / "metrics.json").exists():
            print(f"[unseen] {s.name}: not built (python -m benchmarks.unseen_zoo build --models {s.name})", flush=True)
            continue
        ensure(s)
        model = load_model(s.directory / "model.safetensors").eval()
        attack = load_attack(s.directory) if s.backdoored else None
        data = load_dataset(s.dataset, "report")
        jobs = [("scan", seed, None) for seed in seeds] if "scan" in kinds else []
        jobs += [("cc", seed, ratio) for seed in seeds for ratio in ratios] if s.backdoored and "cc" in kinds else []
        for kind, seed, ratio in jobs:
            path = row_path(commit, s, kind, seed, ratio)
            if path.exists():
                continue
            torch.manual_seed(seed)
            start = time.perf_counter()
            row = scan_row(s, model, seed) if kind == "scan" else defend_row(s, model, attack, data, ratio, seed)
            row |= {"model": s.name, "kind": kind, "seed": seed, "ratio": ratio, "commit": commit, "preset": PRESET,
                    "eval_split": "report", "model_sha256": file_digest(s.directory / "model.safetensors"),
                    "wall_s": time.perf_counter() - start, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": machine()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"[unseen] {path.name}: {summary_text(row)}", flush=True)
    render()


def summary_text(row: dict) -> str:
    if row["kind"] == "scan":
        return f"risk {row['risk']:.2f}, target {row['target_estimate']} ({row['seconds']:.0f} s)"
    m = row["metrics"]
    asr = "" if m["asr_after"] is None else f", ASR {_pct(m['asr_before'])} -> {_pct(m['asr_after'])}"
    return (f"ACC {_pct(m['acc_before'])} -> {_pct(m['acc_after'])}{asr}, worst class -{100 * row['max_class_drop']:.1f}, "
            f"estimated target {row['target_estimate']}, left out {row['suspected_target']} ({row['wall_s']:.0f} s)")


def _spread(values: list[float]) -> str:
    """'mean ± sd (n)' in %, sd over the seeds (0 for one)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f} ({len(values)})"


def render() -> None:
    """results/unseen_zoo.{json,md}: one section per commit the rows ran at, oldest first."""
    commits = {}
    for path in sorted(ROWS.glob("*/*.json")):
        row = json.loads(path.read_text())
        commits.setdefault(row["commit"], []).append(row)
    order = sorted(commits, key=lambda c: min(r["finished_at"] for r in commits[c]))
    md = ["# The unseen zoo under the frozen preset\n",
          "Rows of `python -m benchmarks.unseen_zoo run`, one section per commit of the defense they ran at "
          "(docs/PROTOCOL.md). ACC / ASR in %, mean ± sd over synthesis seeds (n), on the test set's reporting half; "
          "'worst class' is the largest loss of one class's own accuracy, in points; 'flagged' counts seeds whose "
          f"scan risk reached {FLAG_RISK} (the audit's default).\n"]
    for commit in order:
        rows = commits[commit]
        m0 = rows[0]["machine"]
        md += [f"## Commit {commit}\n", f"{m0['cpu']}, {m0['cores']} cores, torch {m0['torch']}.\n",
               "| model | true target | scan flagged | scan target | ratio | ACC before | ACC after | ASR before | ASR after | "
               "worst class | defense's target estimate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in SETTINGS:
            scans = [r for r in rows if r["model"] == s.name and r["kind"] == "scan"]
            ccs = [r for r in rows if r["model"] == s.name and r["kind"] == "cc"]
            if not scans and not ccs:
                continue
            flagged = f"{sum(r['flagged'] for r in scans)}/{len(scans)}" if scans else "-"
            targets = " ".join(str(r["target_estimate"]) for r in scans) or "-"
            truth = s.target if s.backdoored else "clean"
            if not ccs:
                md.append(f"| {s.name} | {truth} | {flagged} | {targets} | - | | | | | | |")
            for ratio in sorted({r["ratio"] for r in ccs}):
                at = [r for r in ccs if r["ratio"] == ratio]
                cells = {key: _spread([r["metrics"][key] for r in at])
                         for key in ("acc_before", "acc_after", "asr_before", "asr_after")}
                md.append(f"| {s.name} | {truth} | {flagged} | {targets} | {ratio:g}x | {cells['acc_before']} | "
                          f"{cells['acc_after']} | {cells['asr_before']} | {cells['asr_after']} | "
                          f"{max(100 * r['max_class_drop'] for r in at):.1f} | "
                          f"{' '.join(str(r['target_estimate']) for r in at)} |")
        md.append("")
    write(RESULTS / "unseen_zoo", {"commits": commits}, "\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="train the models that are not cached")
    p.add_argument("--models", nargs="+")
    p = sub.add_parser("run", help="scan and defend each model, rows kept per commit")
    p.add_argument("--models", nargs="+")
    p.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", choices=["scan", "cc"], default=["scan", "cc"],
                   help="which rows: the scan's, the defense's (a change outside cc_core/scan.py and the probes "
                        "leaves the scan's rows of an earlier commit standing)")
    sub.add_parser("render", help="rewrite the tables from the rows")
    args = parser.parse_args()
    if args.command == "build":
        build(selected(args.models))
    elif args.command == "run":
        run(selected(args.models), args.ratios, args.seeds, tuple(args.kinds))
    else:
        render_models()
        render()


if __name__ == "__main__":
    main()

"""The ``cleancompact`` command line.

Exit codes (docs/ARCHITECTURE.md): 0 ok, 1 the run completed but a gate failed, 2 bad input
(one clear message, no traceback), anything else a bug.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from cleancompact.pipeline_cli import key_values, merge_settings, parse_settings, risk_threshold

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
CHECKPOINT_NAME = "checkpoint.pt"


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors already; keep its message short."""

    def error(self, message: str) -> None:  # pragma: no cover - argparse contract
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def _input_error(message: str) -> Exception:
    from cc_core.errors import InputError

    return InputError(message)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file: .safetensors, or a PyTorch state dict (.pt/.pth)")
    p.add_argument("--arch", help="architecture, where the file does not say it")
    p.add_argument("--num-classes", type=int, help="number of classes, where the file does not say it")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled whole-module files (runs code from the file: trusted files only)")


def _add_settings_args(g) -> None:
    g.add_argument("--config", metavar="FILE", help="settings file (.toml, .yaml or .json) with DefendConfig's keys, "
                                                     "over the preset")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="one setting, repeatable, over the preset and --config: a DefendConfig field, dotted for "
                        "a section (finetune.epochs=20, patch_probe=null); JSON values")


def _settings(args: argparse.Namespace) -> dict:
    """The overrides of --config FILE with --set over them."""
    from cc_core.settings import read_settings

    base = read_settings(args.config) if args.config else {}
    return merge_settings(base, parse_settings(args.set or []))


def _defend_config(args: argparse.Namespace, fixed: dict):
    """The preset, --config, --set, then the dedicated flags (``fixed``, --seed)."""
    from cc_core.defense.config import resolve_config, with_seed

    cfg = resolve_config(args.preset, **merge_settings(_settings(args), fixed))
    return cfg if args.seed is None else with_seed(cfg, args.seed)


def _load(args: argparse.Namespace):
    from cc_core.io import load_model

    return load_model(args.model, args.arch, args.num_classes, allow_pickle=args.allow_pickle)


def _add_compact_args(p: argparse.ArgumentParser) -> None:
    from cc_core.compact.clip import NORMALIZERS
    from cc_core.compact.ranks import LEVEL_STRATEGIES
    from cc_core.compact.transform import DATA_FREE_METHODS

    p.add_argument("--ratio", type=float, default=2.0, help="target compression of the whole model (>= 1)")
    p.add_argument("--tau", type=_positive_float, default=None,
                   help="clip normalized singular values at tau (default: no clipping)")
    p.add_argument("--normalizer", choices=list(NORMALIZERS), default="mean",
                   help="per-layer normalizer of singular values")
    p.add_argument("--method", choices=list(DATA_FREE_METHODS), default="hosvd",
                   help="Tucker-2 factors: truncated HOSVD, or HOOI-refined at the chosen ranks")
    p.add_argument("--rank-strategy", choices=list(LEVEL_STRATEGIES), default="uniform",
                   help="data-free rank allocation; 'sensitivity' (measured on synthetic images) is in defend")
    p.add_argument("--rank-multiple", type=int, default=16, help="ranks are multiples of this")
    p.add_argument("--decompose-1x1", choices=["auto", "yes", "no"], default="auto",
                   help="factorize 1x1 convs by SVD (auto: only if KxK convs cannot meet the ratio)")


def _compact_options(args: argparse.Namespace) -> dict:
    return {"normalizer": args.normalizer, "method": args.method,
            "rank_strategy": args.rank_strategy, "rank_multiple": args.rank_multiple,
            "decompose_1x1": {"auto": None, "yes": True, "no": False}[args.decompose_1x1]}


def _write_json(path: Path, data: dict) -> None:
    """Atomic JSON write: readers never see a half-written file."""
    from cc_core.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


def _table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_compact(args: argparse.Namespace) -> int:
    """Clean + compact one model file; write model.safetensors and plan.json to --out."""
    from cc_core import clean_compact, save_model

    model = _load(args)
    start = time.perf_counter()
    new, plan = clean_compact(model, ratio=args.ratio, tau=args.tau, **_compact_options(args))
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(new, out / "model.safetensors", plan=plan)
    _write_json(out / "plan.json", plan.to_dict())
    if args.verbose:
        print(_table(plan.summary_rows(), ("layer", "kind", "shape", "ranks", "params", "after", "clipped")))
    print(f"{plan.arch}: {plan.params_before:,} -> {plan.params_after:,} parameters "
          f"(ratio {plan.ratio_achieved:.3f}, requested {plan.ratio_requested:g}) in {elapsed:.1f} s")
    print(f"wrote {out / 'model.safetensors'} and {out / 'plan.json'}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a model file: architecture, classes, parameters, factorized layers."""
    from cc_core.io import read_metadata
    from cc_core.models import count_params

    model = _load(args)
    spec = model.cc_spec
    info = {"file": str(args.model), "spec": spec.to_dict(), "params": count_params(model),
            "factorized_layers": len(spec.structure),
            "plan": read_metadata(args.model).get("plan")}
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{args.model}: {spec.arch} width {spec.width:g}, {spec.num_classes} classes, "
          f"input {tuple(spec.input_shape)}, {info['params']:,} parameters")
    if spec.structure:
        rows = [(name, e["kind"], "/".join(map(str, e["ranks"]))) for name, e in spec.structure.items()]
        print(_table(rows, ("factorized layer", "kind", "ranks")))
    return EXIT_OK


def _dataset_choices() -> str:
    from cc_core.data import DATASETS

    return ", ".join(DATASETS)


def cmd_train_backdoor(args: argparse.Namespace) -> int:
    """Train a (backdoored) classifier; write model, attack spec and metrics to --out."""
    import numpy as np
    import torch

    from cc_core import build_model, save_model
    from cc_core.attacks import build_attack
    from cc_core.data import get_dataset_info, load_dataset
    from cc_core.metrics import evaluate
    from cc_core.train import TrainConfig, train_classifier

    info = get_dataset_info(args.dataset)
    attack = None
    if args.attack != "none":
        attack = build_attack(args.attack, info.num_classes, target=args.target, ratio=args.ratio,
                              seed=args.seed, cross_ratio=args.cross_ratio,
                              params=key_values(args.attack_param, "--attack-param"))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      schedule=args.schedule, hflip=info.hflip, seed=args.seed,
                      mixed_precision=not args.no_mixed_precision, threads=args.threads,
                      device=args.device)
    train = load_dataset(info.name, "train", args.data_dir)
    test = load_dataset(info.name, "test", args.data_dir)
    if args.train_subset:
        if not 0 < args.train_subset <= len(train):
            raise _input_error(f"--train-subset must be in 1..{len(train)}, got {args.train_subset}")
        keep = np.random.default_rng(args.seed).choice(len(train), args.train_subset, replace=False)
        train = train.subset(np.sort(keep))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=info.num_classes, width=args.width,
                        mean=info.mean, std=info.std, class_names=tuple(train.classes))
    start = time.perf_counter()
    history = train_classifier(model, train, cfg, attack=attack, out_dir=out,
                               progress=not args.quiet)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model.float(), test, attack, device=args.device)
    save_model(model.to("cpu"), out / "model.safetensors")
    if attack is not None:
        attack.save(out)
    report = {"command": "cleancompact " + " ".join(sys.argv[1:]),
              "arch": args.arch, "width": args.width, "dataset": info.name,
              "attack": attack.to_dict() if attack else None, "train_config": cfg.to_dict(),
              "train_size": len(train), "train_seconds": round(train_seconds, 1),
              "history": history, **{k: metrics[k] for k in ("acc", "asr", "ra", "n_clean", "n_poison")},
              "per_class_acc": metrics["per_class_acc"]}
    _write_json(out / "metrics.json", report)
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    print(_metrics_line(metrics) + f"; trained in {train_seconds / 60:.1f} min -> {out}")
    return EXIT_OK


def _metrics_line(m: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    return f"ACC {pct(m['acc'])}  ASR {pct(m['asr'])}  RA {pct(m['ra'])}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """ACC (and ASR/RA with --attack) of a model on a dataset's test split or an image folder."""
    from cc_core.attacks import load_attack
    from cc_core.data import load_dataset
    from cc_core.metrics import evaluate

    model = _load(args)
    data = load_dataset(args.eval_data, "test", args.data_dir)
    attack = load_attack(args.attack) if args.attack else None
    metrics = evaluate(model, data, attack, device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.model} on {data.name} ({metrics['n_clean']} images"
              + (f", {metrics['n_poison']} poisoned" if attack else "") + "): " + _metrics_line(metrics))
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    """Download a public dataset, verify its checksums and convert it for --data-dir."""
    from cc_core.data import download_dataset

    out = download_dataset(args.dataset, args.data_dir, keep_archives=args.keep_archives)
    print(f"{args.dataset} ready in {out}")
    return EXIT_OK


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def cmd_defend(args: argparse.Namespace) -> int:
    """Clean & Compact a model with no real data; write model, ONNX and report.json to --out."""
    from cc_core.attacks import load_attack
    from cc_core.data import load_dataset
    from cc_core.defense.package import export_package
    from cc_core.defense.run import defend, defend_baseline

    given = {"device": args.device, "threads": args.threads}
    cfg = _defend_config(args, {"ratio": args.ratio} | {k: v for k, v in given.items() if v is not None})
    model = _load(args)
    eval_data = load_dataset(args.eval_data, "test", args.data_dir) if args.eval_data else None
    attack = load_attack(args.attack) if args.attack else None
    if attack is not None and eval_data is None:
        raise _input_error("--attack needs --eval-data to measure ASR")
    if args.method == "cc":
        result = defend(model, config=cfg, eval_data=eval_data, attack=attack, progress=not args.quiet,
                        log=(lambda *a: None) if args.quiet or args.json else print)
    else:
        clean = None
        if args.method == "anp":
            if not args.clean_data:
                raise _input_error("--method anp needs --clean-data (ANP is not data-free)")
            clean = _clean_subset(args)
        result = defend_baseline(model, args.method, args.ratio, eval_data, attack, clean,
                                 device=cfg.device, progress=not args.quiet)
    out = export_package(result, model, args.out, threads=cfg.threads or 2,
                         latency_batch=args.latency_batch)
    r = result.report
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return EXIT_OK
    m, o = r["metrics"], r["onnx"]
    scan = r["scan"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [("parameters", f"{r['model']['params_before']:,}", f"{r['model']['params_after']:,}"),
            ("MACs", f"{r['model']['macs_before']:,}", f"{r['model']['macs_after']:,}"),
            ("ACC %", _pct(m["acc_before"]), _pct(m["acc_after"])),
            ("ASR %", _pct(m["asr_before"]), _pct(m["asr_after"])),
            ("RA %", _pct(m["ra_before"]), _pct(m["ra_after"])),
            ("scan concentration", fmt(scan["concentration_before"]), fmt(scan["concentration_after"])),
            *([("suspected target class", str(scan["suspected_target"]),
                f"{scan['synthetic_excluded']} synthetic images left out")] if scan.get("synthetic_excluded") else []),
            (f"onnxruntime ms (batch {o['latency_batch']})", f"{o['latency_ms']['original']:.2f}", f"{o['latency_ms']['compact']:.2f}")]
    print(_table(rows, ("", "before", "after")))
    t = r["timings_s"]
    print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"wrote {out}/model.safetensors, model.onnx, report.json")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """The resolved settings of a defense (preset, --config, --set) as YAML (a valid --config file) or JSON."""
    cfg = _defend_config(args, {})
    settings = json.loads(json.dumps(cfg.to_dict(), default=str))
    if args.json:
        print(json.dumps(settings, indent=2))
    else:
        import yaml

        print(f"# cleancompact defend settings: preset {args.preset}"
              + (f", {args.config}" if args.config else "") + "".join(f", --set {s}" for s in args.set or []))
        print(yaml.safe_dump(settings, sort_keys=False), end="")
    return EXIT_OK


def _clean_subset(args: argparse.Namespace):
    """A seeded --clean-fraction of the clean data's train split (ANP's 1%)."""
    from cc_core.data import load_dataset

    if not 0 < args.clean_fraction <= 1:
        raise _input_error(f"--clean-fraction must be in (0, 1], got {args.clean_fraction}")
    return load_dataset(args.clean_data, "train", args.data_dir).sample(args.clean_fraction, args.seed or 0)


def cmd_scan(args: argparse.Namespace) -> int:
    """Data-free backdoor risk report of a model."""
    from cc_core.adversarial import PGDConfig
    from cc_core.probes import WarpProbeConfig
    from cc_core.scan import scan
    from cc_core.synth import SynthConfig

    model = _load(args)

    report = scan(model, SynthConfig(n_samples=args.samples, iterations=args.iterations, seed=args.seed),
                  PGDConfig(seed=args.seed), device=args.device, progress=not args.quiet,
                  warp_cfg=None if args.no_warp_probe else WarpProbeConfig(seed=args.seed))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, report)
    verdict = EXIT_GATE_FAILED if args.fail_on is not None and report["risk"] >= args.fail_on else EXIT_OK
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "spectra"} |
                         {"spectra": [{k: v for k, v in s.items() if k != "normalized"} for s in report["spectra"]]}, indent=2))
        return verdict
    names = model.cc_spec.class_names
    target = report["target_class_estimate"]
    label = (f"{target} ({names[target]})" if names else str(target)) + (
        "; a trigger sends each class somewhere else (all-to-all)"
        if report["all_to_all_suspected"] else "")
    inv, flip = report["inversion"], report["flip"]
    signals = report["risk_signals"]
    print(f"{args.model}: risk {report['risk']:.2f} (inversion {signals['inversion']:.2f}, all-to-all {signals['all_to_all']:.2f}, "
          f"targeted {signals['targeted']:.2f}, patch {signals['patch']:.2f}, warp {signals.get('warp', 0.0):.2f}, "
          f"adversarial {signals['adversarial']:.2f}), most likely target class {label}")
    print(f"outlier channels (Lipschitz z > {report['config']['inversion']['u']:g}): {inv['n_channel_outliers']}"
          + (f", max z {inv['max_channel_z']:.2f}; inverted-trigger class histogram: "
             + " ".join(str(c) for c in inv["histogram"]) if inv["histogram"] else ""))
    print(f"universal inverted trigger: flips {flip['flip_rate']:.0%} of the synthetic images, "
          f"{flip['mapping_consistency']:.0%} of them consistently by source class, "
          f"{flip['delta_pixels_changed']:.1%} of pixels changed by > 0.1")
    if targeted := report["targeted"]:
        print(f"targeted inverted trigger (into class {targeted['inverted_into']}, the adversarially flagged one): "
              f"flips {targeted['flip_rate']:.0%} of the synthetic images, "
              f"{targeted['delta_pixels_changed']:.1%} of pixels changed by > 0.1")
    patch = report["patch"]
    if patch:
        from cc_core.probes import stamp_text

        print(f"patch probe: the best stamp ({stamp_text(patch)}) "
              f"flips {patch['flip_rate']:.0%} of {patch['n']} synthetic images (median stamp "
              f"{patch['median_screen_rate']:.0%}); class histogram: " + " ".join(str(c) for c in patch["histogram"]))
    warp = report.get("warp")
    if warp:
        pulled = "pushing images out of their class" if warp["pull_class"] is None else f"pulling into class {warp['pull_class']}"
        print(f"warp probe: the best smooth warp ({pulled}, max shift {warp['max_shift_used']:.2f} px) flips "
              f"{warp['flip_rate']:.0%} of {warp['n']} synthetic images; class histogram: "
              + " ".join(str(c) for c in warp["histogram"]))
    print(f"adversarial class histogram (concentration {report['concentration']:.2f}, anomaly index "
          f"{report['anomaly_index']:.1f}): " + " ".join(str(c) for c in report["histogram"]))
    top = sorted(report["spectra"], key=lambda s: -s["max_normalized"])[:5]
    print(_table([(s["layer"], f"{s['max_normalized']:.2f}") for s in top], ("layer", "max normalized sv")))
    if verdict:
        print(f"risk {report['risk']:.2f} >= --fail-on {args.fail_on:g}: exit {verdict}")
    return verdict


def cmd_bench(args: argparse.Namespace) -> int:
    """Run, list or render the benchmark tables (benchmarks/bench.py)."""
    from benchmarks import bench

    if args.recipe is not None and args.recipe not in bench.RECIPES:
        raise _input_error(f"unknown recipe {args.recipe!r}; choose from {', '.join(bench.RECIPES)}")
    if args.action == "render":
        print(f"wrote {bench.render()}")
        return EXIT_OK
    rows = bench.select(args.table, args.recipe, args.attacks, args.defenses, args.ratios)
    if not rows:
        raise _input_error("no benchmark row matches these filters (see `cleancompact bench list`)")
    if args.action == "list":
        print(_table([(r.id, "done" if bench.row_path(r).exists() else "-", r.command) for r in rows],
                     ("row", "state", "command")))
        return EXIT_OK
    bench.run(rows, force=args.force)
    print(f"wrote {bench.render()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from cc_core import __version__
    from cleancompact.pipeline_cli import add_commands

    parser = _Parser(prog="cleancompact", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cleancompact {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_compact, _add_inspect, _add_train_backdoor, _add_evaluate, _add_download, _add_defend,
                _add_config, _add_scan, _add_bench, add_commands):
        add(sub)
    return parser


DATA_DIR_HELP = "dataset directory (default: $CC_DATA_DIR, else ~/.cache/cleancompact/data)"
DEVICE_HELP = "auto, cpu, cuda, cuda:1 ..."


def _add_compact(sub) -> None:
    p = sub.add_parser("compact", help="clean + compact a model file (C&C steps 1-4)")
    _add_model_args(p)
    _add_compact_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer's decision")
    p.set_defaults(func=cmd_compact)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a model file")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def _add_train_backdoor(sub) -> None:
    from cc_core.attacks import ATTACKS
    from cc_core.data import DATASETS
    from cc_core.models.registry import list_models

    p = sub.add_parser("train-backdoor", help="train a backdoored classifier (research, demos, benchmarks)")
    p.add_argument("--arch", required=True, help=f"architecture: {', '.join(list_models())}")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0)")
    p.add_argument("--attack", required=True,
                   help=f"{', '.join(sorted(ATTACKS))} (suffix -a2a: all-to-all), or none")
    p.add_argument("--dataset", required=True, help=", ".join(DATASETS))
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--train-subset", type=int, help="train on a seeded random subset of N images")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle", help="learning-rate schedule")
    p.add_argument("--target", type=int, default=0, help="all-to-one target class")
    p.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio")
    p.add_argument("--cross-ratio", type=float,
                   help="cross (noise-mode) samples per poisoned sample (default: the attack's own)")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, repeatable (e.g. wanet: s=1.0 k=4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, poisoning and batches")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-mixed-precision", action="store_true", help="fp32 instead of bf16 (CPU) / fp16 AMP (CUDA)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--out", required=True, help="output directory (a checkpoint there is resumed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_backdoor)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="ACC / ASR / RA of a model")
    _add_model_args(p)
    p.add_argument("--eval-data", required=True, help="dataset name (its test split) or an image folder")
    p.add_argument("--attack", help="attack spec: attack.json or the directory holding it")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download and verify a public dataset")
    p.add_argument("dataset", help="the dataset's name (cifar10, cifar100, gtsrb)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives after conversion")
    p.set_defaults(func=cmd_download)


def _add_defend(sub) -> None:
    from cc_core.defense.config import PRESET_NAMES

    p = sub.add_parser("defend", help="remove a backdoor and compress, data-free (C&C)",
                       description="Clean & Compact a model with no real data. Every setting of the defense is a "
                                   "field of cc_core.defense.config.DefendConfig: see them with `cleancompact config show`, "
                                   "change them with --config FILE or --set KEY=VALUE.")
    g = p.add_argument_group("the model")
    _add_model_args(g)
    g = p.add_argument_group("the defense")
    g.add_argument("--ratio", type=float, required=True, help="compression of the whole model's parameters (> 1)")
    g.add_argument("--preset", choices=list(PRESET_NAMES), default="cpu",
                   help="cpu: minutes on 2 CPU cores (default); paper: the paper's budget, for a GPU")
    _add_settings_args(g)
    g.add_argument("--method", choices=["cc", "clp", "anp"], default="cc",
                   help="cc (default), or a baseline at the same parameter budget: clp (data-free), anp")
    g.add_argument("--clean-data", help="anp only: dataset whose train split supplies clean images (anp is not data-free)")
    g.add_argument("--clean-fraction", type=float, default=0.01, help="anp only: fraction of that split (default 0.01)")
    g = p.add_argument_group("measuring (the defense itself never sees these)")
    g.add_argument("--eval-data", help="dataset name (cifar10, gtsrb) or image folder: ACC before and after")
    g.add_argument("--attack", help="attack spec (attack.json or its directory): ASR and RA before and after")
    g.add_argument("--data-dir", help=DATA_DIR_HELP)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="directory for model.safetensors, model.onnx and report.json")
    g.add_argument("--latency-batch", type=int, default=128, help="batch size of the ONNX latency comparison")
    g.add_argument("--json", action="store_true", help="print report.json instead of the summary table")
    g.add_argument("--quiet", action="store_true", help="no progress bars or step log")
    g = p.add_argument_group("running")
    g.add_argument("--device", help="auto (the settings' default), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--seed", type=int, help="seed of every random step: synthesis, probes, fine-tune (default: "
                                            "the settings', 0 in the presets)")
    p.set_defaults(func=cmd_defend)


def _add_config(sub) -> None:
    from cc_core.defense.config import PRESET_NAMES

    p = sub.add_parser("config", help="print the settings a defense would run with")
    config_sub = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    p = config_sub.add_parser("show", help="the resolved settings (preset, --config, --set) as YAML or JSON")
    p.add_argument("--preset", choices=list(PRESET_NAMES), default="cpu", help="the preset to start from")
    _add_settings_args(p)
    p.add_argument("--seed", type=int, help="as defend's --seed")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=cmd_config_show)


def _add_scan(sub) -> None:
    p = sub.add_parser("scan", help="data-free backdoor risk report")
    _add_model_args(p)
    p.add_argument("--samples", type=int, default=256, help="synthetic images to scan on (default 256)")
    p.add_argument("--iterations", type=int, default=100, help="synthesis iterations (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesis and inversions")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="write the full report (with spectra) as JSON")
    p.add_argument("--no-warp-probe", action="store_true", help="skip the warp probe (~40 s on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fail-on", type=risk_threshold, metavar="RISK",
                   help="exit 1 when the risk score is >= RISK (0-1; the audit flags from 0.5), for CI gates")
    p.set_defaults(func=cmd_scan)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the paper's tables on this machine (cached, resumable rows)")
    p.add_argument("action", choices=["run", "render", "list"],
                   help="run rows (then render), render benchmarks/RESULTS.md, or list rows and their state")
    p.add_argument("--table", choices=["table2", "table4", "table5", "width"], help="one table's rows (default: all)")
    p.add_argument("--recipe", help="one model recipe's rows")
    p.add_argument("--attacks", nargs="+", help="these attacks' rows")
    p.add_argument("--defenses", nargs="+", choices=["none", "anp", "clp", "cc"], help="these defenses' rows")
    p.add_argument("--ratios", nargs="+", type=float, help="these compression ratios' rows")
    p.add_argument("--force", action="store_true", help="re-run rows whose results exist")
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    from cc_core.errors import InputError

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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

from cleancompact.pipeline_cli import merge_settings, parse_settings, risk_threshold

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


def _parse_attack_params(items: list[str]) -> dict:
    """``["s=1.0", "k=4"]`` -> ``{"s": 1.0, "k": 4}`` (values parsed as JSON, else kept as text)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _input_error(f"--attack-param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


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
                              params=_parse_attack_params(args.attack_param))
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
    from cc_core.pipeline import DISTILL_ALONE, defend, defend_baseline, export_package, resolve_config

    overrides: dict = {"ratio": args.ratio, "device": args.device, "threads": args.threads}
    if args.tau is not None:
        overrides["tau"] = args.tau
    if args.no_clip:
        overrides["tau"] = None
    if args.normalizer:
        overrides["normalizer"] = args.normalizer
    if args.rank_strategy:
        overrides["compact"] = {"rank_strategy": args.rank_strategy}
    if args.bn_match is not None:
        overrides["bn_match_samples"] = args.bn_match
    if args.no_bn_match:
        overrides["bn_match_samples"] = None
    if args.bn_match_scope:
        overrides["bn_match_scope"] = args.bn_match_scope
    if args.channel_u is not None:
        overrides["channel_u"] = args.channel_u
    if args.channel_mode:
        overrides["channel_mode"] = args.channel_mode
    if args.no_channel_clean:
        overrides["channel_u"] = None
    if args.trigger_clean_only is not None:
        overrides["clp_with_trigger"] = not args.trigger_clean_only
    if args.keep_target_synthetic:
        overrides["exclude_suspected_target"] = False
    if args.unlearn_scope:
        overrides["unlearn_scope"] = args.unlearn_scope
    if args.patch_unlearn:
        overrides["patch_unlearn"] = args.patch_unlearn
    if args.trigger_channel_u is not None:
        overrides["trigger_channel_u"] = args.trigger_channel_u
    if args.perturbation_channel_u is not None:
        overrides["perturbation_channel_u"] = args.perturbation_channel_u
    if args.kd_gate:
        overrides["kd_gate"] = args.kd_gate
    if args.teacher_finetune_lr is not None:
        overrides["teacher_finetune"] = {"lr": args.teacher_finetune_lr}
    if args.no_teacher_finetune:
        overrides["teacher_finetune"] = None
    if args.distill_epochs is not None and not args.distill_alone:
        raise _input_error("--distill-epochs sets the epochs of --distill-alone")
    if args.distill_alone:
        if args.distill_epochs is not None and args.distill_epochs < 1:
            raise _input_error(f"--distill-epochs must be >= 1, got {args.distill_epochs}")
        overrides["distill_finetune"] = DISTILL_ALONE | ({"epochs": args.distill_epochs} if args.distill_epochs else {})
    if args.distill_check is not None:
        overrides["distill_check"] = args.distill_check
    preset = resolve_config(args.preset)
    warp_probe = preset.warp_probe is not None if args.warp_probe is None else args.warp_probe
    if args.no_trigger_clean or (args.no_patch_probe and not warp_probe and args.no_blend_probe):
        overrides["trigger_channel_u"] = None
        if args.trigger_clean_only:
            raise _input_error("--trigger-clean-only zeroes a firing trigger's channels in place of CLP's: "
                               "it needs the trigger channel clean and a probe")
    if args.no_trigger_clean:
        overrides["perturbation_channel_u"] = None
    if args.no_patch_probe:
        overrides["patch_probe"] = None
    if args.warp_probe is not None:
        overrides["warp_probe"] = {} if args.warp_probe else None
    if args.no_blend_probe:
        overrides["blend_probe"] = None
    synth = {k: v for k, v in {"n_samples": args.synth_samples, "iterations": args.synth_iterations}.items() if v}
    weights = {k: v for k, v in {"bn_weight": args.synth_bn_weight, "tv_weight": args.synth_tv_weight}.items()
               if v is not None}
    if weights:  # the scan keeps images made at the preset's weights, which its thresholds were set on
        overrides["scan_synth"] = {k: getattr(preset.synth, k) for k in weights}
    synth |= weights
    if args.finetune_on_scan_synthetic:
        if "scan_synth" not in overrides and preset.scan_synth is None:
            raise _input_error("--finetune-on-scan-synthetic adds the scan's own images to the fine-tune: give the "
                               "fine-tune images of their own with --synth-bn-weight or --synth-tv-weight")
        overrides["finetune_on_scan_synthetic"] = True
    if args.competition_samples is not None:
        if args.competition_samples < 1:
            raise _input_error(f"--competition-samples must be >= 1, got {args.competition_samples}")
        if not args.competition_weight >= 0:
            raise _input_error(f"--competition-weight must be >= 0, got {args.competition_weight}")
        overrides["competition_synth"] = {"n_samples": args.competition_samples,
                                          "competition_weight": args.competition_weight}
    ft = {k: v for k, v in {"epochs": args.finetune_epochs, "adv_weight": args.adv_weight,
                            "unlearn_weight": args.unlearn_weight, "kd_weight": args.kd_weight,
                            "feature_weight": args.feature_weight, "mixup_alpha": args.mixup_alpha,
                            "ema_decay": args.ema_decay, "label_smoothing": args.label_smoothing,
                            "online_adv_weight": args.online_adv_weight, "online_adv_steps": args.online_adv_steps,
                            "online_adv_eps": None if args.online_adv_eps is None else args.online_adv_eps / 255}.items()
          if v is not None}
    if args.online_adv_untargeted:
        ft["online_adv_targeted"] = False
    for key in ("mask_left_out_class", "kd_mask_left_out_class"):
        if getattr(args, key) is not None:
            ft[key] = getattr(args, key)
    for flag, key in (("no_synth_loss", "synth_weight"), ("no_adv_loss", "adv_weight"),
                      ("no_unlearn", "unlearn_weight"), ("no_kd", "kd_weight")):
        if getattr(args, flag):
            ft[key] = 0.0
    overrides |= {"synth": synth, "finetune": ft}
    cfg = resolve_config(args.preset, **merge_settings(overrides, parse_settings(args.set or [])))
    model = _load(args)
    eval_data = load_dataset(args.eval_data, "test", args.data_dir) if args.eval_data else None
    attack = load_attack(args.attack) if args.attack else None
    if attack is not None and eval_data is None:
        raise _input_error("--attack needs --eval-data to measure ASR")
    if args.method == "cc":
        result = defend(model, config=cfg, eval_data=eval_data, attack=attack, progress=not args.quiet)
    else:
        clean = None
        if args.method == "anp":
            if not args.clean_data:
                raise _input_error("--method anp needs --clean-data (ANP is not data-free)")
            clean = _clean_subset(args)
        result = defend_baseline(model, args.method, args.ratio, eval_data, attack, clean,
                                 device=args.device, progress=not args.quiet)
    out = export_package(result, model, args.out, threads=args.threads or 2,
                         latency_batch=args.latency_batch)
    r = result.report
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


def _clean_subset(args: argparse.Namespace):
    """A seeded --clean-fraction of the clean data's train split (ANP's 1%)."""
    from cc_core.data import load_dataset

    if not 0 < args.clean_fraction <= 1:
        raise _input_error(f"--clean-fraction must be in (0, 1], got {args.clean_fraction}")
    return load_dataset(args.clean_data, "train", args.data_dir).sample(args.clean_fraction, args.seed)


def cmd_scan(args: argparse.Namespace) -> int:
    """Data-free backdoor risk report of a model."""
    from cc_core.adversarial import PGDConfig
    from cc_core.scan import WarpProbeConfig, scan
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
          f"patch {signals['patch']:.2f}, warp {signals.get('warp', 0.0):.2f}, adversarial {signals['adversarial']:.2f}), most likely target class {label}")
    print(f"outlier channels (Lipschitz z > {report['config']['inversion']['u']:g}): {inv['n_channel_outliers']}"
          + (f", max z {inv['max_channel_z']:.2f}; inverted-trigger class histogram: "
             + " ".join(str(c) for c in inv["histogram"]) if inv["histogram"] else ""))
    print(f"universal inverted trigger: flips {flip['flip_rate']:.0%} of the synthetic images, "
          f"{flip['mapping_consistency']:.0%} of them consistently by source class, "
          f"{flip['delta_pixels_changed']:.1%} of pixels changed by > 0.1")
    patch = report["patch"]
    if patch:
        from cc_core.scan import stamp_text

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

    parser = _Parser(prog="cleancompact", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cleancompact {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compact", help="clean + compact a model file (C&C steps 1-4)")
    _add_model_args(p)
    _add_compact_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer's decision")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("inspect", help="describe a model file")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train-backdoor", help="train a backdoored classifier (research, demos, benchmarks)")
    p.add_argument("--arch", required=True)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--attack", required=True,
                   help="badnet, blended, wanet, inputaware (suffix -a2a: all-to-all), or none")
    p.add_argument("--dataset", required=True, help="cifar10, cifar100, gtsrb")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-subset", type=int, help="train on a seeded random subset of N images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    p.add_argument("--target", type=int, default=0, help="all-to-one target class")
    p.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio")
    p.add_argument("--cross-ratio", type=float,
                   help="cross (noise-mode) samples per poisoned sample (default: the attack's own)")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, repeatable (e.g. wanet: s=1.0 k=4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--no-mixed-precision", action="store_true", help="fp32 instead of bf16 (CPU) / fp16 AMP (CUDA)")
    p.add_argument("--data-dir", help="dataset directory (default: $CC_DATA_DIR, else ~/.cache/cleancompact/data)")
    p.add_argument("--out", required=True, help="output directory (a checkpoint there is resumed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_backdoor)

    p = sub.add_parser("evaluate", help="ACC / ASR / RA of a model")
    _add_model_args(p)
    p.add_argument("--eval-data", required=True, help="dataset name (its test split) or an image folder")
    p.add_argument("--attack", help="attack spec: attack.json or the directory holding it")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("download", help="download and verify a public dataset")
    p.add_argument("dataset")
    p.add_argument("--data-dir")
    p.add_argument("--keep-archives", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("defend", help="remove a backdoor and compress, data-free (C&C)")
    _add_model_args(p)
    p.add_argument("--ratio", type=float, required=True, help="compression of the whole model (> 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, repeatable, applied last: a DefendConfig field, dotted for a section "
                        "(e.g. finetune.universal_weight=1); JSON values")
    p.add_argument("--tau", type=_positive_float, help="clip level of normalized singular values")
    p.add_argument("--no-clip", action="store_true", help="no singular-value clipping (ablation)")
    p.add_argument("--normalizer", choices=["max", "mean", "median", "rms", "none"])
    p.add_argument("--rank-strategy", choices=["uniform", "energy", "sensitivity"],
                   help="rank allocation across layers: one channel fraction, one kept-energy fraction, or "
                        "where the output change measured on synthetic images per parameter saved is smallest")
    bn_match = p.add_mutually_exclusive_group()
    bn_match.add_argument("--bn-match", type=int, metavar="N",
                          help="after compaction, move each BatchNorm's running statistics so the compact model's "
                               "normalized outputs on the first N synthetic images have the clipped full-rank model's "
                               "per-channel mean and std (presets: 512, after a probe's trigger fired; docs/PRESET.md)")
    bn_match.add_argument("--no-bn-match", action="store_true", help="no BatchNorm statistics matching")
    p.add_argument("--bn-match-scope", choices=("always", "trigger"),
                   help="match the BatchNorm statistics always, or only when a probe's trigger fired and its channels "
                        "were zeroed on the model matched to (presets: trigger)")
    p.add_argument("--channel-u", type=_positive_float,
                   help="clean channels whose Lipschitz bound exceeds mean + u*std of their layer (default 3)")
    p.add_argument("--channel-mode", choices=["zero", "shrink", "mean"],
                   help="zero those channels (CLP, the default), shrink their bound to the threshold, "
                        "or hold them at their mean output")
    p.add_argument("--no-channel-clean", action="store_true", help="no channel clean: the paper's C&C (ablation)")
    p.add_argument("--keep-target-synthetic", action="store_true",
                   help="fine-tune on every synthetic image, also those of the suspected target class (ablation)")
    p.add_argument("--mask-left-out-class", action=argparse.BooleanOptionalAction,
                   help="mask the left-out suspected class's logit out of the fine-tune's CE, so the fine-tune "
                        "does not push it down on every image (default: the preset's)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--method", choices=["cc", "clp", "anp"], default="cc",
                   help="cc: Clean & Compact; clp / anp: baselines pruned to the same parameter budget")
    p.add_argument("--clean-data", help="ANP only: dataset whose train split supplies clean samples")
    p.add_argument("--clean-fraction", type=float, default=0.01, help="ANP only: fraction of it (default 1%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synth-samples", type=int, help="number of synthetic images")
    p.add_argument("--synth-iterations", type=int, help="optimization steps per synthetic batch")
    p.add_argument("--synth-bn-weight", type=float,
                   help="synthesis weight of the BatchNorm-statistics term against the CE, for the fine-tune's images "
                        "(default: the preset's, 1); the scan and the trigger probes keep images of their own made at "
                        "the preset's weights")
    p.add_argument("--synth-tv-weight", type=float,
                   help="synthesis weight of the total-variation (smoothness) prior, for the fine-tune's images "
                        "(default: the preset's, 0.0001; 10 gives images as smooth as CIFAR-10's); the scan keeps its own")
    p.add_argument("--finetune-on-scan-synthetic", action="store_true",
                   help="fine-tune on the scan's images too (the suspected class left out of both sets): with "
                        "--synth-bn-weight 30 --synth-tv-weight 10 --bn-match 512, the setting that lowered the "
                        "zoo's mean ACC drop most without a teacher fine-tune (docs/MEASUREMENTS.md)")
    p.add_argument("--competition-samples", type=int,
                   help="after compaction, make this many more synthetic images that the compact model classifies "
                        "unlike the original (adaptive DeepInversion) and fine-tune on them too (experiment; "
                        "default: none)")
    p.add_argument("--competition-weight", type=float, default=1.0,
                   help="weight of that round's competition term (default 1; 0 makes plain images, the control)")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--no-synth-loss", action="store_true", help="fine-tune without the synthetic CE term")
    p.add_argument("--no-adv-loss", action="store_true", help="fine-tune without the adversarial term")
    p.add_argument("--adv-weight", type=float, help="weight of the adversarial term (cpu preset: 0, measured)")
    p.add_argument("--unlearn-weight", type=float,
                   help="weight of the unlearning term: the scan's inverted trigger on the synthetic images, trained "
                        "towards their benign labels (only when the scan finds one)")
    p.add_argument("--no-unlearn", action="store_true", help="fine-tune without the unlearning term")
    p.add_argument("--unlearn-scope", choices=("all-to-all", "any"),
                   help="unlearn the inverted trigger only when the scan calls it all-to-all (cpu preset), or whenever it fires")
    p.add_argument("--patch-unlearn", choices=("residual", "always", "never"),
                   help="unlearn the patch probe's firing stamp only when it still flips the compacted model "
                        "(cpu preset), whenever it fires, or never")
    p.add_argument("--no-patch-probe", action="store_true",
                   help="scan without the patch probe (and so, with --no-warp-probe and --no-blend-probe, "
                        "without the trigger channel clean)")
    p.add_argument("--warp-probe", action=argparse.BooleanOptionalAction,
                   help="also probe for a warp trigger when no stamp fires, and use its field as a stamp is used "
                        "(on in the presets; docs/PRESET.md)")
    p.add_argument("--no-blend-probe", action="store_true",
                   help="do not probe for a blend trigger (a pattern mixed in at opacity 0.2) when no stamp or warp "
                        "fires (on in the presets, ~40 s on 2 CPU cores; docs/PRESET.md)")
    p.add_argument("--trigger-channel-u", type=float,
                   help="zero the channels the probe's stamp excites above this per-layer z-score (cpu preset: 3)")
    p.add_argument("--perturbation-channel-u", type=float,
                   help="when no probe fires and the scan's universal inverted perturbation is all-to-all, zero the "
                        "channels it excites above this per-layer z-score (cpu preset: 4)")
    clp_with_trigger = p.add_mutually_exclusive_group()
    clp_with_trigger.add_argument("--trigger-clean-only", action="store_true", default=None,
                                  help="when a probe's trigger fires, zero only the channels it excites, not the "
                                       "channel clean's outlier channels as well (on in the presets; docs/PRESET.md)")
    clp_with_trigger.add_argument("--clp-with-trigger", dest="trigger_clean_only", action="store_false",
                                  help="zero the channel clean's outlier channels also when a probe's trigger fires")
    p.add_argument("--no-trigger-clean", action="store_true",
                   help="no trigger channel clean (neither a probe's trigger nor the all-to-all perturbation)")
    p.add_argument("--no-kd", action="store_true", help="fine-tune without distillation")
    p.add_argument("--kd-weight", type=float,
                   help="weight of logit distillation from the clipped full-rank model (presets: 1, behind --kd-gate)")
    p.add_argument("--kd-gate", choices=("always", "verified"),
                   help="distill from the teacher always, or as is only when the probes' trigger is verified gone "
                        "from it (else not used, or fine-tuned first with --teacher-finetune-lr; presets: verified)")
    p.add_argument("--teacher-finetune-lr", type=float,
                   help="fine-tune a teacher the gate does not verify at this learning rate, with the student's "
                        "recipe, before distilling from it (off in the presets: at 0.0002 it helps WaNet but hands Blended's "
                        "and GTSRB Input-Aware's backdoor back; at 0.001, with --distill-alone, docs/MEASUREMENTS.md)")
    p.add_argument("--no-teacher-finetune", action="store_true",
                   help="never fine-tune the teacher (the presets' default): under --kd-gate verified an unverified "
                        "teacher is not used")
    p.add_argument("--distill-alone", action="store_true",
                   help="a student that distills learns its teacher's soft labels alone (no synthetic CE), on mixup "
                        "images, for 30 epochs, its gradients clipped to norm 1 (off in the presets)")
    p.add_argument("--distill-epochs", type=int, help="the epochs of --distill-alone (default 30)")
    p.add_argument("--distill-check", action=argparse.BooleanOptionalAction,
                   help="with a teacher the gate does not verify, fine-tune the student with and without "
                        "distillation and keep the distilled one only if the universal inversion flips at most "
                        "10 points more of the synthetic images on it (default: the preset's, off)")
    p.add_argument("--kd-mask-left-out-class", action=argparse.BooleanOptionalAction,
                   help="leave the left-out suspected class's logit out of the distillation, so a teacher that "
                        "still carries the backdoor cannot hold its target class up (default: the preset's)")
    p.add_argument("--feature-weight", type=float,
                   help="weight of BatchNorm-output (feature) distillation from the teacher; 0 turns it off")
    p.add_argument("--mixup-alpha", type=float,
                   help="fine-tune the synthetic CE and the distillation on mixup images, Beta(a, a) weights; "
                        "0 turns it off (default: the preset's)")
    p.add_argument("--ema-decay", type=float,
                   help="end the fine-tune on the moving average of the student's weights with this decay, "
                        "in [0, 1); 0 turns it off (default: the preset's)")
    p.add_argument("--label-smoothing", type=float,
                   help="smooth the fine-tune's CE targets by this much, in [0, 1), so a left-out class keeps "
                        "a small target on every image (default: the preset's, 0)")
    p.add_argument("--online-adv-weight", type=float,
                   help="weight of the online adversarial term: each fine-tune batch, PGD against the student as it "
                        "trains (towards the left-out suspected class), fit to the images' own labels; 0 turns it "
                        "off (default: the preset's, 0)")
    p.add_argument("--online-adv-eps", type=float,
                   help="the online PGD's L-inf radius, in pixel levels out of 255 (default 8)")
    p.add_argument("--online-adv-steps", type=int, help="the online PGD's steps per batch (default 5)")
    p.add_argument("--online-adv-untargeted", action="store_true",
                   help="untargeted online PGD (away from each image's label) instead of towards the left-out class")
    p.add_argument("--eval-data", help="dataset name or image folder, to MEASURE ACC/ASR (not used by the defense)")
    p.add_argument("--attack", help="attack spec (attack.json or its directory), to measure ASR/RA")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--latency-batch", type=int, default=128)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser("scan", help="data-free backdoor risk report")
    _add_model_args(p)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the full report (with spectra) as JSON")
    p.add_argument("--no-warp-probe", action="store_true", help="skip the warp probe (~40 s on 2 CPU cores)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--fail-on", type=risk_threshold, metavar="RISK",
                   help="exit 1 when the risk score is >= RISK (0-1; the audit flags from 0.5), for CI gates")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("bench", help="the paper's tables on this machine (cached, resumable rows)")
    p.add_argument("action", choices=["run", "render", "list"],
                   help="run rows (then render), render benchmarks/RESULTS.md, or list rows and their state")
    p.add_argument("--table", choices=["table2", "table4", "table5", "width"])
    p.add_argument("--recipe")
    p.add_argument("--attacks", nargs="+")
    p.add_argument("--defenses", nargs="+", choices=["none", "anp", "clp", "cc"])
    p.add_argument("--ratios", nargs="+", type=float)
    p.add_argument("--force", action="store_true", help="re-run rows whose results exist")
    p.set_defaults(func=cmd_bench)

    from cleancompact.pipeline_cli import add_commands

    add_commands(sub)
    return parser


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

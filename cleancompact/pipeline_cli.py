"""CLI commands of the operated pipeline: run, audit, register, demo, watch, webhook, up."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEMO_MODEL = "demo-suspect"
# The demo's suspect (quarter-width ResNet-18, BadNet to class 4), trained with DEMO_RECIPE by
# `cleancompact train-backdoor` and shipped with the package (no defense setting was tuned on it:
# the tuning zoo's BadNet models have other seeds and target class 0); where it is missing it is
# trained once and cached (docs/MEASUREMENTS.md has the time).
DEMO_RECIPE = {"arch": "resnet18", "width": 0.25, "attack": "badnet", "epochs": 20, "batch_size": 256,
               "lr": 0.2, "target": 4, "seed": 2}
SHIPPED_DEMO_MODEL = Path(__file__).with_name("demo_model")


def key_values(items: list[str], what: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: values are JSON where they parse, else text; a later
    item wins. An item without ``=`` or without a key is an InputError naming the option ``what``."""
    from cc_core.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{what} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_settings(items: list[str]) -> dict:
    """``--set`` values -> nested config overrides: ``finetune.epochs=5`` -> {"finetune": {"epochs": 5}};
    values as key_values parses them."""
    from cc_core.errors import InputError

    out: dict = {}
    for key, value in key_values(items, "--set").items():
        path = key.split(".")
        if not all(path):
            raise InputError(f"--set expects KEY=VALUE with KEY a config field (dotted for a section, "
                             f"e.g. finetune.epochs=5), got {key!r}")
        node = out
        for part in path[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise InputError(f"--set {key!r}: {part} was set to a value before, not a section")
            node = node[part]
        node[path[-1]] = value
    return out


def merge_settings(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, sections merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge_settings(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _flow_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_settings(args.set or [])
    if args.tau is not None:
        overrides["tau"] = args.tau
    return overrides


def _print_result(result: dict) -> None:
    r = result.get("report")
    if r:
        m, o = r["metrics"], r["onnx"]
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        rows = [("parameters", f"{r['model']['params_before']:,}", f"{r['model']['params_after']:,}"),
                ("ACC %", pct(m["acc_before"]), pct(m["acc_after"])),
                ("ASR %", pct(m["asr_before"]), pct(m["asr_after"])),
                ("scan concentration", f"{r['scan']['concentration_before'] or 0:.2f}",
                 f"{r['scan']['concentration_after'] or 0:.2f}"),
                (f"onnxruntime ms (batch {o['latency_batch']})", f"{o['latency_ms']['original']:.2f}",
                 f"{o['latency_ms']['compact']:.2f}")]
        width = max(len(a) for a, _, _ in rows)
        print(f"{'':{width}}  {'before':>12}  {'after':>12}")
        for a, b, c in rows:
            print(f"{a:{width}}  {b:>12}  {c:>12}")
        print(f"onnxruntime speed-up {o['speedup']:.2f}x; time "
              + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings_s"].items() if v is not None))
        for name, g in (result.get("gates") or {}).items():
            print(f"  gate {name:14} {g['status']:8} value {g['value']} limit {g['limit']}")
    reg = result.get("registered") or {}
    print(f"status: {result['status']}; registered models:/{reg.get('name')}/{reg.get('version')}")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the clean_compact flow on one source (registry URI or file)."""
    _quiet_prefect()
    from flows.clean_compact import clean_compact_flow

    result = clean_compact_flow(args.source, ratio=args.ratio, preset=args.preset, overrides=_flow_overrides(args),
                                gates=key_values(args.gate or [], "--gate"), eval_data=args.eval_data,
                                data_dir=args.data_dir, attack=args.attack, registered_name=args.name,
                                tracking_uri=args.tracking_uri, arch=args.arch, num_classes=args.num_classes)
    _print_result(result)
    return EXIT_GATE_FAILED if result["status"] == "rejected" else EXIT_OK


def risk_threshold(text: str) -> float:
    """A risk threshold in [0, 1] from the command line (argparse type: a bad one exits 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def cmd_audit(args: argparse.Namespace) -> int:
    _quiet_prefect()
    from flows.audit import audit_flow

    rows = audit_flow(policy=args.policy, max_age_hours=args.max_age_hours, flag_risk=args.flag,
                      names=args.names, ratio=args.ratio, preset=args.preset, tracking_uri=args.tracking_uri,
                      gates=key_values(args.gate or [], "--gate"), limit=args.limit)
    failing = [r for r in rows if args.fail_on is not None and r["risk"] >= args.fail_on]
    if args.json:
        print(json.dumps({"versions": rows, "failing": [f"models:/{r['name']}/{r['version']}" for r in failing]},
                         indent=2, default=str))
        return EXIT_GATE_FAILED if failing else EXIT_OK
    for r in rows:
        print(f"models:/{r['name']}/{r['version']}: risk {r['risk']:.2f}, target {r['target']}, "
              f"{r['verdict']}" + (f", cleaned: {r['clean_status']}" if "clean_status" in r else ""))
    if not rows:
        print("nothing due for audit")
    if failing:
        print(f"{len(failing)} version(s) at risk >= --fail-on {args.fail_on:g}: exit {EXIT_GATE_FAILED}")
    return EXIT_GATE_FAILED if failing else EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    from tasks.registry import register_suspect
    from tasks.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    version = register_suspect(uri, args.name, args.model, args.attack)
    print(f"registered models:/{args.name}/{version} ({uri})")
    return EXIT_OK


def _demo_model(data_dir: str | None) -> Path:
    """The shipped demo model, else the demo model trained with DEMO_RECIPE (once, then cached)."""
    from tasks.tracking import cc_home

    if (SHIPPED_DEMO_MODEL / "model.safetensors").exists():
        print(f"[demo] the suspect: the shipped demo model {SHIPPED_DEMO_MODEL}")
        return SHIPPED_DEMO_MODEL
    r = DEMO_RECIPE
    out = cc_home() / "demo" / f"cifar10-resnet18-w0.25-badnet-t{r['target']}-{r['epochs']}ep-s{r['seed']}"
    if not (out / "metrics.json").exists():
        import subprocess

        print(f"[demo] no cached backdoored model: training one ({r['epochs']} epochs, "
              f"15-45 min on 2 cores) -> {out}")
        argv = ["train-backdoor", "--arch", r["arch"], "--width", str(r["width"]), "--attack", r["attack"],
                "--dataset", "cifar10", "--epochs", str(r["epochs"]), "--batch-size", str(r["batch_size"]),
                "--lr", str(r["lr"]), "--target", str(r["target"]), "--seed", str(r["seed"]), "--threads", "2", "--out", str(out)]
        if data_dir:
            argv += ["--data-dir", data_dir]
        code = subprocess.run([sys.executable, "-m", "cleancompact", *argv]).returncode  # the same command, its own process
        if code:
            raise SystemExit(code)
    return out


def _demo_attack(model_dir: Path) -> str:
    """'badnet, target class N' (or 'badnet-a2a, all-to-all') for the demo model in ``model_dir``."""
    from cc_core.attacks import load_attack

    attack = load_attack(model_dir)
    return f"{attack.label}, all-to-all" if attack.all_to_all else f"{attack.label}, target class {attack.target}"


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the embedded default (SQLite MLflow, Prefect's local server)."""
    _quiet_prefect()
    from cc_core.data import ensure_dataset
    from tasks.registry import register_suspect
    from tasks.tracking import default_tracking_uri

    start = time.perf_counter()
    ensure_dataset("cifar10", "test", args.data_dir)  # downloaded into the cache where missing
    model_dir = _demo_model(args.data_dir)
    about = _demo_attack(model_dir)
    print(f"[demo] its backdoor: {about}")
    uri = default_tracking_uri()
    version = register_suspect(uri, DEMO_MODEL, model_dir / "model.safetensors", model_dir,
                               description=f"backdoored demo model ({about})")
    source = f"models:/{DEMO_MODEL}/{version}"
    print(f"[demo] registered the suspect as {source} in {uri}")
    from flows.clean_compact import clean_compact_flow

    from cc_core.defense.config import resolve_config, seed_settings

    overrides = seed_settings(resolve_config("cpu"), args.seed)
    overrides["synth"] |= {"n_samples": args.synth_samples, "iterations": args.synth_iterations}
    result = clean_compact_flow(source, ratio=args.ratio, preset="cpu", overrides=overrides,
                                eval_data="cifar10", data_dir=args.data_dir, tracking_uri=uri)
    _print_result(result)
    db = uri.removeprefix("sqlite:///")
    print(f"[demo] done in {(time.perf_counter() - start) / 60:.1f} min. Open the MLflow UI with:\n"
          f"  {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {uri} --port 5000\n"
          f"and browse to http://127.0.0.1:5000 (experiment 'cleancompact', model '{DEMO_MODEL}-cc'); "
          f"database {db}")
    return EXIT_GATE_FAILED if result["status"] == "rejected" else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from deploy.watcher import main
    from tasks.tracking import cc_home, default_tracking_uri

    state = args.state_file or str(cc_home() / "watcher-state.json")
    return main(args.tracking_uri or default_tracking_uri(), state, args.interval, args.announce_existing)


def cmd_webhook(args: argparse.Namespace) -> int:
    from deploy.webhook import main

    secret = args.secret or os.environ.get("CC_WEBHOOK_SECRET")
    if not secret:
        from cc_core.errors import InputError

        raise InputError("a webhook secret is required: --secret or $CC_WEBHOOK_SECRET (the one given to MLflow)")
    return main(args.host, args.port, secret, args.tracking_uri)


def cmd_up(args: argparse.Namespace) -> int:
    """Start mlflow server, prefect server, work pool + deployments, worker and a bridge; run
    until interrupted, then stop everything."""
    import signal
    import threading

    from deploy.local import LocalStack
    from tasks.tracking import cc_home

    stack = LocalStack(Path(args.home) if args.home else cc_home() / "stack", bridge=args.bridge,
                       mlflow_port=args.mlflow_port, prefect_port=args.prefect_port)
    print(f"[up] starting (logs in {stack.home / 'logs'}) ...")
    stack.start()
    print(f"[up] MLflow  {stack.mlflow_uri}\n[up] Prefect {stack.prefect_api.removesuffix('/api')}\n"
          f"[up] bridge  {args.bridge}; register a model with:\n"
          f"  cleancompact register MODEL.safetensors --name NAME --tracking-uri {stack.mlflow_uri}\n"
          "[up] Ctrl-C stops every process")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(2):
            dead = [name for name, ok in stack.alive().items() if not ok]
            if dead:
                print(f"[up] process exited: {', '.join(dead)} (see its log); stopping", file=sys.stderr)
                return 3
    finally:
        stack.stop()
        print("[up] stopped")
    return EXIT_OK


def add_commands(sub) -> None:
    from cc_core.defense.config import PRESETS

    def tracking(p):
        p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, "
                                              "else SQLite under $CC_HOME, ~/.cache/cleancompact)")

    p = sub.add_parser("run", help="run the clean-compact flow on one model (registry URI or file)")
    p.add_argument("source", help="models:/NAME/VERSION, models:/NAME@ALIAS, or a model file")
    p.add_argument("--ratio", type=float, default=2.0, help="compression of the model's parameters (default 2)")
    p.add_argument("--tau", type=float, help="the clean step's clipping threshold (default: the preset's)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="the defense's settings (default cpu)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, repeatable: a DefendConfig field, dotted for a section "
                        "(e.g. finetune.epochs=5); JSON values")
    p.add_argument("--gate", action="append", metavar="NAME=LIMIT",
                   help="gate limit, e.g. max_acc_drop=0.03, min_speedup=null to disable")
    p.add_argument("--eval-data", help="dataset name or image folder, to measure ACC (and ASR with an attack)")
    p.add_argument("--attack", help="attack spec (attack.json or its directory), to measure ASR")
    p.add_argument("--data-dir", help="dataset directory (default: $CC_DATA_DIR, else ~/.cache/cleancompact/data)")
    p.add_argument("--name", help="registered name of the cleaned model (default: <source>-cc)")
    p.add_argument("--arch", help="architecture, where the model file does not say it")
    p.add_argument("--num-classes", type=int, help="number of classes, where the model file does not say it")
    tracking(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("audit", help="scan registered model versions that are due; clean by policy")
    p.add_argument("--policy", choices=["scan-only", "clean-flagged", "clean-all"], default="clean-flagged",
                   help="scan only, clean the versions the scan flags (default), or clean every audited version")
    p.add_argument("--max-age-hours", type=float, default=168.0,
                   help="a version is due when its last audit is older than this (default 168: a week)")
    p.add_argument("--flag", type=float, default=0.5, help="scan risk score at which a version is flagged")
    p.add_argument("--names", nargs="+", help="only these registered models")
    p.add_argument("--ratio", type=float, default=2.0, help="compression of a cleaned version (default 2)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="the defense's settings (default cpu)")
    p.add_argument("--gate", action="append", metavar="NAME=LIMIT", help="gate limit of a clean, as run's --gate")
    p.add_argument("--limit", type=int, help="audit at most this many due versions")
    p.add_argument("--fail-on", type=risk_threshold, metavar="RISK",
                   help="exit 1 when any audited version's risk is >= RISK (0-1), for CI gates")
    p.add_argument("--json", action="store_true", help="print the audited versions as JSON")
    tracking(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("register", help="register a model file as a new version of NAME")
    p.add_argument("model", help="model file (.safetensors) to register")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--attack", help="directory with attack.json to store beside it (lets flows measure ASR)")
    tracking(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("demo", help="the main job end to end on the embedded default (SQLite MLflow, local Prefect)")
    p.add_argument("--ratio", type=float, default=2.0, help="compression (default 2)")
    p.add_argument("--synth-samples", type=int, default=512, help="synthetic images the defense makes (default 512)")
    p.add_argument("--synth-iterations", type=int, default=100, help="their synthesis iterations (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random step of the defense (default 0)")
    p.add_argument("--data-dir", help="dataset directory (default: $CC_DATA_DIR, else ~/.cache/cleancompact/data)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("watch", help="poll the MLflow registry and emit a Prefect event per new version")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--state-file", help="where the versions already announced are kept "
                                         "(default: $CC_HOME/watcher-state.json)")
    p.add_argument("--announce-existing", action="store_true", help="also announce versions present at first start")
    tracking(p)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("webhook", help="receive MLflow webhooks (HMAC-verified) and emit Prefect events")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.add_argument("--secret", help="shared secret (default: $CC_WEBHOOK_SECRET)")
    tracking(p)
    p.set_defaults(func=cmd_webhook)

    p = sub.add_parser("up", help="start MLflow, Prefect, worker, deployments and a bridge locally")
    p.add_argument("--bridge", choices=["watcher", "webhook"], default="watcher",
                   help="how registrations reach Prefect: poll the registry (default) or receive MLflow webhooks")
    p.add_argument("--home", help="state directory (default: $CC_HOME/stack)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)")
    p.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default 4200)")
    p.set_defaults(func=cmd_up)

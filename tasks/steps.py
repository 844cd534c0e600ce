"""One Prefect task per C&C step. Each wraps a cc_core function, logs to the flow's MLflow run
and passes files, not objects: models as ``.safetensors`` (rebuilt without executing anything),
tensors as ``.safetensors``, records as JSON, all under the run's work directory.

Resume: a step's outputs and metrics are recorded in ``<work>/steps/<step>-<key>.json`` once the
step has finished, where ``key`` hashes the step's inputs. The work directory itself is keyed by
the source model's sha256 and the resolved config, so a re-run of the same source and config
(after a crash, a failed gate, a killed worker) skips finished steps and re-logs their results
into the new run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cc_core.fileio import atomic_path, code_version
from tasks.tracking import RunHandle, log_artifact, log_json, log_metrics, log_params, mlflow_globals

def _transient(task, task_run, state) -> bool:
    """Retry only what may succeed next time: not bad input (a missing model, a wrong URI)."""
    from cc_core.errors import InputError

    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result itself could not be read: be conservative and retry
        return True
    return not isinstance(error, InputError)


# Resume is by the step records below, not Prefect's result cache (it would pickle models).
MLFLOW_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": _transient,
                  "cache_policy": NO_CACHE}
COMPUTE = {"cache_policy": NO_CACHE}
ONNX_PIP_REQUIREMENTS = ["onnx==1.23.2", "onnxruntime==1.32.0"]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _cached(run: RunHandle, step: str, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()`` unless this step already finished with the same inputs; either way the
    returned dict is what the step recorded (plus ``"cached": bool``)."""
    marker = run.path / "steps" / f"{step}-{digest(key)[:12]}.json"
    if marker.exists():
        out = json.loads(marker.read_text())
        if all(Path(p).exists() for p in out.get("files", {}).values()):
            get_run_logger().info(f"{step}: finished earlier, reusing {marker.parent}")
            return out | {"cached": True}
    start = time.perf_counter()
    out = compute()
    out.setdefault("seconds", time.perf_counter() - start)
    with atomic_path(marker) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1, default=str))
    return out | {"cached": False}


def _save_tensors(path: Path, **tensors) -> str:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    return str(path)


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _second_file(file: str | None, first: str | None) -> str | None:
    """``file`` when it names a second set of images, else None (it is absent or ``first`` itself).
    A step keys its cache on the second set only when there is one, so one-set runs keep the keys
    their finished steps were stored under."""
    return file if file not in (None, first) else None


def _load(path: str):
    from cc_core.io import load_model

    return load_model(path)


def _device(cfg):
    from cc_core.device import resolve_device

    return resolve_device(cfg.device)


@task(name="fetch-source", **MLFLOW_RETRIES)
def fetch_source(tracking_uri: str, source_uri: str, dest: str) -> dict:
    """Download (registry URI) or locate (path) the suspect model; nothing is loaded here."""
    from tasks.registry import resolve_source

    source = resolve_source(tracking_uri, source_uri, Path(dest))
    get_run_logger().info(f"source {source.uri}: {source.model_file} (sha256 {source.sha256[:12]})")
    return source.to_dict()


@task(name="load", **COMPUTE)
def load_task(run: RunHandle, source: dict, arch: str | None = None, num_classes: int | None = None,
              allow_pickle: bool = False) -> dict:
    """Load the suspect safely and store it as the run's ``original.safetensors``."""
    from cc_core.io import load_model, save_model
    from cc_core.models import count_params

    def compute() -> dict:
        model = load_model(source["model_file"], arch, num_classes, allow_pickle=allow_pickle)
        path = run.path / "original.safetensors"
        save_model(model, path)
        return {"files": {"model": str(path)}, "spec": model.cc_spec.to_dict(),
                "params": count_params(model)}

    out = _cached(run, "load", {"sha256": source["sha256"], "arch": arch, "num_classes": num_classes}, compute)
    spec = out["spec"]
    log_params(run, {"uri": source["uri"], "sha256": source["sha256"]}, "source.")
    log_params(run, {"arch": spec["arch"], "width": spec.get("width"), "num_classes": spec["num_classes"],
                     "input_shape": spec["input_shape"]}, "model.")
    log_metrics(run, {"params_before": out["params"]}, "model.")
    get_run_logger().info(f"loaded {spec['arch']} ({out['params']:,} parameters)")
    return out


@task(name="scan", **COMPUTE)
def scan_task(run: RunHandle, model_file: str, synth_cfg: dict, pgd_cfg: dict, inversion_cfg: dict,
              device: str = "auto", warp_cfg: dict | None = None, patch_cfg: dict | None = None) -> dict:
    """Data-free risk report of the suspect: risk score, adversarial histogram, inversion, patch
    probe (only with ``patch_cfg``), warp probe (only with ``warp_cfg``), spectra."""
    from cc_core.adversarial import PGDConfig
    from cc_core.probes import PatchProbeConfig, WarpProbeConfig
    from cc_core.scan import InversionConfig, scan
    from cc_core.synth import SynthConfig

    def compute() -> dict:
        report = scan(_load(model_file), SynthConfig(**synth_cfg), PGDConfig(**pgd_cfg), device=device,
                      progress=False, inversion_cfg=InversionConfig(**inversion_cfg),
                      warp_cfg=WarpProbeConfig(**warp_cfg) if warp_cfg is not None else None,
                      patch_cfg=PatchProbeConfig(**patch_cfg) if patch_cfg is not None else None)
        path = run.path / "scan.json"
        path.write_text(json.dumps(report, indent=1))
        return {"files": {"scan": str(path)},
                "summary": {k: report[k] for k in ("risk", "concentration", "anomaly_index", "target_class_estimate",
                                                   "all_to_all_suspected")}
                | {k: report["inversion"][k] for k in ("n_channel_outliers", "max_channel_z")}
                | {f"flip_{k}": report["flip"][k] for k in ("flip_rate", "mapping_consistency")}
                | ({"patch_flip_rate": report["patch"]["flip_rate"]} if report["patch"] else {})
                | ({"warp_flip_rate": report["warp"]["flip_rate"]} if report.get("warp") else {})
                | {f"risk_{k}": v for k, v in report["risk_signals"].items()}}

    out = _cached(run, "scan", {"model": model_file, "synth": synth_cfg, "pgd": pgd_cfg, "inversion": inversion_cfg,
                                "warp": warp_cfg, "patch": patch_cfg}, compute)
    log_metrics(run, out["summary"] | {"seconds": out["seconds"]}, "scan.")
    log_artifact(run, out["files"]["scan"], "scan")
    s = out["summary"]
    target = f"{s['target_class_estimate']}" + (" (all-to-all suspected)" if s["all_to_all_suspected"] else "")
    patch = f", best patch stamp flips {s['patch_flip_rate']:.0%}" if "patch_flip_rate" in s else ""
    patch += f", best warp flips {s['warp_flip_rate']:.0%}" if "warp_flip_rate" in s else ""
    get_run_logger().info(f"scan: risk {s['risk']:.2f} ({s['n_channel_outliers']} outlier channels, inverted trigger "
                          f"flips {s['flip_flip_rate']:.0%}{patch}), adversarial concentration {s['concentration']:.2f}, "
                          f"estimated target class {target}")
    return out


@task(name="clean-compact", **COMPUTE)
def compact_task(run: RunHandle, model_file: str, cfg, synthetic_file: str | None = None,
                 trigger: dict | None = None, scan_file: str | None = None) -> dict:
    """Channel clean, Tucker-2 decomposition, clipping (clean), rank pruning (compact); plus the
    clipped full-rank model the fine-tune may distill from (distillation_gate_task decides).
    ``synthetic_file``: the fine-tune's synthetic images, on which the sensitivity rank strategy
    measures the layers (its first ``cfg.calibration_samples``) and the BatchNorm matching runs.
    ``scan_file``: the scan's images (default: the same), on which the trigger channel clean measures
    ``trigger``, the probes' firing trigger or an all-to-all universal perturbation
    (trigger_probe_task's "channel_trigger")."""
    from cc_core.compact import clean_compact
    from cc_core.io import save_model
    from cc_core.defense.cleaning import bn_match_text, channel_clean, channel_clean_text, distillation_teacher, match_compact_bn

    scan_file = _second_file(scan_file, synthetic_file)

    def compute() -> dict:
        original = _load(model_file)
        start = time.perf_counter()
        x = _load_tensors(synthetic_file)["x"] if synthetic_file is not None else None
        x_scan = _load_tensors(scan_file)["x"] if scan_file is not None else x
        cleaned, channel_info = channel_clean(original, cfg, x_scan if trigger else None, trigger)
        channel_seconds = time.perf_counter() - start
        calibration = x[:cfg.calibration_samples] if x is not None and cfg.needs_calibration else None
        new, plan = clean_compact(cleaned, ratio=cfg.ratio, tau=cfg.tau, normalizer=cfg.normalizer,
                                  calibration=calibration, **cfg.compact)
        teacher = distillation_teacher(cleaned, cfg)
        start = time.perf_counter()
        bn_match = match_compact_bn(new, cleaned, cfg, x, teacher, trigger)
        bn_match_seconds = time.perf_counter() - start
        files = {"compact": str(run.path / "compact.safetensors"), "plan": str(run.path / "plan.json")}
        save_model(new, files["compact"], plan=plan)
        Path(files["plan"]).write_text(plan.to_json(indent=1))
        if teacher is not None:
            files["teacher"] = str(run.path / "teacher.safetensors")
            save_model(teacher, files["teacher"])
        timings = {"channel_clean": channel_seconds} | {k: plan.timings_s[k] for k in ("decompose", "clean", "compact")}
        if bn_match is not None:
            timings["bn_match"] = bn_match_seconds
        return {"files": files, "timings": timings, "channel_clean": channel_info, "bn_match": bn_match,
                "params_after": plan.params_after, "ratio_achieved": plan.ratio_achieved,
                "compact_resolved": plan.config}

    out = _cached(run, "compact", {"model": model_file, "ratio": cfg.ratio, "tau": cfg.tau,
                                   "normalizer": cfg.normalizer, "compact": cfg.compact,
                                   "channel_u": cfg.channel_u, "teacher": cfg.finetune.needs_teacher,
                                   "trigger_channel_u": cfg.trigger_channel_u, "trigger": trigger}
                  | ({"perturbation_channel_u": cfg.perturbation_channel_u} if cfg.perturbation_channel_u else {})
                  | ({"bn_match_samples": cfg.bn_match_samples} if cfg.bn_match_samples else {})
                  | ({"bn_match_scope": cfg.bn_match_scope} if cfg.bn_match_scope != "always" else {})
                  | ({"clp_with_trigger": False} if not cfg.clp_with_trigger else {})
                  | ({"synthetic": synthetic_file, "calibration_samples": cfg.calibration_samples}
                     if synthetic_file else {})
                  | ({"scan_synthetic": scan_file} if scan_file else {}), compute)
    log_metrics(run, {"params_after": out["params_after"], "ratio_achieved": out["ratio_achieved"]}, "model.")
    trigger_info = out["channel_clean"]["trigger"]
    log_metrics(run, {"channels_zeroed": out["channel_clean"]["n_pruned"], "trigger_channels_zeroed": trigger_info["n_pruned"]},
                "clean.")
    log_metrics(run, out["timings"], "time.")
    log_artifact(run, out["files"]["plan"], "compact")
    get_run_logger().info(f"clean+compact: {channel_clean_text(out['channel_clean'])}, {out['params_after']:,} parameters "
                          f"({out['ratio_achieved']:.2f}x)")
    if out.get("bn_match"):
        get_run_logger().info(bn_match_text(out["bn_match"]))
    return out


@task(name="synthesize", **COMPUTE)
def synthesize_task(run: RunHandle, model_file: str, cfg, scan: bool = False) -> dict:
    """BatchNorm-statistics synthetic images (no real data) from ``model_file``: the fine-tune's
    (``cfg.synth``), or with ``scan`` the scan's own (``cfg.scan_synth_config``, which must be set;
    step, file and metrics ``synthesize_scan``, ``scan_synthetic.safetensors``, ``synth_scan.*``)."""
    from cc_core.synth import synthesize

    synth = cfg.scan_synth_config if scan else cfg.synth
    if synth is None:
        raise ValueError("synthesize_task(scan=True) needs cfg.scan_synth_config")
    step = "synthesize_scan" if scan else "synthesize"

    def compute() -> dict:
        x, y, log = synthesize(_load(model_file), synth, device=_device(cfg), progress=False)
        path = run.path / ("scan_synthetic.safetensors" if scan else "synthetic.safetensors")
        return {"files": {"synthetic": _save_tensors(path, x=x, y=y)},
                "bn_loss": log["bn_loss"][-1], "ce_loss": log["ce_loss"][-1], "n": len(y)}

    out = _cached(run, step, {"model": model_file, "synth": synth.to_dict()}, compute)
    log_metrics(run, {"bn_loss": out["bn_loss"], "ce_loss": out["ce_loss"], "n": out["n"]},
                "synth_scan." if scan else "synth.")
    log_metrics(run, {step: out["seconds"]}, "time.")
    get_run_logger().info(f"synthesized {out['n']} {'scan ' if scan else ''}images in {out['seconds']:.1f} s "
                          f"(BN loss {out['bn_loss']:.3f})")
    return out


@task(name="join-synthetic", **COMPUTE)
def join_synthetic_task(run: RunHandle, synthetic_file: str, scan_file: str) -> dict:
    """The fine-tune's images followed by the scan's (``DefendConfig.finetune_on_scan_synthetic``), in
    one file; leaving a class out of it leaves it out of both, in the order cc_core.defend uses."""
    def compute() -> dict:
        import torch

        a, b = _load_tensors(synthetic_file), _load_tensors(scan_file)
        x, y = torch.cat([a["x"], b["x"]]), torch.cat([a["y"], b["y"]])
        return {"files": {"synthetic": _save_tensors(run.path / "finetune_synthetic.safetensors", x=x, y=y)},
                "n": len(y)}

    out = _cached(run, "join_synthetic", {"synthetic": synthetic_file, "scan": scan_file}, compute)
    get_run_logger().info(f"fine-tune on both sets of synthetic images: {out['n']} images")
    return out


@task(name="trigger-probe", **COMPUTE)
def trigger_probe_task(run: RunHandle, model_file: str, synthetic_file: str, cfg) -> dict:
    """The trigger probes (cc_core.defense.suspect.probe_triggers: the patch probe, then the warp probe when
    no stamp fires, then the blend probe when neither fires, then the mask probe when none fires) on the suspect and the fine-tune's
    synthetic images: {"patch", "warp", "blend", "mask": their reports (None when off or not run),
    "trigger": the one that fires (None when none), "universal": the scan's universal inversion when
    none fires and the perturbation channel clean is on, "channel_trigger": what the trigger channel
    clean cleans by}."""
    from cc_core.defense.suspect import probe_text, probe_triggers
    from cc_core.probes import BLEND_THRESHOLD, MASK_THRESHOLD, PULL_SPECIFICITY

    def compute() -> dict:
        x = _load_tensors(synthetic_file)["x"].to(_device(cfg))
        return probe_triggers(_load(model_file).to(_device(cfg)), x, cfg)

    out = _cached(run, "trigger_probe", {"model": model_file, "synthetic": synthetic_file,
                                         "patch_probe": cfg.patch_probe.to_dict() if cfg.patch_probe else None,
                                         "warp_probe": cfg.warp_probe.to_dict() if cfg.warp_probe else None,
                                         "blend_probe": cfg.blend_probe.to_dict() if cfg.blend_probe else None,
                                         "mask_probe": cfg.mask_probe.to_dict() if cfg.mask_probe else None,
                                         "pull_fires": [BLEND_THRESHOLD, MASK_THRESHOLD, PULL_SPECIFICITY]}
                  | ({"perturbation_channel_u": cfg.perturbation_channel_u, "inversion": cfg.inversion.to_dict(),
                      "perturbation_scope": cfg.perturbation_scope, "pgd": cfg.pgd.to_dict()}
                     if cfg.perturbation_channel_u else {})
                  | ({"perturbation_over_probe": True} if cfg.perturbation_over_probe else {}), compute)
    out.setdefault("mask", None)  # markers written before the mask probe have no such key
    for kind in ("patch", "warp", "blend", "mask"):
        if out[kind] is not None:
            log_metrics(run, {f"{kind}_flip_rate": out[kind]["flip_rate"]}, "scan.")
    # markers written before the perturbation clean have neither key (they ran without it)
    out.setdefault("universal", None)
    out.setdefault("channel_trigger", out["trigger"])
    if text := probe_text(out):
        get_run_logger().info(text)
    log_metrics(run, {"trigger_probes": out["seconds"]}, "time.")
    return out


@task(name="adversarial", **COMPUTE)
def adversarial_task(run: RunHandle, original_file: str, compact_file: str, adv_model_file: str,
                     synthetic_file: str, cfg, trigger: dict | None = None, universal: dict | None = None,
                     finetune_file: str | None = None) -> dict:
    """The original model's adversarial class histogram on the scan's synthetic images
    (``synthetic_file``; the 'before' side of the scan), the suspected target class whose synthetic
    images the fine-tune leaves out, and, on the images the fine-tune keeps (``finetune_file``'s,
    default the same), PGD and the trigger the fine-tune unlearns (the probes' firing ``trigger``,
    kept when it still flips the compacted model, or the universal inverted trigger; see
    cc_core.defense.suspect.scan_and_suspect); and the trigger the distillation gate verifies the teacher
    against ("gate_trigger", None when there is none). ``universal``: the universal inversion
    trigger_probe_task made on the same model and images (None: made here)."""
    from cc_core.adversarial import pgd
    from cc_core.defense.images import exclude_class
    from cc_core.defense.suspect import exclusion_summary, found_summary_text, scan_and_suspect

    finetune_file = _second_file(finetune_file, synthetic_file)

    def compute() -> dict:
        t = _load_tensors(synthetic_file)
        device = _device(cfg)
        x, y = t["x"].to(device), t["y"].to(device)
        original = _load(original_file).to(device)
        before, exclusion, unlearn, gate_trigger = scan_and_suspect(original, _load(compact_file).to(device), x, y, cfg, trigger,
                                                                    universal)
        target = exclusion["suspected_target"] if exclusion else None
        if finetune_file:
            t = _load_tensors(finetune_file)
            x, y = t["x"].to(device), t["y"].to(device)
        x_kept, y_kept, excluded = exclude_class(x, y, target)
        if exclusion is not None:  # counted on the fine-tune's images, as cc_core.defend does
            exclusion["synthetic_excluded"] = excluded
        files = {}
        if cfg.finetune.adv_weight > 0:
            x_adv = pgd(_load(adv_model_file).to(device), x_kept, y_kept, cfg.pgd)
            files["adversarial"] = _save_tensors(run.path / "adversarial.safetensors", x=x_adv)
        if unlearn is not None and cfg.finetune.unlearn_weight > 0:
            files["trigger"] = _save_tensors(run.path / "trigger.safetensors", x=unlearn(x_kept))
        return {"files": files, "histogram_before": before, "exclusion": exclusion or exclusion_summary(None, None, 0),
                "gate_trigger": gate_trigger}

    out = _cached(run, "adversarial", {"original": original_file, "compact": compact_file, "adv_model": adv_model_file,
                                       "synthetic": synthetic_file, "pgd": cfg.pgd.to_dict(),
                                       **({"finetune": finetune_file} if finetune_file else {}),
                                       "adv": cfg.finetune.adv_weight > 0,
                                       "unlearn": cfg.finetune.unlearn_weight > 0,
                                       "exclude_suspected_target": cfg.exclude_suspected_target,
                                       "inversion": cfg.inversion.to_dict(),
                                       "trigger": trigger, "patch_unlearn": cfg.patch_unlearn,
                                       # the output carries the gate's trigger for this gate (markers
                                       # written before it had none)
                                       "kd_gate": cfg.kd_gate}, compute)
    if out["histogram_before"]:
        log_metrics(run, {"concentration_before": out["histogram_before"]["concentration"]}, "scan.")
    if cfg.exclude_suspected_target:
        e = out["exclusion"]
        log_metrics(run, {"synthetic_excluded": e["synthetic_excluded"]}, "scan.")
        get_run_logger().info(f"suspected target class {e['suspected_target']}: {e['synthetic_excluded']} "
                              "synthetic images left out of the fine-tune")
    fired = out["exclusion"].get("trigger")
    if fired:
        log_metrics(run, {"trigger_flip_rate_compact": fired["flip_rate_compact"]}, "scan.")
        get_run_logger().info(found_summary_text(fired).removeprefix("; ")
                              + ("; unlearned" if fired["unlearned"] else "; not unlearned"))
    log_metrics(run, {"adversarial": out["seconds"]}, "time.")
    return out


def _finetune_data(synthetic_file: str, adversarial_file: str | None, trigger_file: str | None,
                   excluded_class: int | None, device) -> tuple:
    """The fine-tune's (x, y, x_adv, x_trigger, left-out class) from the step files, without the
    synthetic images labelled ``excluded_class`` (the left-out class is None when there were none)."""
    from cc_core.defense.images import exclude_class

    t = _load_tensors(synthetic_file)
    x, y, n_excluded = exclude_class(t["x"].to(device), t["y"].to(device), excluded_class)
    x_adv = _load_tensors(adversarial_file)["x"].to(device) if adversarial_file else None
    x_trigger = _load_tensors(trigger_file)["x"].to(device) if trigger_file else None
    return x, y, x_adv, x_trigger, excluded_class if n_excluded else None


@task(name="distillation-gate", **COMPUTE)
def distillation_gate_task(run: RunHandle, teacher_file: str | None, original_file: str, synthetic_file: str, cfg,
                           trigger: dict | None, excluded_class: int | None = None,
                           finetune_file: str | None = None, student_file: str | None = None) -> dict:
    """Whether the fine-tune distills from the clipped teacher (``teacher_file``; None without
    distillation): cc_core.defense.teacher.distillation_gate, verifying it against ``trigger`` (the adversarial
    step's gate trigger) on the scan's synthetic images (``synthetic_file``), its agreement on those
    the fine-tune keeps (``finetune_file``'s, default the same, but ``excluded_class``'s). Returns the
    gate's record and, when it opens, the teacher's file: ``student_file`` (the compacted model
    before its fine-tune) when the gate anchors the student to itself (DefendConfig.self_anchor)."""
    from cc_core.defense.images import exclude_class
    from cc_core.defense.teacher import distillation_gate, distillation_text

    finetune_file = _second_file(finetune_file, synthetic_file)

    def compute() -> dict:
        device = _device(cfg)
        teacher = _load(teacher_file).to(device) if teacher_file is not None else None
        t = _load_tensors(synthetic_file)
        x = t["x"].to(device)
        if finetune_file:
            t = _load_tensors(finetune_file)
        x_distill = exclude_class(t["x"].to(device), t["y"].to(device), excluded_class)[0]
        record = distillation_gate(teacher, _load(original_file).to(device), cfg, x, trigger, x_distill,
                                   can_anchor=student_file is not None)
        files = {"teacher": student_file if record["self_anchored"] else teacher_file} if record["distill"] else {}
        return {"files": files, "distillation": record}

    out = _cached(run, "distillation_gate", {"teacher": teacher_file, "original": original_file,
                                             "synthetic": synthetic_file, "kd_gate": cfg.kd_gate,
                                             **({"finetune": finetune_file} if finetune_file else {}),
                                             "teacher_finetune": cfg.teacher_finetune, "trigger": trigger,
                                             "excluded_class": excluded_class,
                                             **({"self_anchor": student_file} if cfg.self_anchor else {})}, compute)
    record = out["distillation"]
    if record["teacher_trigger_flip_rate"] is not None:
        log_metrics(run, {"teacher_trigger_flip_rate": record["teacher_trigger_flip_rate"]}
                    | ({"teacher_agreement": record["teacher_agreement"]} if record["teacher_agreement"] is not None else {}),
                    "distill.")
    if text := distillation_text(record):
        get_run_logger().info(text)
    return out


@task(name="teacher-finetune", **COMPUTE)
def teacher_finetune_task(run: RunHandle, teacher_file: str, synthetic_file: str, adversarial_file: str | None,
                          cfg, excluded_class: int | None = None, trigger_file: str | None = None) -> dict:
    """The distillation teacher the gate did not verify, fine-tuned on the student's fine-tune data
    (cc_core.defense.teacher.finetune_teacher) before the student distills from it."""
    from cc_core.io import save_model
    from cc_core.defense.teacher import finetune_teacher, teacher_finetune_config

    def compute() -> dict:
        device = _device(cfg)
        x, y, x_adv, x_trigger, left_out = _finetune_data(synthetic_file, adversarial_file, trigger_file,
                                                          excluded_class, device)
        teacher = _load(teacher_file).to(device)
        history = finetune_teacher(teacher, x, y, x_adv, cfg, x_trigger, left_out)
        path = run.path / "teacher_finetuned.safetensors"
        save_model(teacher.cpu().eval(), path)
        return {"files": {"teacher": str(path)}, "history": history}

    out = _cached(run, "teacher_finetune", {"teacher": teacher_file, "synthetic": synthetic_file,
                                            "adversarial": adversarial_file, "trigger": trigger_file,
                                            "finetune": teacher_finetune_config(cfg).to_dict(),
                                            "excluded_class": excluded_class}, compute)
    for epoch, row in enumerate(out["history"]):
        log_metrics(run, {k: v for k, v in row.items() if k != "epoch"}, "teacher_finetune.", step=epoch)
    log_metrics(run, {"teacher_finetune": out["seconds"]}, "time.")
    get_run_logger().info(f"teacher fine-tuned in {out['seconds']:.1f} s")
    return out


@task(name="finetune", **COMPUTE)
def finetune_task(run: RunHandle, compact_file: str, synthetic_file: str, adversarial_file: str | None,
                  teacher_file: str | None, cfg, excluded_class: int | None = None,
                  trigger_file: str | None = None, variant: str | None = None) -> dict:
    """Recovery fine-tune of the compact model on synthetic (+ adversarial synthetic, + inverted
    trigger) data, without the synthetic images labelled ``excluded_class``. A ``variant`` (e.g.
    "undistilled", the distillation check's other student) keeps its file, step record and metrics
    apart: <work dir>/<variant>/finetuned.safetensors, metrics finetune_<variant>.*."""
    from cc_core.finetune import COLLAPSE_ACC, COLLAPSE_GRAD_NORM, guard_text, guarded_finetune
    from cc_core.io import save_model
    from cc_core.defense.teacher import finetune_config

    def compute() -> dict:
        device = _device(cfg)
        x, y, x_adv, x_trigger, left_out = _finetune_data(synthetic_file, adversarial_file, trigger_file,
                                                          excluded_class, device)
        teacher = _load(teacher_file).to(device) if teacher_file else None
        model = _load(compact_file).to(device)
        history, guard = guarded_finetune(model, x, y, x_adv, teacher, finetune_config(cfg, teacher), progress=False,
                                          x_trigger=x_trigger, left_out_class=left_out)
        path = (run.path / variant if variant else run.path) / "finetuned.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model.cpu().eval(), path)
        return {"files": {"model": str(path)}, "history": history, "guard": guard}

    step = f"finetune_{variant}" if variant else "finetune"
    out = _cached(run, step, {"compact": compact_file, "synthetic": synthetic_file,
                                    "adversarial": adversarial_file, "trigger": trigger_file, "teacher": teacher_file,
                                    "finetune": cfg.finetune.to_dict(), "excluded_class": excluded_class,
                                    "collapse_guard": [COLLAPSE_ACC, COLLAPSE_GRAD_NORM]}, compute)
    for epoch, row in enumerate(out["history"]):
        log_metrics(run, {k: v for k, v in row.items() if k != "epoch"}, f"{step}.", step=epoch)
    log_metrics(run, {step: out["seconds"]}, "time.")
    log_metrics(run, {"synthetic_fit": out["guard"]["synthetic_fit"]}, f"{step}.")
    get_run_logger().info(f"fine-tuned{f' ({variant})' if variant else ''} in {out['seconds']:.1f} s")
    if text := guard_text(out["guard"]):
        get_run_logger().warning(text)
    return out


@task(name="distill-check", **COMPUTE)
def distill_check_task(run: RunHandle, distilled_file: str, undistilled_file: str, synthetic_file: str, cfg) -> dict:
    """cc_core.defense.teacher.distill_check on the two students: ``check`` (its record) and ``files.model``,
    the student kept."""
    from cc_core.defense.teacher import distill_check, distill_check_text

    def compute() -> dict:
        device = _device(cfg)
        x = _load_tensors(synthetic_file)["x"].to(device)
        check = distill_check(_load(distilled_file).to(device), _load(undistilled_file).to(device), x, cfg.distill_check)
        return {"check": check, "files": {"model": distilled_file if check["kept"] else undistilled_file}}

    out = _cached(run, "distill_check", {"distilled": distilled_file, "undistilled": undistilled_file,
                                         "synthetic": synthetic_file, "inversion": cfg.distill_check.to_dict()}, compute)
    check = out["check"]
    log_metrics(run, {"flip_rate_distilled": check["flip_rate_distilled"],
                      "flip_rate_undistilled": check["flip_rate_undistilled"],
                      "distilled_kept": float(check["kept"])}, "distill_check.")
    log_metrics(run, {"distill_check": out["seconds"]}, "time.")
    get_run_logger().info(distill_check_text(check))
    return out


@task(name="evaluate", **COMPUTE)
def evaluate_task(run: RunHandle, models: dict[str, str], synthetic_file: str, cfg,
                  eval_data: str | None = None, data_dir: str | None = None,
                  attack_dir: str | None = None) -> dict:
    """ACC/ASR/RA of each model in ``models`` ({step: file}, in step order) on real eval data
    (if given), and the final model's adversarial histogram on the synthetic images."""
    from cc_core.scan import histogram_report

    def compute() -> dict:
        from cc_core.attacks import load_attack
        from cc_core.data import load_dataset
        from cc_core.metrics import evaluate

        device = _device(cfg)
        steps = []
        if eval_data:
            data = load_dataset(eval_data, "test", data_dir)
            attack = load_attack(attack_dir) if attack_dir else None
            for step, path in models.items():
                r = evaluate(_load(path), data, attack, device=device)
                steps.append({"step": step, "acc": r["acc"], "asr": r["asr"], "ra": r["ra"],
                              "per_class_acc": r["per_class_acc"]})
        t = _load_tensors(synthetic_file)
        final = _load(list(models.values())[-1]).to(device)
        after = histogram_report(final, t["x"].to(device), t["y"].to(device), cfg.pgd) if cfg.scan_before else None
        return {"steps": steps, "histogram_after": after}

    out = _cached(run, "evaluate", {"models": models, "synthetic": synthetic_file, "eval_data": eval_data,
                                    "attack": attack_dir, "pgd": cfg.pgd.to_dict()}, compute)
    for i, row in enumerate(out["steps"]):
        log_metrics(run, {k: row[k] for k in ("acc", "asr", "ra")}, "eval.", step=i)
    if out["histogram_after"]:
        log_metrics(run, {"concentration_after": out["histogram_after"]["concentration"]}, "scan.")
    log_metrics(run, {"evaluate": out["seconds"]}, "time.")
    return out


@task(name="export", **COMPUTE)
def export_task(run: RunHandle, model_file: str, original_file: str, threads: int = 2,
                latency_batch: int = 128) -> dict:
    """ONNX export (dynamic batch, checker, parity vs torch) and onnxruntime latency of the
    original and the compact model side by side."""
    from cc_core.defense.package import export_checked_onnx

    def compute() -> dict:
        onnx_dir = run.path / "onnx"
        onnx_dir.mkdir(exist_ok=True)
        report = export_checked_onnx(_load(model_file), _load(original_file), onnx_dir, threads, latency_batch)
        return {"files": {"onnx": str(onnx_dir / "model.onnx")}, "onnx": report}

    out = _cached(run, "export", {"model": model_file, "threads": threads, "batch": latency_batch}, compute)
    o = out["onnx"]
    log_metrics(run, {"max_abs_diff": o["max_abs_diff"], "speedup": o["speedup"],
                      "speedup_batch1": o["speedup_batch1"],
                      "latency_ms_original": o["latency_ms"]["original"],
                      "latency_ms_compact": o["latency_ms"]["compact"]}, "onnx.")
    log_metrics(run, {"export": out["seconds"]}, "time.")
    get_run_logger().info(f"ONNX parity {o['max_abs_diff']:.2e}, speed-up {o['speedup']:.2f}x")
    return out


@task(name="log-package", **MLFLOW_RETRIES)
def log_package_task(run: RunHandle, experiment_id: str, report: dict, gates: dict, source: dict,
                     files: dict, class_names: list[str]) -> dict:
    """report.json, the safetensors package, plots, summary.html, and the ONNX model as an MLflow
    LoggedModel (``mlflow.onnx.log_model``, package files included). Returns the model's URI."""
    import mlflow
    import mlflow.onnx
    import onnx

    from tasks import plots

    art = run.path / "artifacts"
    report_path = log_json(run, report, "report.json")
    log_json(run, gates, "gates.json")
    log_artifact(run, files["model"], "package")
    pngs = [plots.plot_spectra(json.loads(Path(files["plan"]).read_text()), art / "plots" / "singular_value_spectra.png")]
    scan = report["scan"]
    if scan.get("histogram_before") or scan.get("histogram_after"):
        pngs.append(plots.plot_histograms(scan.get("histogram_before"), scan.get("histogram_after"),
                                          class_names, art / "plots" / "adversarial_histogram.png"))
    if report.get("steps"):
        pngs.append(plots.plot_steps(report["steps"], art / "plots" / "acc_asr_by_step.png"))
    for p in pngs:
        log_artifact(run, p, "plots")
    status = report.get("status", "")
    summary = art / "summary.html"
    summary.write_text(plots.summary_html(report, gates, source, pngs, status))
    log_artifact(run, summary)

    logged = run.client.create_logged_model(experiment_id=experiment_id, name="cleaned-onnx",
                                            source_run_id=run.run_id)
    with mlflow_globals(run.tracking_uri):
        info = mlflow.onnx.log_model(onnx.load(files["onnx"]), name="cleaned-onnx", model_id=logged.model_id,
                                     run_id=run.run_id, pip_requirements=ONNX_PIP_REQUIREMENTS,
                                     extra_files=[files["model"], str(report_path)], save_as_external_data=False)
    return {"model_uri": info.model_uri, "model_id": logged.model_id}


@task(name="register", **MLFLOW_RETRIES)
def register_task(run: RunHandle, target: str, model_uri: str, model_id: str, source: dict, ratio: float,
                  config_hash: str, gates: dict, passed: bool) -> dict:
    """Register the cleaned model as a version of ``target`` with its tags; alias
    ``candidate`` always, ``champion`` only when every measured gate passed. Idempotent: if this
    (source, config) was registered meanwhile, that version is returned and nothing is added."""
    from tasks.registry import cleaned_versions, ensure_registered_model

    c = run.client
    existing = cleaned_versions(c, target, source["uri"], config_hash)
    if existing:
        version, created = int(existing[0].version), False
    else:
        ensure_registered_model(c, target, f"Clean & Compact output of {source['name']} (cleancompact)")
        tags = {"cc.role": "output", "cc.source": source["uri"], "cc.source_sha256": source["sha256"], "cc.ratio": f"{ratio:g}",
                "cc.status": "promoted" if passed else "rejected", "cc.config_hash": config_hash,
                "cc.run_id": run.run_id}
        tags |= {f"cc.gate.{k}": v["status"] for k, v in gates.items()}
        with mlflow_globals(run.tracking_uri):  # resolving a models:/m-... source reads the global store
            mv = c.create_model_version(target, source=model_uri, run_id=run.run_id, tags=tags, model_id=model_id)
        version, created = int(mv.version), True
        c.set_registered_model_alias(target, "candidate", str(version))
        if passed:
            c.set_registered_model_alias(target, "champion", str(version))
    log = get_run_logger()
    log.info(f"{'registered' if created else 'already registered'} {target} version {version}"
             f"{' -> champion' if passed and created else ''}")
    c.set_tag(run.run_id, "cc.registered", f"models:/{target}/{version}")
    return {"name": target, "version": version, "created": created, "champion": passed and created}


def working_dir(root: str | os.PathLike, source_sha256: str, config: dict) -> Path:
    """The resumable work directory of (source, config, code version): a rerun resumes from the
    steps it finished, but never reuses steps that another version of cleancompact computed."""
    path = Path(root) / f"{source_sha256[:16]}-{digest({'config': config, 'code': code_version()})[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path

"""``clean_compact`` flow: one source model URI -> cleaned, evaluated, exported, registered model.

Thin by design: every step is a task in ``tasks.steps``; this file only orders them, owns the
single MLflow run (FAILED with the error on any exception) and decides idempotency.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

from prefect import flow, get_run_logger

from cc_core.compact.plan import CompactionPlan
from cc_core.errors import ConfigError
from cc_core.defense.config import DefendConfig, resolve_config
from cc_core.defense.report import make_report
from cc_core.defense.teacher import needs_distill_check
from cc_core.probes import PatchProbeConfig, WarpProbeConfig
from cc_core.scan import InversionConfig
from tasks import steps
from tasks.gates import GateConfig, evaluate_gates, gates_passed
from tasks.registry import CLEANED_SUFFIX, cleaned_versions
from tasks.tracking import (RunHandle, cc_home, client, default_tracking_uri, ensure_experiment, fail_run,
                            log_params)


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """The data-free pre-scan of the suspect (smaller than the fine-tune's synthesis). ``warp_probe``:
    also run the warp probe (~60 s on 2 CPU cores). Off for the clean-compact flow's pre-scan: on the
    scan's synthetic images it has not fired on any zoo model (benchmarks/results/scan.md), while the
    defense's own probes (the preset's, warp probe included) run on the fine-tune's larger set; the
    audit flow, the scheduled `cleancompact scan`, turns it on.
    ``patch_probe``: the patch probe's settings (PatchProbeConfig fields; {} its defaults, None off)."""

    n_samples: int = 256
    iterations: int = 100
    pgd_steps: int = 10
    inversion_steps: int = InversionConfig().steps
    warp_probe: bool = False
    patch_probe: dict | None = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.patch_probe is not None and not isinstance(self.patch_probe, dict):
            raise ConfigError(f"scan patch_probe must be a dict of patch probe settings or None, got {self.patch_probe!r}")
        self.patch_cfg  # noqa: B018 (validated here, at the edge)

    @classmethod
    def from_dict(cls, values: dict | None) -> "ScanSettings":
        try:
            return cls(**(values or {}))
        except TypeError as e:
            raise ConfigError(f"scan settings: {e}") from None

    @property
    def warp_cfg(self) -> dict | None:
        """The scan task's warp probe settings (None: off)."""
        return WarpProbeConfig().to_dict() if self.warp_probe else None

    @property
    def patch_cfg(self) -> dict | None:
        """The scan task's patch probe settings (None: off)."""
        if self.patch_probe is None:
            return None
        try:
            return PatchProbeConfig(**self.patch_probe).to_dict()
        except TypeError as e:
            raise ConfigError(f"scan patch_probe takes patch probe settings: {e}") from None


@flow(name="clean-compact", log_prints=True)
def clean_compact_flow(source: str, ratio: float = 2.0, preset: str = "cpu", overrides: dict | None = None,
                       gates: dict | None = None, eval_data: str | None = None, data_dir: str | None = None,
                       attack: str | None = None, registered_name: str | None = None,
                       tracking_uri: str | None = None, work_root: str | None = None,
                       arch: str | None = None, num_classes: int | None = None,
                       scan: dict | None = None, latency_batch: int = 128, threads: int | None = 2) -> dict:
    """Clean & Compact ``source`` (``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or a file).

    ``eval_data``/``attack`` only measure ACC/ASR (the defense uses no real data); for registry
    sources an ``attack.json`` stored beside the weights is used when ``attack`` is not given.
    Returns {"status": "promoted"|"rejected"|"skipped", "registered": {...}, "gates": {...},
    "run_id", "report"}."""
    import torch

    log = get_run_logger()
    tracking_uri = tracking_uri or default_tracking_uri()
    cfg = resolve_config(preset, **{**(overrides or {}), "ratio": ratio})
    gate_cfg = GateConfig.from_dict(gates)
    scan_cfg = ScanSettings.from_dict(scan)
    if threads:
        torch.set_num_threads(threads)
    work_root = Path(work_root) if work_root else cc_home() / "work"
    fetched = steps.fetch_source(tracking_uri, source, str(work_root / "downloads" / steps.digest(source)[:16]))
    target = registered_name or f"{fetched['name']}{CLEANED_SUFFIX}"
    config_record = {"defend": cfg.to_dict(), "scan": dataclasses.asdict(scan_cfg), "arch": arch,
                     "num_classes": num_classes}
    config_hash = steps.digest(config_record)[:16]
    done = cleaned_versions(client(tracking_uri), target, fetched["uri"], config_hash)
    if done:
        v = done[0]
        log.info(f"{fetched['uri']} was already cleaned with this config: {target} version {v.version}; "
                 "nothing to do")
        return {"status": "skipped", "registered": {"name": target, "version": int(v.version), "created": False},
                "gates": None, "run_id": v.run_id, "report": None}

    experiment_id = ensure_experiment(tracking_uri, "cleancompact")
    mlflow_run = client(tracking_uri).create_run(experiment_id, tags={
        "mlflow.runName": f"cc-{fetched['name']}-{fetched['version'] or 'file'}-{ratio:g}x",
        "cc.source": fetched["uri"], "cc.ratio": f"{ratio:g}", "cc.config_hash": config_hash,
        "cc.status": "running", "cc.host": socket.gethostname()})
    run = RunHandle(tracking_uri, mlflow_run.info.run_id, str(steps.working_dir(work_root, fetched["sha256"],
                                                                                config_record)))
    log.info(f"MLflow run {run.run_id} (experiment cleancompact); work directory {run.work_dir}")
    try:
        result = _run_steps(run, experiment_id, fetched, cfg, gate_cfg, scan_cfg, target, config_hash,
                            eval_data, data_dir, attack or fetched["attack_dir"], arch, num_classes,
                            latency_batch, threads or 2)
    except BaseException as e:
        fail_run(run, e)
        raise
    c = client(tracking_uri)
    c.set_tag(run.run_id, "cc.status", result["status"])
    c.set_terminated(run.run_id, "FINISHED")
    return result | {"run_id": run.run_id}


def _run_steps(run: RunHandle, experiment_id: str, source: dict, cfg: DefendConfig, gate_cfg: GateConfig,
               scan_cfg: ScanSettings, target: str, config_hash: str, eval_data, data_dir, attack_dir,
               arch, num_classes, latency_batch: int, threads: int) -> dict:
    from cc_core.io import load_model

    t0 = time.perf_counter()
    log_params(run, cfg.to_dict(), "cfg.")
    log_params(run, {"gates": gate_cfg.to_dict(), "eval_data": eval_data, "attack": attack_dir,
                     "target_model": target, "config_hash": config_hash})
    loaded = steps.load_task(run, source, arch, num_classes)
    original = loaded["files"]["model"]
    steps.scan_task(run, original, {"n_samples": scan_cfg.n_samples, "iterations": scan_cfg.iterations,
                                    "batch_size": min(128, scan_cfg.n_samples)},
                    {**cfg.pgd.to_dict(), "steps": scan_cfg.pgd_steps},
                    {**cfg.inversion.to_dict(), "steps": scan_cfg.inversion_steps}, cfg.device, scan_cfg.warp_cfg,
                    scan_cfg.patch_cfg)
    done = _defense_tasks(run, original, cfg)
    done["evaluate"] = steps.evaluate_task(run, {"original": original, "clean+compact": done["compact"],
                                                 "fine-tuned": done["final"]},
                                           done["scan_images"], cfg, eval_data, data_dir, attack_dir)
    done["export"] = steps.export_task(run, done["final"], original, threads, latency_batch)
    report = _report(original, done, cfg, source, t0)
    gates = evaluate_gates(report, gate_cfg)
    passed = gates_passed(gates)
    report["status"] = "promoted" if passed else "rejected"
    logged = steps.log_package_task(run, experiment_id, report, gates, source,
                                    {"model": done["final"], "plan": done["clean_compact"]["files"]["plan"],
                                     "onnx": done["export"]["files"]["onnx"]},
                                    list(load_model(original).cc_spec.class_names or ()))
    registered = steps.register_task(run, target, logged["model_uri"], logged["model_id"], source, cfg.ratio,
                                     config_hash, gates, passed)
    return {"status": report["status"], "registered": registered, "gates": gates, "report": report}


def _defense_tasks(run: RunHandle, original: str, cfg: DefendConfig) -> dict:
    """The defense's tasks on the model file ``original``, in cc_core.defend's order: each task's
    output by step name ("synthesize", "synthesize_scan", "trigger_probe", "clean_compact",
    "adversarial", "teacher_finetune", "finetune", "distill_check"; None where it did not run),
    with the files the steps after them read ("compact", "scan_images", "final") and the
    distillation gate's record ("distillation", with the check's verdict)."""
    scanned = None  # the scan's own synthetic images (cfg.scan_synth_config), made from the original
    if cfg.synth_model == "original":
        synthesized = steps.synthesize_task(run, original, cfg)
        synthetic = synthesized["files"]["synthetic"]
        if cfg.scan_synth_config is not None:
            scanned = steps.synthesize_task(run, original, cfg, scan=True)
        scan_images = scanned["files"]["synthetic"] if scanned else synthetic
        probed = steps.trigger_probe_task(run, original, scan_images, cfg)
        compacted = steps.compact_task(run, original, cfg, synthetic, probed["channel_trigger"], scan_images)
    else:
        compacted = steps.compact_task(run, original, cfg)
    compact = compacted["files"]["compact"]
    if cfg.synth_model == "compact":
        synthesized = steps.synthesize_task(run, compact, cfg)
        synthetic = scan_images = synthesized["files"]["synthetic"]
        probed = steps.trigger_probe_task(run, original, scan_images, cfg)
    finetune_images = synthetic
    if cfg.finetune_on_scan_synthetic and scanned is not None:
        finetune_images = steps.join_synthetic_task(run, synthetic, scan_images)["files"]["synthetic"]
    adv_model = compact if cfg.adversarial_model == "compact" else original
    adversarial = steps.adversarial_task(run, original, compact, adv_model, scan_images, cfg, probed["trigger"],
                                         probed["universal"], finetune_images)
    finetune_data = (finetune_images, adversarial["files"].get("adversarial"))
    suspected, trigger_file = adversarial["exclusion"]["suspected_target"], adversarial["files"].get("trigger")
    gated = steps.distillation_gate_task(run, compacted["files"].get("teacher"), original, scan_images, cfg,
                                         adversarial["gate_trigger"], suspected, finetune_images, compact)
    teacher, teacher_tuned = gated["files"].get("teacher"), None
    if gated["distillation"]["teacher_finetune"]:
        teacher_tuned = steps.teacher_finetune_task(run, teacher, *finetune_data, cfg, suspected, trigger_file)
        teacher = teacher_tuned["files"]["teacher"]
    tuned = steps.finetune_task(run, compact, *finetune_data, teacher, cfg, suspected, trigger_file)
    distillation, checked, student = dict(gated["distillation"]), None, tuned
    if needs_distill_check(cfg, distillation):
        undistilled = steps.finetune_task(run, compact, *finetune_data, None, cfg, suspected, trigger_file,
                                          variant="undistilled")
        checked = steps.distill_check_task(run, tuned["files"]["model"], undistilled["files"]["model"], scan_images,
                                           cfg)
        distillation["check"] = checked["check"]
        checked["seconds"] += undistilled["seconds"]
        student = tuned if checked["check"]["kept"] else undistilled
    return {"synthesize": synthesized, "synthesize_scan": scanned, "trigger_probe": probed,
            "clean_compact": compacted, "adversarial": adversarial, "teacher_finetune": teacher_tuned,
            "finetune": tuned, "distill_check": checked, "student": student, "distillation": distillation,
            "compact": compact, "scan_images": scan_images, "final": student["files"]["model"]}


def _report(original: str, done: dict, cfg: DefendConfig, source: dict, t0: float) -> dict:
    """cc_core's report of the run from its tasks' outputs (``done``, _defense_tasks' with
    "evaluate" and "export"), with the ONNX export, every evaluated step and the source."""
    from cc_core.io import load_model

    evaluated, exported, compacted = done["evaluate"], done["export"], done["clean_compact"]
    by_step = {row["step"]: row for row in evaluated["steps"]}
    metrics = {f"{k}_{when}": by_step.get(step, {}).get(k) for k in ("acc", "asr", "ra", "per_class_acc")
               for when, step in (("before", "original"), ("after", "fine-tuned"))}
    timings = dict(compacted["timings"])
    for name in ("synthesize", "trigger_probe", "adversarial", "finetune", "evaluate", "export"):
        timings[name] = done[name]["seconds"]
    for name in ("synthesize_scan", "teacher_finetune", "distill_check"):
        if done[name] is not None:
            timings[name] = done[name]["seconds"]
    timings["total"] = time.perf_counter() - t0  # wall time of this run (finished steps reused count ~0)
    plan = CompactionPlan.from_dict(json.loads(Path(compacted["files"]["plan"]).read_text()))
    synth_log = {k: done["synthesize"][k] for k in ("bn_loss", "ce_loss", "n")}
    student, adversarial = done["student"], done["adversarial"]
    report = make_report(load_model(original), load_model(done["final"]), cfg, plan, metrics,
                         adversarial["histogram_before"], evaluated["histogram_after"], timings, student["history"],
                         synth_log, cfg.device, compacted["channel_clean"], adversarial["exclusion"],
                         done["distillation"], student["guard"], compacted.get("bn_match"))
    return report | {"onnx": exported["onnx"], "steps": evaluated["steps"], "source": source}

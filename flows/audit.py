"""``audit`` flow (scheduled): scan every registered model version that was never audited, or
whose audit is older than ``max_age_hours``, and by policy clean it.

Audit results are tags on the audited version (``cc.audit.at`` ISO time, ``cc.audit.risk`` (the
scan's risk score, see cc_core.scan), ``cc.audit.concentration``,
``cc.audit.target``, ``cc.audit.verdict`` = flagged|clear), and one MLflow run per scan in
experiment ``cleancompact-audit``. Cleaned outputs (``*-cc`` models, versions tagged
``cc.role=output``) are never audited as sources.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from cc_core.errors import ConfigError
from flows.clean_compact import ScanSettings, clean_compact_flow
from tasks import steps
from tasks.registry import CLEANED_SUFFIX
from tasks.tracking import RunHandle, cc_home, client, default_tracking_uri, ensure_experiment, fail_run

POLICIES = ("scan-only", "clean-flagged", "clean-all")


def due_versions(c, max_age_hours: float, names: list[str] | None = None, now: datetime | None = None) -> list:
    """Source model versions whose audit is missing or older than ``max_age_hours``."""
    now = now or datetime.now(timezone.utc)
    due = []
    for rm in c.search_registered_models():
        if rm.name.endswith(CLEANED_SUFFIX) or (names and rm.name not in names):
            continue
        for v in c.search_model_versions(f"name = '{rm.name}'"):
            if v.tags.get("cc.role") == "output" or "cc.source" in v.tags:
                continue
            at = v.tags.get("cc.audit.at")
            if at is None or now - datetime.fromisoformat(at) > timedelta(hours=max_age_hours):
                due.append(v)
    return sorted(due, key=lambda v: (v.name, int(v.version)))


@flow(name="audit", log_prints=True)
def audit_flow(policy: str = "clean-flagged", max_age_hours: float = 24 * 7, flag_risk: float = 0.5,
               names: list[str] | None = None, ratio: float = 2.0, preset: str = "cpu",
               overrides: dict | None = None, gates: dict | None = None, scan: dict | None = None,
               tracking_uri: str | None = None, work_root: str | None = None, limit: int | None = None) -> list[dict]:
    """Audit due versions; returns one row per version: name, version, risk, concentration, target,
    verdict and (when cleaned) the clean_compact result's status and registered version."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown audit policy {policy!r}; choose from {', '.join(POLICIES)}")
    log = get_run_logger()
    tracking_uri = tracking_uri or default_tracking_uri()
    c = client(tracking_uri)
    work_root = Path(work_root) if work_root else cc_home() / "work"
    scan_cfg = ScanSettings.from_dict({"warp_probe": True} | (scan or {}))
    due = due_versions(c, max_age_hours, names)[:limit]
    log.info(f"{len(due)} model version(s) due for audit (policy {policy})")
    experiment_id = ensure_experiment(tracking_uri, "cleancompact-audit")
    rows = []
    for v in due:
        uri = f"models:/{v.name}/{int(v.version)}"
        row = {"name": v.name, "version": int(v.version), **_scan_version(c, tracking_uri, experiment_id, uri,
                                                                          work_root, scan_cfg, flag_risk)}
        if policy == "clean-all" or (policy == "clean-flagged" and row["verdict"] == "flagged"):
            result = clean_compact_flow(uri, ratio=ratio, preset=preset, overrides=overrides, gates=gates,
                                        tracking_uri=tracking_uri, work_root=str(work_root), scan=scan)
            row |= {"clean_status": result["status"], "registered": result["registered"]}
        log.info(f"audit {uri}: risk {row['risk']:.2f} -> {row['verdict']}"
                 + (f", cleaned: {row['clean_status']}" if "clean_status" in row else ""))
        rows.append(row)
    return rows


def _scan_version(c, tracking_uri: str, experiment_id: str, uri: str, work_root: Path, scan_cfg: ScanSettings,
                  flag_risk: float) -> dict:
    """Scan one version in its own audit run and tag the version with the result."""
    import json

    from cc_core.adversarial import PGDConfig
    from cc_core.scan import InversionConfig

    source = steps.fetch_source(tracking_uri, uri, str(work_root / "downloads" / steps.digest(uri)[:16]))
    mlflow_run = c.create_run(experiment_id, tags={"mlflow.runName": f"audit-{uri.removeprefix('models:/')}",
                                                   "cc.source": source["uri"]})
    run = RunHandle(tracking_uri, mlflow_run.info.run_id,
                    str(steps.working_dir(work_root, source["sha256"], {"audit": json.dumps(scan_cfg.__dict__)})))
    try:
        loaded = steps.load_task(run, source)
        out = steps.scan_task(run, loaded["files"]["model"],
                              {"n_samples": scan_cfg.n_samples, "iterations": scan_cfg.iterations,
                               "batch_size": min(128, scan_cfg.n_samples)},
                              {**PGDConfig().to_dict(), "steps": scan_cfg.pgd_steps},
                              {**InversionConfig().to_dict(), "steps": scan_cfg.inversion_steps},
                              warp_cfg=scan_cfg.warp_cfg, patch_cfg=scan_cfg.patch_cfg)
    except BaseException as e:
        fail_run(run, e)
        raise
    s = out["summary"]
    verdict = "flagged" if s["risk"] >= flag_risk else "clear"
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    for key, value in {"cc.audit.at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "cc.audit.risk": f"{s['risk']:.4f}", "cc.audit.concentration": f"{s['concentration']:.4f}",
                       "cc.audit.target": str(s["target_class_estimate"]),
                       "cc.audit.all_to_all": str(s["all_to_all_suspected"]).lower(),
                       "cc.audit.verdict": verdict,
                       "cc.audit.run_id": run.run_id}.items():
        c.set_model_version_tag(name, version, key, value)
    c.set_tag(run.run_id, "cc.audit.verdict", verdict)
    c.set_terminated(run.run_id, "FINISHED")
    return {"risk": s["risk"], "concentration": s["concentration"], "target": s["target_class_estimate"], "verdict": verdict,
            "audit_run_id": run.run_id}

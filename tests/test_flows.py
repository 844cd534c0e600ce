"""Flows on Prefect's test harness and a temporary SQLite MLflow: registry semantics, artifacts,
gates, idempotency, resume, failure handling, audit."""
import json
import os

import pytest
import torch

from cc_core import save_model
from cc_core.device import precision
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("prefect_harness")

TINY_PATCH_PROBE = {"sizes": [3], "stride": 4, "screen": 4, "finalists": 2, "n": 16}
TINY = {"tau": 3.0, "compact": {"rank_multiple": 4},
        "synth": {"n_samples": 32, "batch_size": 32, "iterations": 10},
        "pgd": {"steps": 2}, "finetune": {"epochs": 1, "batch_size": 16}, "inversion": {"steps": 5},
        "patch_probe": TINY_PATCH_PROBE, "warp_probe": {"steps": 5, "n": 16, "batch_size": 8},
        "blend_probe": {"steps": 5, "n": 16, "batch_size": 8}}
TINY_SCAN = {"n_samples": 16, "iterations": 5, "pgd_steps": 2, "inversion_steps": 5, "patch_probe": TINY_PATCH_PROBE}
OPEN_GATES = {"min_speedup": None, "max_concentration": None}


@pytest.fixture(scope="module")
def world(tmp_path_factory, _mlflow_template):
    """One MLflow store, one model file and one step cache for the module: tests register the
    file under their own name, so registry state is per test while finished steps (ONNX export
    above all) are computed once."""
    import shutil

    root = tmp_path_factory.mktemp("flows")
    shutil.copy(_mlflow_template, root / "mlflow.db")
    return {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "work_root": str(root / "work"),
            "file": save_model(tiny_model(), root / "vendor.safetensors")}


@pytest.fixture()
def suspect(world, request):
    from tasks.registry import register_suspect

    name = request.node.name.removeprefix("test_")[:40].replace("_", "-")
    version = register_suspect(world["tracking_uri"], name, world["file"])
    return world | {"name": name, "uri": f"models:/{name}/{version}"}


def run_flow(suspect, source: str | None = None, **kw):
    from flows.clean_compact import clean_compact_flow

    args = {"overrides": TINY, "scan": TINY_SCAN, "gates": OPEN_GATES, "latency_batch": 4,
            "tracking_uri": suspect["tracking_uri"], "work_root": suspect["work_root"]} | kw
    return clean_compact_flow(source or suspect["uri"], **args)


def registry(suspect):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=suspect["tracking_uri"], registry_uri=suspect["tracking_uri"])


def test_flow_registers_candidate_and_champion_with_every_artifact(suspect, tmp_path):
    import mlflow.onnx

    result = run_flow(suspect, overrides=TINY | {"teacher_finetune": {"lr": 2e-4}, "distill_check": {"steps": 5},
                                                 "bn_match_samples": 16, "bn_match_scope": "always"})
    assert result["status"] == "promoted" and result["registered"]["created"]
    c, target = registry(suspect), suspect["name"] + "-cc"
    version = str(result["registered"]["version"])
    assert str(c.get_model_version_by_alias(target, "candidate").version) == version
    assert str(c.get_model_version_by_alias(target, "champion").version) == version
    tags = c.get_model_version(target, version).tags
    assert tags["cc.source"] == suspect["uri"] and tags["cc.ratio"] == "2"
    assert tags["cc.status"] == "promoted" and tags["cc.gate.onnx_diff"] == "passed"
    assert tags["cc.gate.acc_drop"] == "skipped"  # no eval data: measured gates only
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cc.status"] == "promoted"
    for key in ("model.params_before", "model.params_after", "scan.concentration", "scan.concentration_before",
                "scan.concentration_after", "onnx.max_abs_diff", "onnx.speedup", "time.finetune", "synth.bn_loss",
                "scan.patch_flip_rate"):
        assert key in run.data.metrics, key
    # the preset's warp probe, among the defense's probes (no stamp fires on the tiny model; the pre-scan runs none)
    assert "scan.warp_flip_rate" in run.data.metrics
    # No trigger fires on the tiny model, so the gate cannot verify its teacher: asked to, the flow fine-tunes it first.
    assert "time.teacher_finetune" in run.data.metrics and "teacher_finetune.syn" in run.data.metrics
    # ...and, asked to, checks the distilled student against one fine-tuned without the teacher.
    for key in ("time.distill_check", "distill_check.flip_rate_distilled", "finetune_undistilled.syn"):
        assert key in run.data.metrics, key
    assert run.data.params["cfg.tau"] == "3.0"

    def listing(path=None):
        out = []
        for f in c.list_artifacts(run.info.run_id, path):
            out += listing(f.path) if f.is_dir else [f.path]
        return out

    files = set(listing())
    assert {"report.json", "gates.json", "summary.html", "package/finetuned.safetensors", "scan/scan.json",
            "compact/plan.json", "plots/singular_value_spectra.png", "plots/adversarial_histogram.png"} <= files
    report = json.loads(open(c.download_artifacts(run.info.run_id, "report.json", str(tmp_path))).read())
    assert report["format"] == "cleancompact.report/1" and report["model"]["compression"] >= 2
    assert report["onnx"]["max_abs_diff"] < 1e-3
    assert report["distillation"]["teacher_finetune"] and report["timings_s"]["teacher_finetune"] > 0
    check = report["distillation"]["check"]
    assert set(check) == {"flip_rate_distilled", "flip_rate_undistilled", "margin", "kept"}
    assert report["timings_s"]["distill_check"] > 0
    assert report["bn_match"]["images"] == 16 and "time.bn_match" in run.data.metrics  # asked for, in the compact task
    assert "<img src=\"data:image/png;base64," in open(c.download_artifacts(run.info.run_id, "summary.html",
                                                                              str(tmp_path))).read()
    import mlflow.tracking._model_registry.utils as registry_utils

    from tasks.tracking import mlflow_globals

    # The flow must not leave MLflow's process-wide URIs pointing at its store.
    assert os.environ.get("MLFLOW_TRACKING_URI") is None and os.environ.get("MLFLOW_REGISTRY_URI") is None
    assert registry_utils._registry_uri is None
    (tmp_path / "dl").mkdir()
    with mlflow_globals(suspect["tracking_uri"]):
        onnx_model = mlflow.onnx.load_model(f"models:/{target}/{version}", dst_path=str(tmp_path / "dl"))
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_second_run_on_same_source_registers_nothing(suspect):
    first = run_flow(suspect)
    second = run_flow(suspect)
    assert second["status"] == "skipped" and second["registered"]["version"] == first["registered"]["version"]
    assert len(registry(suspect).search_model_versions(f"name = '{suspect['name']}-cc'")) == 1


def test_failing_gate_keeps_champion(suspect):
    first = run_flow(suspect)
    rejected = run_flow(suspect, ratio=3.0, gates={"min_speedup": 1000.0, "max_concentration": None})
    assert rejected["status"] == "rejected" and rejected["gates"]["speedup"]["status"] == "failed"
    c, target = registry(suspect), suspect["name"] + "-cc"
    assert int(c.get_model_version_by_alias(target, "champion").version) == first["registered"]["version"]
    assert int(c.get_model_version_by_alias(target, "candidate").version) == rejected["registered"]["version"]
    assert c.get_model_version(target, str(rejected["registered"]["version"])).tags["cc.gate.speedup"] == "failed"


def test_failing_task_marks_run_failed_and_rerun_resumes(suspect, tmp_path):
    from cc_core.errors import InputError

    fresh = {"work_root": str(tmp_path / "work")}
    with pytest.raises(InputError):
        run_flow(suspect, eval_data=str(tmp_path / "no-such-folder"), **fresh)
    c = registry(suspect)
    failed = [r for r in c.search_runs([c.get_experiment_by_name("cleancompact").experiment_id])
              if r.data.tags.get("cc.source") == suspect["uri"]]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "no-such-folder" in failed[0].data.tags["cc.error"]
    assert "error.txt" in {f.path for f in c.list_artifacts(failed[0].info.run_id)}
    assert c.search_model_versions(f"name = '{suspect['name']}-cc'") == []

    work = next((tmp_path / "work").glob("*-*"))
    finished = {p.name for p in (work / "steps").glob("*.json")}
    assert any(n.startswith("finetune-") for n in finished) and not any(n.startswith("evaluate-") for n in finished)
    result = run_flow(suspect, **fresh)  # same source and config: finished steps are reused
    assert result["status"] == "promoted"
    assert {p.name for p in (work / "steps").glob("*.json")} > finished
    assert result["report"]["environment"]["mixed_precision_dtype"] == precision(torch.device("cpu"))
    assert result["report"]["timings_s"]["finetune"] == json.loads(
        next((work / "steps").glob("finetune-*.json")).read_text())["seconds"]


def test_file_source_and_bad_uri(suspect):
    from tasks.registry import SourceError

    result = run_flow(suspect, source=str(suspect["file"]))
    assert result["registered"]["name"] == "vendor-cc"
    with pytest.raises(SourceError, match="not in the model registry"):
        run_flow(suspect, source=f"models:/{suspect['name']}/7")
    with pytest.raises(SourceError, match="expected models:/NAME/VERSION"):
        run_flow(suspect, source=f"models:/{suspect['name']}")


def test_work_directory_is_not_shared_across_code_versions(tmp_path, monkeypatch):
    from tasks import steps

    config = {"defend": {"ratio": 2.0}}
    first = steps.working_dir(tmp_path, "ab" * 32, config)
    assert steps.working_dir(tmp_path, "ab" * 32, config) == first
    monkeypatch.setattr(steps, "code_version", lambda: "0.0.0+another")
    assert steps.working_dir(tmp_path, "ab" * 32, config) != first


def test_flow_with_the_scans_own_images_ends_where_defend_does(suspect, tmp_path):
    """Two sets of synthetic images, the scan's joining the fine-tune, and a student anchored to
    itself where no teacher is verified: the flow's tasks hand each step what cc_core.defend gives
    it, so both end at the same weights."""
    from cc_core import load_model
    from cc_core.defense import defend, resolve_config

    overrides = TINY | {"synth": TINY["synth"] | {"tv_weight": 0.5}, "scan_synth": {"tv_weight": 0.0},
                        "finetune_on_scan_synthetic": True, "bn_match_samples": 16,
                        "bn_match_scope": "always", "kd_gate": "verified", "self_anchor": True}
    result = run_flow(suspect, overrides=overrides)
    report = result["report"]
    assert report["distillation"]["self_anchored"], report["distillation"]
    assert report["timings_s"]["synthesize_scan"] > 0 and report["timings_s"]["synthesize"] > 0
    c = registry(suspect)
    flow_model = load_model(c.download_artifacts(result["run_id"], "package/finetuned.safetensors", str(tmp_path)))
    direct = defend(load_model(suspect["file"]), config=resolve_config("cpu", ratio=2.0, **overrides), progress=False,
                    log=lambda *a: None)
    assert report["scan"]["synthetic_excluded"] == direct.report["scan"]["synthetic_excluded"]
    flow_state, direct_state = flow_model.state_dict(), direct.model.state_dict()
    assert flow_state.keys() == direct_state.keys()
    for k, v in direct_state.items():
        assert torch.equal(flow_state[k], v), k


def test_scan_settings_are_validated_at_the_edge():
    from cc_core.errors import ConfigError
    from flows.clean_compact import ScanSettings

    assert ScanSettings.from_dict(None).patch_cfg["sizes"] == (2, 3, 4, 5)  # the probe's defaults
    assert ScanSettings.from_dict({"patch_probe": None}).patch_cfg is None
    assert ScanSettings.from_dict({"patch_probe": {"sizes": [3]}}).patch_cfg["sizes"] == (3,)
    with pytest.raises(ConfigError, match="patch probe settings"):
        ScanSettings.from_dict({"patch_probe": {"size": 3}})
    with pytest.raises(ConfigError, match="patch probe values"):
        ScanSettings.from_dict({"patch_probe": {"values": [0.5]}})
    with pytest.raises(ConfigError, match="scan settings"):
        ScanSettings.from_dict({"warp": True})


def test_audit_scans_due_versions_once_and_cleans_by_policy(suspect):
    from flows.audit import audit_flow
    from tasks.registry import register_suspect

    register_suspect(suspect["tracking_uri"], suspect["name"], suspect["file"])  # version 2
    common = {"tracking_uri": suspect["tracking_uri"], "work_root": suspect["work_root"], "scan": TINY_SCAN,
              "overrides": TINY, "gates": OPEN_GATES, "names": [suspect["name"]]}
    rows = audit_flow(policy="clean-all", **common)
    assert [(r["name"], r["version"]) for r in rows] == [(suspect["name"], 1), (suspect["name"], 2)]
    assert all(r["clean_status"] == "promoted" for r in rows)
    audit_run = registry(suspect).get_run(rows[0]["audit_run_id"])
    assert "scan.warp_flip_rate" in audit_run.data.metrics  # the audit scans as `cleancompact scan` does
    tags = registry(suspect).get_model_version(suspect["name"], "1").tags
    assert tags["cc.audit.verdict"] in ("flagged", "clear") and float(tags["cc.audit.concentration"]) >= 0
    assert audit_flow(policy="clean-all", **common) == []  # audited recently, outputs never audited
    assert len(audit_flow(policy="scan-only", max_age_hours=0, **common)) == 2

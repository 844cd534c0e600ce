"""Real servers on loopback: mlflow server, prefect server, a process worker running the
deployments of prefect.yaml, and a bridge. Registering model versions must get each one
cleaned and registered exactly once, within a bounded time; every process is stopped after."""
import pytest
import yaml

from cc_core import save_model
from deploy.local import PROJECT_DIR, LocalStack, http_ok, wait_until
from tests.helpers import tiny_model
from tests.test_flows import OPEN_GATES, TINY, TINY_SCAN

pytestmark = pytest.mark.integration
TIMEOUT_S = 300


def tiny_prefect_file(tmp_path):
    """prefect.yaml with the tiny settings as deployment parameters (same entrypoints, trigger)."""
    spec = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        d["parameters"] = {**d.get("parameters", {}), "overrides": TINY, "scan": TINY_SCAN, "gates": OPEN_GATES}
        if d["name"] == "clean-compact":
            d["parameters"]["latency_batch"] = 4
    path = tmp_path / "prefect-test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cleaned_sources(uri: str) -> list[str]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return sorted(v.tags.get("cc.source") for v in c.search_model_versions("name = 'vendor-net-cc'"))
    except Exception:
        return []


def clean_compact_runs(api: str) -> list[dict]:
    """Every flow run of the clean-compact flow (the audit deployment's cron runs are not counted)."""
    import json
    import urllib.request

    body = json.dumps({"flows": {"name": {"any_": ["clean-compact"]}}}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def finished(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("state_type") not in ("SCHEDULED", "PENDING", "RUNNING")]


@pytest.mark.parametrize("bridge, versions", [("watcher", 2), ("webhook", 1)])
def test_registration_triggers_cleaning_exactly_once(tmp_path, bridge, versions):
    from tasks.registry import register_suspect

    stack = LocalStack(tmp_path / "stack", bridge=bridge, prefect_file=tiny_prefect_file(tmp_path))
    try:
        stack.start()
        model = save_model(tiny_model(), tmp_path / "vendor.safetensors")
        for _ in range(versions):
            register_suspect(stack.mlflow_uri, "vendor-net", model)
        expected = [f"models:/vendor-net/{v}" for v in range(1, versions + 1)]
        wait_until(lambda: cleaned_sources(stack.mlflow_uri) == expected, TIMEOUT_S, interval=2,
                   what=f"{versions} cleaned versions registered")
        assert all(stack.alive().values()), stack.alive()
        try:
            wait_until(lambda: len(finished(clean_compact_runs(stack.prefect_api))) == versions, 60,
                       what="flow runs finished")
        except TimeoutError as e:
            states = [(r["name"], r.get("state_name")) for r in clean_compact_runs(stack.prefect_api)]
            raise AssertionError(f"{e}; clean-compact runs: {states}") from e
        assert all(r["state_type"] == "COMPLETED" for r in clean_compact_runs(stack.prefect_api))
    finally:
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (stack.home / "logs").glob("*.log")}
        procs = [proc for _, proc in stack.processes]
        stack.stop()
    assert all(proc.poll() is not None for proc in procs)
    assert not http_ok(f"{stack.mlflow_uri}/health") and not http_ok(f"{stack.prefect_api}/health")
    assert "Traceback" not in logs.get("worker.log", ""), logs.get("worker.log")

"""MLflow plumbing shared by the tasks: where the store is, experiments, one run per flow.

Every task gets a :class:`RunHandle` (tracking URI + run id + work directory) as an explicit
input and logs through ``MlflowClient`` with that run id, so tasks may run in any thread or
process (no reliance on MLflow's thread-local active run).
"""
from __future__ import annotations

import json
import math
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXPERIMENTS = ("cleancompact", "cleancompact-audit", "cleancompact-bench", "cleancompact-sources")
PARAM_MAX_CHARS = 6000  # MLflow 3 rejects longer parameter values


def cc_home() -> Path:
    """``$CC_HOME``, else ``$XDG_CACHE_HOME/cleancompact`` (``~/.cache/cleancompact``)."""
    if os.environ.get("CC_HOME"):
        return Path(os.environ["CC_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cleancompact"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded default: SQLite under :func:`cc_home`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = cc_home() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db.resolve()}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact location for experiments we create on a local SQLite store (beside the db);
    None (the server's default) for anything else."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri(),
                        registry_uri=tracking_uri or default_tracking_uri())


@contextmanager
def mlflow_globals(tracking_uri: str):
    """Point MLflow's process-wide tracking and registry URIs at ``tracking_uri`` for the block
    (fluent APIs such as ``mlflow.onnx.log_model`` read them), then restore the previous ones so
    later clients in the same process are not silently redirected."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # the setters export these too
    saved_env = {k: os.environ.get(k) for k in env_names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with a local artifact root on SQLite) if missing.

    Created up front and passed by id: ``set_experiment`` races between processes (docs/STACK.md)."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:  # created meanwhile by another process
        return c.get_experiment_by_name(name).experiment_id


@dataclass(frozen=True)
class RunHandle:
    """What a task needs to log into the flow's run and find the flow's files."""

    tracking_uri: str
    run_id: str
    work_dir: str

    @property
    def client(self):
        return client(self.tracking_uri)

    @property
    def path(self) -> Path:
        return Path(self.work_dir)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_params(run: RunHandle, params: dict, prefix: str = "") -> None:
    """Log a (nested) dict as parameters; values are JSON text, cut at MLflow's limit."""
    from mlflow.entities import Param

    existing = run.client.get_run(run.run_id).data.params
    items = []
    for key, value in flatten(params, prefix).items():
        text = value if isinstance(value, str) else json.dumps(value)
        text = text[:PARAM_MAX_CHARS]
        if key not in existing:  # a resumed run must not re-log (MLflow forbids changing a param)
            items.append(Param(key, text))
    for i in range(0, len(items), 100):
        run.client.log_batch(run.run_id, params=items[i:i + 100])


def log_metrics(run: RunHandle, metrics: dict, prefix: str = "", step: int = 0) -> None:
    """Log the finite numbers of a (nested) dict as metrics; None and NaN are skipped."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in flatten(metrics, prefix).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(items), 500):
        run.client.log_batch(run.run_id, metrics=items[i:i + 500])


def log_artifact(run: RunHandle, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    run.client.log_artifact(run.run_id, str(path), artifact_path)


def log_json(run: RunHandle, obj: dict, name: str, artifact_path: str | None = None) -> Path:
    """Write ``obj`` to the work directory as ``name`` and log it."""
    path = run.path / "artifacts" / (artifact_path or "") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    log_artifact(run, path, artifact_path)
    return path


def fail_run(run: RunHandle, error: BaseException) -> None:
    """Mark the run FAILED with the error as a tag and the traceback as ``error.txt``."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path = run.path / "artifacts" / "error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    c = run.client
    c.set_tag(run.run_id, "cc.status", "failed")
    c.set_tag(run.run_id, "cc.error", f"{type(error).__name__}: {error}"[:5000])
    c.log_artifact(run.run_id, str(path))
    c.set_terminated(run.run_id, "FAILED")

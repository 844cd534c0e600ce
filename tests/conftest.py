import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Prefect and MLflow read these at import time (docs/STACK.md, "Environment for tests/CI").
_STATE = Path(tempfile.mkdtemp(prefix="cc-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_STATE / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "CC_HOME": str(_STATE / "cc-home"),
    # Prefect (re)builds its console handlers on the sys.stderr of that moment: inside a test that
    # captures output that is the test's own stream, closed when it ends, and every later flow then
    # fails writing its logs ("I/O operation on closed file"). The process's stderr stays open.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM": "ext://sys.__stderr__",
    "PREFECT_LOGGING_HANDLERS_DEBUG_STREAM": "ext://sys.__stderr__",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def tiny_file(tmp_path):
    """tests.helpers.tiny_model saved as a model file."""
    from cc_core import save_model
    from tests.helpers import tiny_model

    return save_model(tiny_model(), tmp_path / "tiny.safetensors")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (~7 s), flow heartbeats off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture(scope="session")
def _mlflow_template():
    """An MLflow SQLite database migrated once per session; tests copy it (ms, not seconds)."""
    from mlflow import MlflowClient

    path = _STATE / "template" / "mlflow.db"
    path.parent.mkdir(parents=True)
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def mlflow_uri(tmp_path, _mlflow_template):
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(_mlflow_template, db)
    return f"sqlite:///{db}"

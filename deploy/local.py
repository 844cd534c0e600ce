"""Start the whole pipeline on one machine: ``mlflow server`` (SQLite + local artifacts),
``prefect server``, a process work pool with the deployments of prefect.yaml, a worker, and a
bridge (registry watcher or webhook receiver). Every process is started with its own PID and
stopped with SIGTERM (then SIGKILL) by :meth:`LocalStack.stop`.

Used by ``cleancompact up`` and by the integration test.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
POOL = "cleancompact"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f} s")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@dataclass
class LocalStack:
    """Processes of a local deployment; state (databases, artifacts, logs) under ``home``."""

    home: Path
    bridge: str = "watcher"  # watcher | webhook
    mlflow_port: int = 0
    prefect_port: int = 0
    webhook_port: int = 0
    prefect_file: Path | None = None  # default: the project's prefect.yaml
    extra_env: dict = field(default_factory=dict)
    processes: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bridge not in ("watcher", "webhook"):
            raise ValueError(f"bridge must be 'watcher' or 'webhook', got {self.bridge!r}")
        self.home = Path(self.home).resolve()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.mlflow_port = self.mlflow_port or free_port()
        self.prefect_port = self.prefect_port or free_port()
        self.webhook_port = self.webhook_port or free_port()
        self.secret = os.environ.get("CC_WEBHOOK_SECRET") or secrets.token_hex(16)

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "PREFECT_HOME": str(self.home / "prefect"), "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "CC_HOME": str(self.home / "cc"), "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.home / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append((name, proc))
        return proc

    def _run(self, cmd: list[str], timeout: float = 120) -> str:
        out = subprocess.run(cmd, cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start(self, timeout: float = 120) -> "LocalStack":
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        db = self.home / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        self._spawn("mlflow", [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--artifacts-destination", str(self.home / "mlflow" / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"])
        self._spawn("prefect-server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.prefect_port)])
        wait_until(lambda: http_ok(f"{self.prefect_api}/health"), timeout, what="prefect server /health")
        self._run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"])
        deploy = [_bin("prefect"), "--no-prompt", "deploy", "--all"]
        if self.prefect_file:
            deploy += ["--prefect-file", str(self.prefect_file)]
        self._run(deploy, timeout=180)
        self._spawn("worker", [_bin("prefect"), "worker", "start", "--pool", POOL])
        wait_until(lambda: http_ok(f"{self.mlflow_uri}/health"), timeout, what="mlflow server /health")
        cli = _bin("cleancompact")
        if self.bridge == "watcher":
            state = self.home / "watcher-state.json"
            self._spawn("watcher", [cli, "watch", "--tracking-uri", self.mlflow_uri, "--interval", "2",
                                    "--state-file", str(state)])
            # Versions registered before the watcher's first snapshot count as already seen.
            wait_until(state.exists, timeout, what="registry watcher's first snapshot")
        else:
            self._spawn("webhook", [cli, "webhook", "--port", str(self.webhook_port), "--secret", self.secret,
                                    "--tracking-uri", self.mlflow_uri])
            wait_until(lambda: http_ok(f"http://127.0.0.1:{self.webhook_port}/health"), timeout,
                       what="webhook receiver /health")
            from deploy.webhook import PATH, register_webhook

            register_webhook(self.mlflow_uri, f"http://127.0.0.1:{self.webhook_port}{PATH}", self.secret)

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.processes}

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every started process group (the worker's flow runs included), then SIGKILL."""
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.processes.clear()

"""Bridges from MLflow to Prefect events: webhook signature checks, watcher bookkeeping."""
import json
import time

import pytest

from cc_core import save_model
from deploy.webhook import DELIVERY_HEADER, PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER, create_app, signature
from deploy.watcher import RegistryWatcher
from tests.helpers import tiny_model

SECRET = "s3cret"


def delivery(body: dict, secret: str = SECRET, delivery_id: str = "d-1", ts: int | None = None):
    raw = json.dumps(body).encode()
    ts = str(ts if ts is not None else int(time.time()))
    return raw, {SIGNATURE_HEADER: signature(secret, delivery_id, ts, raw), TIMESTAMP_HEADER: ts,
                 DELIVERY_HEADER: delivery_id, "Content-Type": "application/json"}


CREATED = {"entity": "model_version", "action": "created", "timestamp": "2026-11-23T00:00:00+00:00",
           "data": {"name": "vendor-net", "version": "3", "source": "models:/m-1", "run_id": "r", "tags": {},
                    "description": None}}


@pytest.fixture()
def receiver():
    from fastapi.testclient import TestClient

    emitted = []
    app = create_app(SECRET, emit=lambda name, version, **kw: emitted.append((name, int(version))))
    return TestClient(app), emitted


def test_signature_matches_mlflow_sender():
    """Our verifier accepts exactly what MLflow's own delivery code signs."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert signature(SECRET, "d", "123", b'{"a": 1}') == _generate_hmac_signature(SECRET, "d", "123", '{"a": 1}')


def test_webhook_emits_once_per_authentic_delivery(receiver):
    client, emitted = receiver
    raw, headers = delivery(CREATED)
    assert client.post(PATH, content=raw, headers=headers).json() == {"status": "emitted"}
    assert client.post(PATH, content=raw, headers=headers).json() == {"status": "duplicate"}  # MLflow retry
    assert emitted == [("vendor-net", 3)]


@pytest.mark.parametrize("tamper, reason", [
    (lambda raw, h: (raw.replace(b"vendor", b"evil!!"), h), "bad signature"),
    (lambda raw, h: (raw, h | {SIGNATURE_HEADER: signature("wrong", h[DELIVERY_HEADER], h[TIMESTAMP_HEADER], raw)}),
     "bad signature"),
    (lambda raw, h: (raw, {k: v for k, v in h.items() if k != SIGNATURE_HEADER}), "missing signature headers"),
])
def test_webhook_rejects_forgeries(receiver, tamper, reason):
    client, emitted = receiver
    raw, headers = tamper(*delivery(CREATED))
    r = client.post(PATH, content=raw, headers=headers)
    assert r.status_code == 401 and r.json()["detail"] == reason and emitted == []


def test_webhook_rejects_replays_and_ignores_other_events(receiver):
    client, emitted = receiver
    raw, headers = delivery(CREATED, ts=int(time.time()) - 3600)
    assert client.post(PATH, content=raw, headers=headers).status_code == 401
    raw, headers = delivery({**CREATED, "action": "deleted"}, delivery_id="d-2")
    assert client.post(PATH, content=raw, headers=headers).json() == {"status": "ignored"}
    output = {**CREATED, "data": {**CREATED["data"], "name": "vendor-net-cc"}}
    raw, headers = delivery(output, delivery_id="d-3")
    assert client.post(PATH, content=raw, headers=headers).json() == {"status": "ignored"}  # our own output
    assert emitted == []


def test_watcher_announces_each_new_version_once_across_restarts(tmp_path, mlflow_uri):
    from tasks.registry import register_suspect

    path = save_model(tiny_model(), tmp_path / "m.safetensors")
    register_suspect(mlflow_uri, "old-model", path)
    emitted = []

    def emit(name, version, **kw):
        emitted.append((name, int(version)))

    state = tmp_path / "state.json"
    watcher = RegistryWatcher(mlflow_uri, state, emit=emit)
    assert watcher.poll_once() == []  # versions present at first start are the audit's job
    for _ in range(3):
        register_suspect(mlflow_uri, "vendor-net", path)
    assert watcher.poll_once() == ["vendor-net/1", "vendor-net/2", "vendor-net/3"]
    restarted = RegistryWatcher(mlflow_uri, state, emit=emit)
    assert restarted.poll_once() == []
    assert emitted == [("vendor-net", 1), ("vendor-net", 2), ("vendor-net", 3)]

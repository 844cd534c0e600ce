"""Receiver for MLflow webhooks: verify the HMAC signature, emit the same event as the watcher.

MLflow signs each delivery as ``X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret,
"{delivery_id}.{timestamp}.{body}")>`` with ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp``
headers. Requests with a bad signature, a timestamp outside ``max_skew_s`` (replays) or a
delivery id seen before (MLflow retries) do not emit anything. Webhooks fire only for writes
through ``mlflow server`` with a SQL store (docs/STACK.md); :func:`register_webhook` creates one.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict

from fastapi import FastAPI, HTTPException, Request

from deploy.events import emit_model_version_created, is_source

log = logging.getLogger("cleancompact.webhook")
SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
PATH = "/mlflow/webhook"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1,<base64>`` signature MLflow sends for ``body``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers, body: bytes, max_skew_s: float = 300.0, now: float | None = None) -> str | None:
    """None if the delivery is authentic and fresh, else the reason it is not."""
    sig, ts, delivery = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER), headers.get(DELIVERY_HEADER)
    if not (sig and ts and delivery):
        return "missing signature headers"
    try:
        age = abs((now or time.time()) - int(ts))
    except ValueError:
        return "malformed timestamp"
    if age > max_skew_s:
        return f"timestamp {age:.0f} s away from now (max {max_skew_s:.0f})"
    if not hmac.compare_digest(sig, signature(secret, delivery, ts, body)):
        return "bad signature"
    return None


def create_app(secret: str, tracking_uri: str | None = None, emit=emit_model_version_created,
               max_skew_s: float = 300.0, remember: int = 10000):
    """The FastAPI app: ``POST /mlflow/webhook`` and ``GET /health``."""
    if not secret:
        raise ValueError("a webhook secret is required (the same one given to MLflow)")
    app = FastAPI(title="cleancompact MLflow webhook receiver")
    seen: OrderedDict[str, None] = OrderedDict()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post(PATH)
    async def receive(request: Request) -> dict:
        body = await request.body()
        problem = verify(secret, request.headers, body, max_skew_s)
        if problem:
            log.warning("rejected delivery: %s", problem)
            raise HTTPException(status_code=401, detail=problem)
        delivery = request.headers[DELIVERY_HEADER]
        if delivery in seen:
            return {"status": "duplicate"}
        try:
            message = json.loads(body)
        except json.JSONDecodeError:
            raise HTTPException(status_code=400, detail="body is not JSON") from None
        seen[delivery] = None
        while len(seen) > remember:
            seen.popitem(last=False)
        if (message.get("entity"), message.get("action")) != ("model_version", "created"):
            return {"status": "ignored"}
        data = message.get("data") or {}
        if not is_source(data.get("name", ""), data.get("tags")):
            return {"status": "ignored"}
        emit(data["name"], data["version"], via="webhook", tracking_uri=tracking_uri)
        log.info("model version %s/%s: event emitted", data["name"], data["version"])
        return {"status": "emitted"}

    return app


def register_webhook(tracking_uri: str, url: str, secret: str, name: str = "cleancompact"):
    """Create (once) the MLflow webhook that posts ``model_version.created`` to ``url``."""
    from tasks.tracking import client

    c = client(tracking_uri)
    for hook in c.list_webhooks():
        if hook.name == name and hook.url == url:
            return hook
    return c.create_webhook(name=name, url=url, events=["model_version.created"], secret=secret)


def main(host: str, port: int, secret: str, tracking_uri: str | None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(secret, tracking_uri), host=host, port=port, log_level="info")
    return 0

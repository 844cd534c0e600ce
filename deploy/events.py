"""The one Prefect event both bridges emit for a new suspect model version.

The ``clean-compact`` deployment's trigger (prefect.yaml) expects ``EVENT`` and reads the source
URI from the resource, so the watcher (polling, any store) and the webhook receiver (push, SQL
store behind ``mlflow server``) are interchangeable.
"""
from __future__ import annotations

EVENT = "mlflow.model_version.created"
RESOURCE_PREFIX = "mlflow.model-version"


def is_source(name: str, tags: dict | None) -> bool:
    """Versions we clean: not our own outputs (``*-cc``, tagged ``cc.role=output``)."""
    from tasks.registry import CLEANED_SUFFIX

    tags = tags or {}
    return not name.endswith(CLEANED_SUFFIX) and tags.get("cc.role") != "output" and "cc.source" not in tags


def emit_model_version_created(name: str, version: int | str, via: str, tracking_uri: str | None = None):
    """Emit the event for ``models:/name/version``; returns the Event (None if not sent)."""
    from prefect.events import emit_event

    version = int(version)  # str over REST, int over SQLite (docs/STACK.md)
    return emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}.{name}.{version}",
                  "mlflow.model.name": name, "mlflow.model.version": str(version),
                  "mlflow.model.uri": f"models:/{name}/{version}"},
        payload={"via": via, "tracking_uri": tracking_uri},
    )

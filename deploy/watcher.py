"""Registry watcher: poll MLflow for new model versions and emit one Prefect event per version.

Works with any MLflow store (SQLite, PostgreSQL, REST). Its state file lists the versions it has
announced, written after each successful emit, so a restart neither loses nor repeats events. On
first start the versions already in the registry are recorded as seen (the scheduled audit is
what covers old versions) unless ``announce_existing`` is set.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

from cc_core.fileio import atomic_path
from deploy.events import emit_model_version_created, is_source

log = logging.getLogger("cleancompact.watcher")


class RegistryWatcher:
    def __init__(self, tracking_uri: str, state_file: str | Path, announce_existing: bool = False,
                 emit=emit_model_version_created):
        self.tracking_uri = tracking_uri
        self.state_file = Path(state_file)
        self.emit = emit
        self.stop_event = threading.Event()
        if self.state_file.exists():
            self.seen = set(json.loads(self.state_file.read_text())["seen"])
        else:
            self.seen = set() if announce_existing else {self._key(n, v) for n, v in self._sources()}
            self._save()

    @staticmethod
    def _key(name: str, version) -> str:
        return f"{name}/{int(version)}"

    def _sources(self) -> list[tuple[str, int]]:
        from tasks.tracking import client

        c = client(self.tracking_uri)
        out = []
        for rm in c.search_registered_models():
            for v in c.search_model_versions(f"name = '{rm.name}'"):
                if is_source(v.name, v.tags):
                    out.append((v.name, int(v.version)))
        return sorted(out)

    def _save(self) -> None:
        with atomic_path(self.state_file) as tmp:
            Path(tmp).write_text(json.dumps({"seen": sorted(self.seen)}, indent=1))

    def poll_once(self) -> list[str]:
        """Emit events for versions not seen before; returns their keys."""
        emitted = []
        for name, version in self._sources():
            key = self._key(name, version)
            if key in self.seen:
                continue
            self.emit(name, version, via="watcher", tracking_uri=self.tracking_uri)
            self.seen.add(key)
            self._save()
            emitted.append(key)
            log.info("new model version %s: event emitted", key)
        return emitted

    def run(self, interval: float = 5.0) -> None:
        """Poll until SIGTERM/SIGINT; a failed poll (store unreachable) is logged and retried."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        log.info("watching %s every %.0f s (state %s)", self.tracking_uri, interval, self.state_file)
        while not self.stop_event.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep watching through transient store/API errors
                log.warning("poll failed: %s: %s", type(e).__name__, e)
            self.stop_event.wait(interval)
        log.info("watcher stopped")


def main(tracking_uri: str, state_file: str, interval: float, announce_existing: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    RegistryWatcher(tracking_uri, state_file, announce_existing).run(interval)
    return 0


"""Serving, the registry watcher / webhook bridge, and server start-up helpers."""

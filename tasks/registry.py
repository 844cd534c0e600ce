"""Model registry conventions (docs/ARCHITECTURE.md, "MLflow conventions").

A suspect model version holds its weights as plain files (``.safetensors`` or a state dict,
optionally ``attack.json`` beside them); the cleaned model is registered as ``<source>-cc`` with
tags ``cc.source``, ``cc.ratio``, ``cc.status``, ``cc.gate.*``; alias ``candidate`` marks every
completed run's version and ``champion`` moves only when the gates pass.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cc_core.errors import InputError

CLEANED_SUFFIX = "-cc"
MODEL_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


class SourceError(InputError):
    """A source model URI that does not resolve to a usable model."""


@dataclass(frozen=True)
class Source:
    """A resolved suspect: canonical URI (versions pinned), local files, content digest."""

    uri: str
    name: str
    version: int | None
    model_file: str
    attack_dir: str | None
    sha256: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None, "champion")."""
    m = _URI.match(uri)
    if not m:
        raise SourceError(f"not a registry model URI: {uri!r} (expected models:/NAME/VERSION or "
                          "models:/NAME@ALIAS)")
    return m["name"], m["version"], m["alias"]


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_model_file(directory: Path) -> Path:
    """The weights file in a downloaded model version: ``model.safetensors`` if present, else
    the only file with a model suffix (MLflow's pytorch flavor keeps it under ``data/``)."""
    preferred = directory / "model.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
    if len(found) != 1:
        listing = ", ".join(str(p.relative_to(directory)) for p in found) or "none"
        raise SourceError(f"expected exactly one model file ({'/'.join(MODEL_FILE_SUFFIXES)}) in the "
                          f"model version's artifacts, found {listing}")
    return found[0]


def resolve_source(tracking_uri: str, uri: str, dest: Path) -> Source:
    """Download (registry URI) or locate (file/directory) the suspect model; nothing is loaded."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client as make_client

    client = make_client(tracking_uri)
    dest.mkdir(parents=True, exist_ok=True)
    if uri.startswith("models:/"):
        name, version, alias = parse_model_uri(uri)
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, version))
        except MlflowException as e:
            raise SourceError(f"{uri} is not in the model registry ({e.error_code})") from None
        version = int(mv.version)
        files = dest / "source"
        if files.exists():
            shutil.rmtree(files)
        local = Path(_download(client, tracking_uri, name, version, files))
        canonical = f"models:/{name}/{version}"
    else:
        local = Path(uri).expanduser()
        if not local.exists():
            raise SourceError(f"model not found: {local}")
        name, version, canonical = local.stem if local.is_file() else local.name, None, str(local.resolve())
    model_file = local if local.is_file() else find_model_file(local)
    attack = model_file.parent / "attack.json"
    return Source(uri=canonical, name=name, version=version, model_file=str(model_file),
                  attack_dir=str(attack.parent) if attack.is_file() else None, sha256=sha256(model_file))


def _download(client, tracking_uri: str, name: str, version: int, dest: Path) -> str:
    import mlflow.artifacts

    uri = client.get_model_version_download_uri(name, str(version))
    dest.mkdir(parents=True, exist_ok=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                               tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_registered_model(client, name: str, description: str | None = None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile
            pass


def register_suspect(tracking_uri: str, name: str, model_file: str | Path,
                     attack_dir: str | Path | None = None, tags: dict | None = None,
                     description: str | None = None) -> int:
    """Register a model file (and optionally its attack spec, for ASR measurement) as a new
    version of ``name``: the files are logged to a run of experiment ``cleancompact-sources``
    and the version points at them. Returns the version number."""
    from tasks.tracking import client as make_client
    from tasks.tracking import ensure_experiment

    model_file = Path(model_file)
    if not model_file.is_file():
        raise SourceError(f"model file not found: {model_file}")
    c = make_client(tracking_uri)
    exp = ensure_experiment(tracking_uri, "cleancompact-sources")
    run = c.create_run(exp, tags={"cc.role": "source", "mlflow.runName": f"register-{name}"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp) / "model"
            staging.mkdir()
            shutil.copy2(model_file, staging / f"model{model_file.suffix}")
            if attack_dir is not None:
                for f in ("attack.json", "attack.safetensors"):
                    if (Path(attack_dir) / f).is_file():
                        shutil.copy2(Path(attack_dir) / f, staging / f)
            c.log_artifacts(run.info.run_id, str(staging), "model")
        c.set_terminated(run.info.run_id, "FINISHED")
    except Exception:
        c.set_terminated(run.info.run_id, "FAILED")
        raise
    ensure_registered_model(c, name, description)
    mv = c.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                tags={"cc.role": "source", **(tags or {})}, description=description)
    return int(mv.version)


def cleaned_versions(client, target: str, source_uri: str, config_hash: str | None = None) -> list:
    """Versions of ``target`` made from ``source_uri`` (with ``config_hash``, if given)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{target}'")
    except MlflowException:
        return []
    return sorted((v for v in versions if v.tags.get("cc.source") == source_uri
                   and (config_hash is None or v.tags.get("cc.config_hash") == config_hash)),
                  key=lambda v: int(v.version))


def alias_version(client, name: str, alias: str) -> int | None:
    """The version an alias points at, or None (read via the alias API: search results leave
    ``aliases`` empty, docs/STACK.md)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None

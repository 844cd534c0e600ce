"""Safe model files: nothing in a model file is ever executed.

Reads ``.safetensors`` and PyTorch state dicts (``torch.load(weights_only=True)``, which
refuses pickled code); writes ``.safetensors`` whose metadata rebuilds the module, compacted
ones included (docs/ARCHITECTURE.md, "Model files"). The format is detected from the file's bytes,
not its name. Every problem with the input raises a :class:`~cc_core.errors.ModelFileError`
subclass whose message says what is wrong and what to do.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from cc_core.compact.layers import model_structure
from cc_core.errors import (
    ConfigError,
    ModelFileError,
    ModelFileNotFoundError,
    NonFiniteWeightsError,
    StateDictMismatchError,
    UnsafeModelFileError,
)
from cc_core.fileio import atomic_path
from cc_core.models import ModelSpec, build_model, get_arch

MODEL_FORMAT = "cleancompact.model/1"
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
_PREFIXES = ("module.", "_orig_mod.")
_LIST_LIMIT = 5


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _sniff(path: Path) -> str:
    """'safetensors', 'torch' or raise: decided from the first bytes of the file."""
    if not path.exists():
        raise ModelFileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): the file was not written completely")
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    raise ModelFileError(
        f"{path} is not a model file: expected a .safetensors file or a PyTorch state dict "
        "(.pt/.pth written by torch.save)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    if 8 + header_len > path.stat().st_size:
        raise ModelFileError(f"{path} is truncated: its safetensors header alone needs "
                             f"{8 + header_len:,} bytes but the file has {path.stat().st_size:,}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is truncated or corrupt ({e})") from None
    return tensors, metadata


def _read_torch(path: Path, allow_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise UnsafeModelFileError(
                f"refused to load {path}: it contains pickled Python objects (for example a "
                "whole nn.Module), and unpickling them could run code from the file. Save a "
                "state dict instead (torch.save(model.state_dict(), path)) or a .safetensors "
                "file; only if you trust the file's origin, opt in with allow_pickle=True "
                "(CLI: --allow-pickle)") from None
        raise ModelFileError(f"{path} is not a readable PyTorch file ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
        raise ModelFileError(f"{path} is truncated or corrupt: torch.load failed "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _unwrap(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and any metadata from common checkpoint layouts."""
    meta: dict = {}
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("arch", "model_name", "num_classes", "width"):
            if isinstance(obj.get(key), (str, int, float)):
                meta["arch" if key == "model_name" else key] = obj[key]
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
        if nested is None:
            raise ModelFileError(
                f"{path} holds a dict without weights: expected a state dict (name -> tensor) "
                f"or a checkpoint with one of the keys {', '.join(_NESTED_KEYS)}")
        return _unwrap(nested, path)[0], meta
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, not a state dict "
                             "(a dict of parameter name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path} is not a state dict: entries {_listing(bad)} are not tensors")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, meta


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    bad = []
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise NonFiniteWeightsError(f"{path} holds NaN or Inf values in {len(bad)} tensors: "
                                    f"{_listing(bad)}; the model is broken and cannot be cleaned")


def _infer_spec(state: dict[str, torch.Tensor], meta: dict, arch: str | None,
                num_classes: int | None, path: Path) -> ModelSpec:
    spec = None
    if "spec" in meta:
        spec = ModelSpec.from_dict(meta["spec"])
    arch = arch or (spec.arch if spec else meta.get("arch"))
    if arch is None:
        raise ModelFileError(
            f"{path} does not say which architecture it is: pass arch=... (CLI: --arch)")
    entry = get_arch(arch)
    if spec is not None:
        if entry.name != spec.arch:
            raise ConfigError(f"{path} is a {spec.arch} but arch={arch!r} was given")
        if num_classes is not None and num_classes != spec.num_classes:
            raise ConfigError(f"{path} has {spec.num_classes} classes but num_classes="
                              f"{num_classes} was given")
        return spec
    head, stem = state.get(entry.head), state.get(entry.stem)
    if num_classes is None:
        num_classes = int(meta.get("num_classes") or (head.shape[0] if head is not None and head.ndim == 2 else 0))
        if not num_classes:
            raise ModelFileError(f"{path} does not say its number of classes: pass "
                                 "num_classes=... (CLI: --num-classes)")
    width = float(meta.get("width") or (stem.shape[0] / entry.stem_channels if stem is not None else 1.0))
    return ModelSpec(arch=entry.name, num_classes=int(num_classes), width=width)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise StateDictMismatchError(
            f"{path} does not match {spec.arch} (width {spec.width:g}, {spec.num_classes} "
            f"classes): {'; '.join(parts)}. Is --arch right?")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise StateDictMismatchError(
            f"{path} does not match {spec.arch} (width {spec.width:g}, {spec.num_classes} "
            f"classes): shape mismatch for {_listing(wrong)}. Are --num-classes and --width right?")
    model.load_state_dict(state, strict=False)


def read_metadata(path: str | os.PathLike) -> dict:
    """The cleancompact metadata of a ``.safetensors`` model (spec, plan summary), parsed."""
    path = Path(path)
    if _sniff(path) != "safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path} is truncated or corrupt ({e})") from None
    return _parse_metadata(raw, path)


def _parse_metadata(raw: dict[str, str], path: Path) -> dict:
    if raw.get("format") != MODEL_FORMAT:
        return {}
    try:
        return {k: json.loads(v) if k in ("spec", "plan") else v for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} has corrupt cleancompact metadata ({e})") from None


def load_model(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
               *, allow_pickle: bool = False) -> nn.Module:
    """Load a model without executing anything from the file.

    ``arch``/``num_classes`` are needed only where the file does not say them (a bare state
    dict; ``num_classes`` and width are read off the weights when possible). Returns the module
    in eval mode, with its :class:`ModelSpec` as ``model.cc_spec``.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        state, raw = _read_safetensors(path)
        meta = _parse_metadata(raw, path)
    else:
        state, meta = _unwrap(_read_torch(path, allow_pickle), path)
    _check_finite(state, path)
    spec = _infer_spec(state, meta, arch, num_classes, path)
    model = build_model(**spec.to_dict())
    _load_state(model, state, spec, path)
    return model.eval()


def save_model(model: nn.Module, path: str | os.PathLike, *, spec: ModelSpec | None = None,
               plan=None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as ``.safetensors`` with the metadata that rebuilds it.

    ``spec`` defaults to ``model.cc_spec``; its ``structure`` is always re-read from the module,
    so a compacted model reloads with its factorized layers. ``plan`` (a CompactionPlan) adds a
    summary of the compression. The write is atomic: a failure leaves no partial file.
    """
    from safetensors.torch import save_file

    spec = spec or getattr(model, "cc_spec", None)
    if spec is None:
        raise ConfigError("the model carries no ModelSpec: build it with build_model() or pass "
                          "spec=ModelSpec(arch=..., num_classes=...)")
    spec = spec.replace(structure=model_structure(model))
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"model files are written as .safetensors, got {path.name!r}")
    meta = {"format": MODEL_FORMAT, "spec": json.dumps(spec.to_dict())}
    if plan is not None:
        summary = {k: v for k, v in plan.to_dict().items() if k not in ("layers",)}
        meta["plan"] = json.dumps(summary)
    for k, v in (metadata or {}).items():
        if k in meta:
            raise ConfigError(f"metadata key {k!r} is reserved")
        meta[k] = str(v)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".tmp") as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


"""One registry of model builders by name, and the spec that describes a built model.

Every model is buildable from a plain dict: ``build_model(**spec.to_dict())`` rebuilds the
architecture (weights aside) of any model this package wrote.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from cc_core.errors import ConfigError, UnknownArchitectureError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model and feed it: architecture and input contract.

    ``mean``/``std`` describe the normalization the model expects on inputs in [0, 1]
    (the model itself does not normalize). ``structure`` lists factorized layers of a
    compacted model (``{layer name: {"kind": ..., "ranks": [...]}}``); empty for a dense one.
    """

    arch: str
    num_classes: int
    width: float = 1.0
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    class_names: tuple[str, ...] | None = None
    structure: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model spec fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("input_shape", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("class_names") is not None:
            d["class_names"] = tuple(d["class_names"])
        return cls(**d)

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ArchEntry:
    """A registered architecture.

    ``stem`` / ``head`` name the first conv and the classifier weights, so that ``width`` and
    ``num_classes`` can be read off a bare state dict; ``stem_channels`` is the stem's output
    width at ``width=1``.
    """

    name: str
    builder: Callable[..., nn.Module]
    stem: str
    stem_channels: int
    head: str


_REGISTRY: dict[str, ArchEntry] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_model(name: str, *, stem: str, stem_channels: int, head: str,
                   aliases: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``builder(num_classes, width) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ArchEntry(name, builder, stem, stem_channels, head)
        for alias in (name, *aliases):
            _ALIASES[_key(alias)] = name
        return builder

    return wrap


def list_models() -> list[str]:
    """Canonical names of all registered architectures."""
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchEntry:
    """Registry entry for ``name`` (case, '-' and '_' are ignored: 'VGG19-BN' works)."""
    canonical = _ALIASES.get(_key(str(name)))
    if canonical is None:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[canonical]


def build_model(arch: str, num_classes: int = 10, width: float = 1.0, **spec_fields) -> nn.Module:
    """Build a registered architecture with fresh weights.

    ``spec_fields`` are the other :class:`ModelSpec` fields (input shape, normalization, class
    names, structure); a non-empty ``structure`` factorizes the named layers with the given
    ranks, so a compacted model's skeleton is rebuilt from its spec alone.
    The returned module carries its spec as ``model.cc_spec``.
    """
    entry = get_arch(arch)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(width, (int, float)) or not 0 < width <= 16:
        raise ConfigError(f"width must be a number in (0, 16], got {width!r}")
    spec = ModelSpec.from_dict(
        {"arch": entry.name, "num_classes": num_classes, "width": float(width), **spec_fields})
    if spec.class_names is not None and len(spec.class_names) != num_classes:
        raise ConfigError(
            f"{len(spec.class_names)} class names given for {num_classes} classes")
    model = entry.builder(num_classes=num_classes, width=float(width))
    if spec.structure:
        from cc_core.compact.layers import apply_structure

        apply_structure(model, spec.structure)
    model.cc_spec = spec
    return model


def scale_channels(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(channels * width / divisor)) * divisor)

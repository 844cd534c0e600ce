"""Backdoor attacks to BackdoorBench's conventions, as serializable specs.

An attack maps clean images in [0, 1] (N, 3, H, W) to triggered images and labels to attack
labels: all-to-one -> ``target``; all-to-all -> (y + 1) mod C. A fixed set of exactly
``round(ratio * N)`` training samples is poisoned (all-to-one draws them from samples whose
label is not the target). Some attacks also use "cross" samples that get a perturbation but
keep their true label (WaNet's noise mode, Input-Aware's cross-trigger).

An attack is saved as ``attack.json`` (all parameters) + ``attack.safetensors`` (its tensors:
blend image, warping grid, generator weights), so evaluation rebuilds the exact trigger.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cc_core.errors import ConfigError, InputError

ATTACK_FORMAT = "cleancompact.attack/1"


class AttackSpecError(InputError):
    """An attack name or attack file is invalid."""


@dataclass
class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`apply_trigger`."""

    name: ClassVar[str] = ""
    cross_ratio_default: ClassVar[float] = 0.0

    num_classes: int
    image_size: int = 32
    target: int = 0
    all_to_all: bool = False
    ratio: float = 0.1
    cross_ratio: float | None = None
    seed: int = 0
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"an attack needs at least 2 classes, got {self.num_classes}")
        if not 0 <= self.target < self.num_classes:
            raise InputError(f"target class {self.target} is out of range for "
                             f"{self.num_classes} classes (0..{self.num_classes - 1})")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"poisoning ratio must be in (0, 1), got {self.ratio}")
        if self.cross_ratio is None:
            self.cross_ratio = self.cross_ratio_default
        self.params = {**self.default_params(), **self.params}
        unknown = set(self.params) - set(self.default_params())
        if unknown:
            raise ConfigError(f"unknown {self.name} parameters: {sorted(unknown)}")
        self.build()

    # -- to override ------------------------------------------------------------------
    @classmethod
    def default_params(cls) -> dict:
        return {}

    def build(self) -> None:
        """Create the attack's tensors from ``seed`` and ``params``."""

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered version of ``x`` (N, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Perturbation for cross samples (keep their label); identity by default."""
        return x

    def trainable(self) -> nn.Module | None:
        """A module trained jointly with the classifier (Input-Aware's generator)."""
        return None

    def auxiliary_loss(self, x: torch.Tensor) -> torch.Tensor | None:
        """Extra loss for the trainable part, on a clean batch."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`tensors` saved."""

    # -- shared -------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.name + ("-a2a" if self.all_to_all else "")

    def attack_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Labels the backdoor maps ``y`` to."""
        if self.all_to_all:
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Mask of samples that count for ASR / can be poisoned (all-to-one: not the target)."""
        return torch.ones_like(y, dtype=torch.bool) if self.all_to_all else y != self.target

    def select_indices(self, y: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Exactly round(ratio * N) poison indices and round(cross_ratio * that) cross indices."""
        y = torch.as_tensor(np.asarray(y))
        n = len(y)
        n_poison = int(round(self.ratio * n))
        rng = np.random.default_rng(self.seed)
        candidates = np.flatnonzero(self.eligible(y).numpy())
        if n_poison > len(candidates):
            raise ConfigError(f"cannot poison {n_poison} of {n} samples: only {len(candidates)} "
                              "are outside the target class")
        poison = np.sort(rng.choice(candidates, n_poison, replace=False))
        rest = np.setdiff1d(np.arange(n), poison)
        n_cross = min(int(round(self.cross_ratio * n_poison)), len(rest))
        cross = np.sort(rng.choice(rest, n_cross, replace=False))
        return poison, cross

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor,
                     cross: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the trigger to ``poison`` rows (relabelled) and the cross perturbation to
        ``cross`` rows (label kept). ``poison``/``cross``: boolean masks over the batch."""
        x, y = x.clone(), y.clone()
        if poison.any():
            x[poison] = self.apply_trigger(x[poison])
            y[poison] = self.attack_labels(y[poison])
        if cross.any():
            x[cross] = self.apply_cross(x[cross], generator)
        return x, y

    def to_dict(self) -> dict:
        return {"format": ATTACK_FORMAT, "name": self.name, "num_classes": self.num_classes,
                "image_size": self.image_size, "target": self.target,
                "all_to_all": self.all_to_all, "ratio": self.ratio,
                "cross_ratio": self.cross_ratio, "seed": self.seed, "params": self.params}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``attack.json`` (+ ``attack.safetensors`` if the attack has tensors)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        if tensors:
            save_file(tensors, str(directory / "attack.safetensors"))
        path = directory / "attack.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def fit_pattern(pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A trigger pattern (C or 1, h, w) on ``x``'s device and dtype, resized (bilinear) to its (H, W)."""
    pattern = pattern.to(x.device, x.dtype)
    if pattern.shape[-2:] != x.shape[-2:]:
        import torch.nn.functional as F

        pattern = F.interpolate(pattern[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
    return pattern


ATTACKS: dict[str, type[Attack]] = {}


@dataclass
class PatternAttack(Attack):
    """An attack whose trigger is one seeded ``pattern`` tensor that :meth:`build` makes and the
    spec stores (so a saved attack applies the very pattern it was trained with)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pattern = tensors["pattern"]


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def parse_attack_name(text: str) -> tuple[str, bool]:
    """'wanet-a2a' -> ('wanet', True); 'badnet' -> ('badnet', False)."""
    base, _, suffix = text.lower().partition("-")
    if base not in ATTACKS or suffix not in ("", "a2a", "a2o"):
        names = ", ".join(f"{n}[-a2a]" for n in sorted(ATTACKS))
        raise AttackSpecError(f"unknown attack {text!r}; choose from {names}")
    return base, suffix == "a2a"


def build_attack(text: str, num_classes: int, **kwargs) -> Attack:
    """An attack by name (``badnet``, ``blended``, ``wanet``, ``inputaware``; ``-a2a`` suffix
    for all-to-all)."""
    name, all_to_all = parse_attack_name(text)
    return ATTACKS[name](num_classes=num_classes, all_to_all=all_to_all, **kwargs)


def load_attack(path: str | os.PathLike) -> Attack:
    """Rebuild an attack from ``attack.json`` (or a directory holding it)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "attack.json"
    if not path.exists():
        raise AttackSpecError(f"attack spec not found: {path}")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttackSpecError(f"{path} is not a valid attack spec ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != ATTACK_FORMAT:
        raise AttackSpecError(f"{path} is not a cleancompact attack spec (format {ATTACK_FORMAT})")
    if spec.get("name") not in ATTACKS:
        raise AttackSpecError(f"{path} names an unknown attack {spec.get('name')!r}")
    kwargs = {k: spec[k] for k in ("num_classes", "image_size", "target", "all_to_all", "ratio",
                                   "cross_ratio", "seed", "params")}
    attack = ATTACKS[spec["name"]](**kwargs)
    tensor_file = path.with_name("attack.safetensors")
    if attack.tensors():
        if not tensor_file.exists():
            raise AttackSpecError(f"{path} needs its tensors in {tensor_file}, which is missing")
        attack.load_tensors(load_file(str(tensor_file)))
    return attack

"""Errors a user can act on.

Every error caused by bad input (a missing file, an unknown architecture, an invalid option)
derives from :class:`InputError`. The CLI prints its message without a traceback and exits
with code 2; library users can catch it as one type.
"""
from __future__ import annotations


class CleanCompactError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(CleanCompactError):
    """The input (file, option, name) is invalid; the message says what to change."""

    exit_code = 2


class ModelFileError(InputError):
    """A model file is missing, truncated, empty or not a model file at all."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """The model path does not exist."""


class UnsafeModelFileError(ModelFileError):
    """The file holds pickled Python objects; loading it would run code from the file."""


class UnknownArchitectureError(InputError, KeyError):
    """The architecture name is not in the model registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StateDictMismatchError(ModelFileError):
    """The tensors in the file do not fit the architecture (missing/unexpected keys, shapes)."""


class NonFiniteWeightsError(ModelFileError):
    """The file holds NaN or Inf values."""


class ConfigError(InputError, ValueError):
    """An option has an invalid value."""


class RatioUnreachableError(ConfigError):
    """The requested compression ratio cannot be met by the eligible layers."""


def require_at_least(config, prefix: str, names: tuple[str, ...], minimum: int = 1) -> None:
    """ConfigError unless each field ``names`` of ``config`` is >= ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{prefix} {name} must be >= {minimum}, got {getattr(config, name)}")


def require_positive(config, prefix: str, names: tuple[str, ...]) -> None:
    """ConfigError unless each field ``names`` of ``config`` is > 0."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ConfigError(f"{prefix} {name} must be > 0, got {getattr(config, name)}")

"""Settings files: TOML, YAML or JSON (by extension) -> a dict of config overrides. The keys are
those of the config objects (DefendConfig's fields; a table / mapping for a section such as
``finetune``); TOML has no null, so a setting that turns something off (``patch_probe = null``)
needs YAML, JSON or ``--set``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cc_core.errors import ConfigError, InputError

SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def parse_toml(text: str, what: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} is not valid TOML: {e}") from None


def read_settings(path: str | os.PathLike) -> dict:
    """The mapping a settings file holds; a missing file, an unknown extension, a syntax error or a
    file that is not a mapping is an InputError / ConfigError (exit 2) naming the file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: a settings file is {', '.join(SUFFIXES)}")
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read settings file {path}: {e.strerror or e}") from None
    if path.suffix == ".toml":
        settings = parse_toml(text, str(path))
    elif path.suffix == ".json":
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    else:
        import yaml

        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(settings).__name__}")
    return settings

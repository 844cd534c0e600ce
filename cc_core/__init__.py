"""cleancompact core library: Clean & Compact (C&C) backdoor removal + compression.

Pure PyTorch; no Prefect, no MLflow. ``from cc_core import build_model, clean_compact``.
"""
from cc_core.compact import CompactConfig, CompactionPlan, clean_compact
from cc_core.errors import CleanCompactError, InputError
from cc_core.io import load_model, read_metadata, save_model
from cc_core.models import ModelSpec, build_model, count_params, list_models
from cc_core.defense.config import DefendConfig
from cc_core.defense.run import defend

from cc_core.version import __version__

__all__ = ["__version__", "CleanCompactError", "CompactConfig", "CompactionPlan", "DefendConfig", "InputError",
           "ModelSpec", "build_model", "clean_compact", "count_params", "defend", "list_models",
           "load_model", "read_metadata", "save_model"]

"""The C&C defense, one module per step: ``config`` (settings and presets), ``suspect`` (probes,
inversion, suspected target), ``cleaning`` (channel cleans, BatchNorm matching, the clipped
teacher), ``images`` (the fine-tune's synthetic images), ``teacher`` (the distillation gate),
``report`` (measurements and the report), ``run`` (``defend``, the order of the steps) and
``package`` (the files written)."""
from cc_core.defense.config import PRESETS, DefendConfig, resolve_config
from cc_core.defense.package import export_package
from cc_core.defense.run import defend, defend_baseline

__all__ = ["PRESETS", "DefendConfig", "defend", "defend_baseline", "export_package", "resolve_config"]

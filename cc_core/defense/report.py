"""What a defense reports: ACC / ASR / RA before and after on real data (``measure``), the model's
size and multiply-accumulates, and the ``cleancompact.report/1`` dict (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
from torch import nn

from cc_core.fileio import git_commit
from cc_core.device import precision, resolve_device
from cc_core.metrics import evaluate
from cc_core.models import count_params
from cc_core.defense.config import DefendConfig
from cc_core.defense.suspect import exclusion_summary


REPORT_FORMAT = "cleancompact.report/1"


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (convs and linears)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return total


def environment(device: str | torch.device) -> dict:
    device = resolve_device(device)
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "mixed_precision_dtype": precision(device), "python": platform.python_version(),
            "git_commit": git_commit()}


def measure(before_model: nn.Module, after_model: nn.Module, eval_data=None, attack=None,
            device=None) -> dict:
    """{acc,asr,ra,per_class_acc}_{before,after} on real data (None where not measurable)."""
    keys = ("acc", "asr", "ra", "per_class_acc")
    metrics = {f"{k}_{w}": None for k in keys for w in ("before", "after")}
    if eval_data is not None:
        for when, model in (("before", before_model), ("after", after_model)):
            result = evaluate(model, eval_data, attack, device=device)
            for key in keys:
                metrics[f"{key}_{when}"] = result[key]
    return metrics


@dataclass
class DefendResult:
    model: nn.Module
    report: dict
    plan: object


def make_report(original: nn.Module, new: nn.Module, cfg: DefendConfig, plan, metrics: dict,
                scan_before: dict | None, scan_after: dict | None, timings: dict, history: list,
                synth_log: dict, device, channel_info: dict, exclusion: dict | None = None,
                distillation: dict | None = None, finetune_guard: dict | None = None,
                bn_match: dict | None = None) -> dict:
    """The ``cleancompact.report/1`` dict of a C&C run (``onnx`` is filled in by the export;
    ``finetune_guard``: the kept student's guarded_finetune record; ``bn_match``:
    match_bn_statistics' record, None when it did not run)."""
    spec = original.cc_spec
    return {
        "format": REPORT_FORMAT,
        "model": {"arch": spec.arch, "params_before": count_params(original), "params_after": count_params(new),
                  "compression": count_params(original) / count_params(new),
                  "macs_before": macs(original, spec.input_shape), "macs_after": macs(new, spec.input_shape)},
        "config": cfg.to_dict() | {"compact_resolved": plan.config},
        "channel_clean": channel_info,
        "bn_match": bn_match,
        "distillation": distillation,
        "metrics": metrics,
        "scan": {"target_class_estimate": scan_before["target_class_estimate"] if scan_before else None,
                 "concentration_before": scan_before["concentration"] if scan_before else None,
                 "concentration_after": scan_after["concentration"] if scan_after else None,
                 "histogram_before": scan_before["histogram"] if scan_before else None,
                 "histogram_after": scan_after["histogram"] if scan_after else None,
                 **(exclusion or exclusion_summary(None, None, 0))},
        "onnx": None,
        "timings_s": timings,
        "finetune_history": history,
        "finetune_guard": finetune_guard,
        "synth": synth_log,
        "environment": environment(device),
    }

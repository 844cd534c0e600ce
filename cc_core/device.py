"""Device selection and mixed precision, shared by training, synthesis and fine-tuning."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CPU (about 2x faster here, STACK.md), fp16 AMP on CUDA."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

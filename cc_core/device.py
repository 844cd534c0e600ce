"""Device selection and mixed precision, shared by training, synthesis and fine-tuning."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda if available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_bf16_is_native() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (AVX-512 or AMX).

    Without it (an AVX2-only CPU) torch falls back to reference bf16 kernels: ResNet-18 w0.25
    training and input-gradient steps measured 12x slower than fp32 on such a machine
    (``python -m benchmarks.experiments.precision``)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision(device: torch.device, enabled: bool = True) -> str:
    """The dtype :func:`autocast` computes in: 'float16' (CUDA), 'bfloat16' (a CPU with native
    bf16) or 'float32' (mixed precision off, or a CPU where bf16 would be slower)."""
    if not enabled:
        return "float32"
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if cpu_bf16_is_native() else "float32"


def autocast(device: torch.device, enabled: bool = True):
    """fp16 AMP on CUDA; bf16 autocast on a CPU that runs bf16 natively (about 2x faster than
    fp32 there, docs/STACK.md); plain fp32 on any other CPU."""
    dtype = precision(device, enabled)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16, enabled=dtype == "float16")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """``model``'s 4-D parameters and buffers in channels_last memory format inside the block,
    contiguous again after it (also on error); values, shapes and Parameter objects unchanged.

    Convolutions then run in oneDNN's native NHWC layout whatever the input's layout: on ResNet-18
    w0.25 and its compactions, forward + backward to the input ran 1.2-1.3x faster and a training
    step 1.1-1.4x, in fp32 on 2 CPU cores (``python -m benchmarks.experiments.memory_format``). Nested blocks convert
    nothing twice."""
    converted = [t for t in (*model.parameters(), *model.buffers())
                 if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last)]
    for t in converted:
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for t in converted:
            t.data = t.data.contiguous()

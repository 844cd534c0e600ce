"""ONNX export with a dynamic batch dimension, checks, parity, and paired latency.

CPU hosts use onnxruntime's CPU provider; GPU hosts (onnxruntime-gpu installed) ask for the
CUDA provider and verify it really loaded: onnxruntime silently falls back to CPU otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cc_core.errors import CleanCompactError, ConfigError
from cc_core.fileio import atomic_path


class ProviderUnavailableError(CleanCompactError):
    """The requested onnxruntime execution provider did not load."""


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's own noise kept off the user's terminal: torch.onnx's logger warnings (operators of
    packages that are not installed, such as torchvision's) and the deprecation warnings of its
    dependencies. Errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...] | None = None,
                opset: int = 18) -> Path:
    """Export ``model`` (eval mode, fp32, CPU) to a single self-contained ONNX file whose
    input ``input`` has a dynamic batch dimension; output ``logits``. Written atomically."""
    path = Path(path)
    input_shape = tuple(input_shape or model.cc_spec.input_shape)
    model = model.eval().float().to("cpu")
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with quiet_exporter():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    with atomic_path(path, suffix=".onnx") as tmp:
        program.save(tmp, external_data=False)
    return path


def check_onnx(path: str | os.PathLike) -> None:
    """onnx.checker with full shape inference; raises onnx's ValidationError on a bad model."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def session(path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
    """An onnxruntime InferenceSession; on ``cuda`` the CUDA provider must really load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if str(device).startswith("cuda"):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise ConfigError(f"unknown onnxruntime device {device!r}; use cpu or cuda")
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if providers[0] not in sess.get_providers():
        raise ProviderUnavailableError(
            f"onnxruntime did not load {providers[0]} (loaded: {sess.get_providers()}); install "
            "onnxruntime-gpu (extra 'gpu') with a matching CUDA/cuDNN, and not onnxruntime beside it")
    return sess


def run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def parity(model: nn.Module, path: str | os.PathLike, n: int = 16, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over logits of ``n`` random inputs (batch size != export's)."""
    x = torch.rand((n, *model.cc_spec.input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.eval().float().cpu()(x).numpy()
    got = run(session(path), x.numpy())
    return float(np.abs(got - expected).max())


def paired_latency(paths: dict[str, str | os.PathLike], input_shape: tuple[int, ...], batch: int,
                   threads: int = 2, repeats: int = 30, warmup: int = 5, device: str = "cpu",
                   seed: int = 0) -> dict[str, float]:
    """Median latency (ms per batch) of each model, measured in one process, interleaved
    (A, B, A, B, ...) so that machine noise hits all models alike."""
    sessions = {name: session(p, threads, device) for name, p in paths.items()}
    x = np.random.default_rng(seed).random((batch, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        for s in sessions.values():
            run(s, x)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            run(s, x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}

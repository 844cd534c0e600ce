"""A defense's result on disk: model.safetensors, the parity-checked model.onnx with its latency
against the original, and report.json, written all or nothing."""
from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from cc_core.defense.report import DefendResult


def export_checked_onnx(model: nn.Module, original: nn.Module, out_dir: str | os.PathLike,
                        threads: int = 2, latency_batch: int = 128) -> dict:
    """Write ``out_dir/model.onnx`` (checked, parity vs torch) and time it against the original.

    Returns the report's ``onnx`` section: max_abs_diff, latency (ms) of original and compact at
    ``latency_batch`` and at batch 1, measured side by side in this process, and the speed-ups."""
    from cc_core.export import check_onnx, export_onnx, paired_latency, parity

    out_dir = Path(out_dir)
    onnx_path = export_onnx(model, out_dir / "model.onnx")
    check_onnx(onnx_path)
    max_diff = parity(model, onnx_path)
    original_onnx = export_onnx(original, out_dir / "original.onnx")
    try:
        shape = model.cc_spec.input_shape
        paths = {"original": original_onnx, "compact": onnx_path}
        latency = paired_latency(paths, shape, latency_batch, threads=threads)
        latency_1 = paired_latency(paths, shape, 1, threads=threads, repeats=100)
    finally:
        original_onnx.unlink(missing_ok=True)
    return {"max_abs_diff": max_diff, "latency_batch": latency_batch, "threads": threads,
            "latency_ms": latency, "speedup": latency["original"] / latency["compact"],
            "latency_ms_batch1": latency_1, "speedup_batch1": latency_1["original"] / latency_1["compact"]}


def export_package(result: DefendResult, original: nn.Module, out_dir: str | os.PathLike,
                   threads: int = 2, latency_batch: int = 128, log=print) -> Path:
    """Write model.safetensors, model.onnx (parity-checked) and report.json into ``out_dir``.

    Everything is built in a sibling temporary directory and moved in only when complete
    (report.json last), so a failure leaves nothing half-written in ``out_dir``; other files
    there are left alone."""
    import json
    import shutil
    import tempfile

    from cc_core.io import save_model

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        save_model(result.model, staging / "model.safetensors", plan=result.plan)
        result.report["onnx"] = export_checked_onnx(result.model, original, staging, threads, latency_batch)
        result.report["timings_s"]["export"] = time.perf_counter() - start
        result.report["timings_s"]["total"] += result.report["timings_s"]["export"]
        (staging / "report.json").write_text(json.dumps(result.report, indent=2) + "\n")
        log(f"[defend] ONNX parity {result.report['onnx']['max_abs_diff']:.2e}, onnxruntime speed-up {result.report['onnx']['speedup']:.2f}x "
            f"(batch {latency_batch}, {threads} threads)")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "model.onnx", "report.json"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

"""Data-free backdoor scan: where do adversarial synthetic images land, and what do the
layers' singular-value spectra look like?

A backdoored model funnels untargeted adversarial perturbations into its target class, so the
class histogram of adversarial synthetic images is concentrated; a clean model spreads them
over semantically close classes. The risk score is that concentration,
(p_max - 1/C) / (1 - 1/C); the anomaly index is the robust z-score (median absolute
deviation) of the top class count, as in Neural Cleanse.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from cc_core.adversarial import PGDConfig, class_histogram, concentration, pgd
from cc_core.compact.clip import normalizer_value
from cc_core.compact.tucker import unfold
from cc_core.synth import SynthConfig, synthesize


def anomaly_index(hist: torch.Tensor) -> float:
    """(max - median) / (1.4826 * MAD) of the class counts; > 2 flags an outlier class."""
    h = hist.float()
    median = h.median()
    mad = (h - median).abs().median() * 1.4826
    return float((h.max() - median) / mad.clamp_min(1.0))


def spectra(model: nn.Module, normalizer: str = "mean") -> list[dict]:
    """Per conv (groups == 1): mode-1 singular values normalized by the layer's normalizer."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and min(m.in_channels, m.out_channels) >= 8:
            s = torch.linalg.svdvals(unfold(m.weight.detach().double(), 0))
            n = normalizer_value(s, normalizer)
            normalized = s / n
            rows.append({"layer": name, "max_normalized": float(normalized.max()),
                         "top5_normalized": [round(float(v), 4) for v in normalized[:5]],
                         "normalized": [round(float(v), 4) for v in normalized]})
    return rows


def histogram_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig) -> dict:
    """Adversarial class histogram of ``x`` under ``model``, with its statistics."""
    adv = pgd(model, x, y, cfg)
    hist = class_histogram(model, adv)
    return {"histogram": hist.tolist(), "concentration": concentration(hist),
            "anomaly_index": anomaly_index(hist), "target_class_estimate": int(hist.argmax())}


def scan(model: nn.Module, synth_cfg: SynthConfig = SynthConfig(n_samples=256, iterations=100),
         pgd_cfg: PGDConfig = PGDConfig(), device=None, progress: bool = True) -> dict:
    """The risk report of ``model``: histogram statistics, estimated target, spectra, timings."""
    start = time.perf_counter()
    x, y, log = synthesize(model, synth_cfg, device=device, progress=progress)
    t_synth = time.perf_counter() - start
    report = histogram_report(model, x, y, pgd_cfg)
    report["spectra"] = spectra(model)
    report["timings_s"] = {"synthesize": t_synth, "total": time.perf_counter() - start}
    report["config"] = {"synth": synth_cfg.to_dict(), "pgd": pgd_cfg.to_dict()}
    return report

"""Data-free backdoor scan: five signals, no real data.

1. Adversarial histogram (docs/METHOD.md step 6): where untargeted PGD sends synthetic images. Its
   concentration is (p_max - 1/C) / (1 - 1/C); the anomaly index is the robust z-score (median
   absolute deviation) of the top class count, as in Neural Cleanse.
2. Channel outliers: output channels whose Lipschitz upper bound (CLP's UCLC, BN folded in)
   lies more than ``u`` standard deviations above its layer's mean; backdoors tend to live in
   a few such channels.
3. Trigger inversion through those channels: one universal perturbation (pixel range, L1
   penalty) that maximizes the outlier channels' peak activations on synthetic images. If they
   carry a backdoor, the perturbed images all land in its target class.
4. Universal inversion (flip): one sparse perturbation (same L1 penalty) that pushes every image
   out of the class the model gives it, to whatever class. An all-to-all trigger does this
   cheaply and consistently: every image of a class goes to the same (its own) place. The
   all-to-all score is flip rate x mapping consistency when the flips spread over classes; a
   clean model's cheapest universal perturbation flips fewer images, to scattered classes. When
   the flips all go to one class the score is 0: consistency is then 1 by construction, and the
   class was as often a sink of a clean decision boundary as the target. This is the signal
   that sees all-to-all triggers, and its perturbation is what the fine-tune unlearns.
5.-6. The patch and warp probes (cc_core.probes): a trigger of a known shape that flips the
   synthetic images.

The risk score is the largest of five scores in [0, 1]: the channel inversion's concentration
(0 when no channel is an outlier), the all-to-all score, the patch score (the best stamp's flip
rate once it reaches PATCH_THRESHOLD), the warp score (the best field's, from WARP_THRESHOLD)
and the adversarial score
``max(0, 1 - ANOMALY_THRESHOLD / anomaly index)`` (0 up to Neural Cleanse's anomaly threshold of
2, 0.5 at index 4, towards 1 above). The inversions find patch triggers (BadNet) whose target PGD
misses; PGD finds a warp trigger's (WaNet) pull that the inversions miss. The target estimate is
the firing patch stamp's (else warp field's) class when its flips go to one class, else the channel inversion's top class when its concentration reaches ``TARGET_FROM_INVERSION``, else
the adversarial histogram's; an all-to-all score >= FLIP_THRESHOLD marks the trigger all-to-all. The L1 penalty matters: at 0.01 the channel inversion paints
~40% of the pixel range over every image and sends a CLEAN model's images to one class too; at
0.3 a clean model's inversion stays near zero while a patch trigger is still found. A warp
trigger (WaNet) is not a sparse additive pattern and is not found by the inversions; the warp probe
is what finds it. All signals
depend on the synthetic images (the seed): on the zoo the channel inversion found the BadNet
patch for two of three seeds (benchmarks/results/scan.md); the universal inversion is the best of
``restarts`` seeds (benchmarks/results/flip_zoo.md).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from cc_core.adversarial import PGDConfig, _to_pixels, add_pixel_delta, class_histogram, concentration, pgd, predictions
from cc_core.baselines.pairs import conv_bn_pairs
from cc_core.compact.clip import normalizer_value
from cc_core.compact.tucker import unfold
from cc_core.device import channels_last
from cc_core.errors import ConfigError, require_at_least, require_positive
from cc_core.evalmode import eval_mode
from cc_core.probes import (PatchProbeConfig, WarpProbeConfig, found_trigger, landing_report, patch_probe,
                             patch_score, trigger_score, warp_probe, warp_score)
from cc_core.synth import SynthConfig, synthesize


TARGET_FROM_INVERSION = 0.5
ANOMALY_THRESHOLD = 2.0
FLIP_MARGIN = 1.0
FLIP_THRESHOLD = 0.5


def anomaly_index(hist: torch.Tensor) -> float:
    """(max - median) / (1.4826 * MAD) of the class counts; > 2 flags an outlier class."""
    h = hist.float()
    median = h.median()
    mad = (h - median).abs().median() * 1.4826
    return float((h.max() - median) / mad.clamp_min(1.0))


def adversarial_score(anomaly: float) -> float:
    """Map the adversarial histogram's anomaly index to [0, 1]: 0 up to ANOMALY_THRESHOLD."""
    return max(0.0, 1.0 - ANOMALY_THRESHOLD / anomaly) if anomaly > 0 else 0.0


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


@dataclass(frozen=True)
class InversionConfig:
    """Trigger inversion through outlier channels: ``u`` flags channels, at most ``max_channels``
    (highest z first) are maximized by ``steps`` Adam steps (``lr``, pixel units) on batches of
    ``batch_size`` synthetic images, with ``l1`` times the perturbation's L1 norm per colour
    channel as penalty (a sparse, patch-like trigger is cheap; a full-image one is not). The
    universal inversion (flip_report) uses the same steps, lr, batches and penalty, best of
    ``restarts`` seeds."""

    u: float = 3.0
    max_channels: int = 8
    steps: int = 100
    lr: float = 0.05
    batch_size: int = 128
    l1: float = 0.3
    restarts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, "inversion", ("max_channels", "steps", "batch_size", "restarts"))
        require_positive(self, "inversion", ("u", "lr"))
        if self.l1 < 0:
            raise ConfigError(f"inversion l1 must be >= 0, got {self.l1}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def channel_outliers(model: nn.Module, u: float = 3.0) -> list[dict]:
    """Channels whose Lipschitz bound z-score within its layer exceeds ``u``, highest first:
    [{"layer": conv name, "channel": k, "z": z}]."""
    from cc_core.baselines.clp import layer_scores

    return [{"layer": name, "channel": k, "z": z} for z, name, k in layer_scores(model, conv_bn_pairs(model))
            if z > u]


def _optimize_delta(model: nn.Module, x: torch.Tensor, objective,
                    cfg: InversionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One perturbation delta (1, C, H, W) in pixel units shared by every image of ``x`` (N, C, H,
    W, normalized): ``cfg.steps`` Adam steps on random batches of
    ``objective(logits, idx) + cfg.l1 * ||delta||_1 / C``, the model frozen in eval mode.
    Returns the perturbed images (normalized) and delta."""
    spec = model.cc_spec
    pix, mean, std = _to_pixels(x.detach(), spec.mean, spec.std)
    gen = torch.Generator().manual_seed(cfg.seed)
    delta = torch.zeros(1, *pix.shape[1:], device=pix.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    with eval_mode(model, freeze=True), channels_last(model):
        for _ in range(cfg.steps):
            idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen).to(pix.device)
            logits = model(((pix[idx] + delta).clamp(0, 1) - mean) / std)
            loss = objective(logits, idx) + cfg.l1 * delta.abs().sum() / pix.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return add_pixel_delta(x.detach(), delta, spec), delta.detach()


def invert_through_channels(model: nn.Module, x: torch.Tensor, channels: list[dict],
                            cfg: InversionConfig = InversionConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """One perturbation delta (1, C, H, W) in pixel units that maximizes the summed peak
    activation of ``channels`` (at their BN's output, else the conv's) over ``x`` (N, C, H, W,
    normalized), with penalty ``cfg.l1``. Returns the perturbed images (normalized) and delta."""
    modules, pairs = dict(model.named_modules()), conv_bn_pairs(model)
    peaks: list[torch.Tensor] = []

    def hook(channel: int):  # a copy: VGG / MobileNet apply an in-place ReLU to this very output
        return lambda module, inputs, out: peaks.append(out[:, channel].clone().amax(dim=(1, 2)).mean())

    def objective(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = -torch.stack(peaks).sum()
        peaks.clear()
        return loss

    handles = [modules[pairs.get(c["layer"], c["layer"])].register_forward_hook(hook(c["channel"]))
               for c in channels]
    try:
        return _optimize_delta(model, x, objective, cfg)
    finally:
        for h in handles:
            h.remove()


def invert_universal(model: nn.Module, x: torch.Tensor, cfg: InversionConfig = InversionConfig(),
                     clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparse perturbation delta (1, C, H, W) in pixel units that moves as many images of ``x``
    as possible away from the class the model gives them unperturbed, whatever class they go to:
    minimizes the mean logit margin of that class over the runner-up, floored at -FLIP_MARGIN
    (an image once flipped stops pulling), plus ``cfg.l1 * ||delta||_1 / C``.
    A trigger (all-to-one or all-to-all) is such a perturbation, and a cheap one; a clean model
    has none as sparse. ``clean``: the model's predictions (N,) on ``x``, if already at hand.
    Returns the perturbed images (normalized) and delta."""
    clean = (predictions(model, x) if clean is None else clean).to(x.device)

    def objective(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        own = logits.gather(1, clean[idx, None]).squeeze(1)
        other = logits.scatter(1, clean[idx, None], float("-inf")).amax(1)
        return (own - other).clamp_min(-FLIP_MARGIN).mean()

    return _optimize_delta(model, x, objective, cfg)


def invert_targeted(model: nn.Module, x: torch.Tensor, target: int, cfg: InversionConfig = InversionConfig(),
                    clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparse perturbation delta (1, C, H, W) in pixel units that sends as many images of ``x``
    as possible into class ``target``: minimizes the mean margin of the strongest other class over
    ``target``, floored at -FLIP_MARGIN, over the images the model does not already put there
    (``clean``: its predictions (N,) on ``x``, if at hand), plus ``cfg.l1 * ||delta||_1 / C``.
    An all-to-one trigger is the cheap way into its target; the untargeted inversion
    (invert_universal) can settle on the clean model's easiest sink instead. Returns the perturbed
    images (normalized) and delta."""
    clean = (predictions(model, x) if clean is None else clean).to(x.device)

    def objective(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        into = logits[:, target]
        other = logits.clone()
        other[:, target] = float("-inf")
        margin = (other.amax(1) - into).clamp_min(-FLIP_MARGIN)
        outside = (clean[idx] != target).float()
        return (margin * outside).sum() / outside.sum().clamp_min(1.0)

    return _optimize_delta(model, x, objective, cfg)


def targeted_flip_report(model: nn.Module, x: torch.Tensor, target: int,
                         cfg: InversionConfig = InversionConfig()) -> tuple[dict, torch.Tensor]:
    """flip_report's report and delta for the targeted inversion into ``target`` (invert_targeted),
    best flip_score of ``cfg.restarts`` seeds; the report also names the ``inverted_into`` class."""
    before = predictions(model, x).cpu()
    runs = []
    for i in range(cfg.restarts):
        x_flip, delta = invert_targeted(model, x, target, dataclasses.replace(cfg, seed=cfg.seed + i), clean=before)
        runs.append((_landing(model, x_flip, before, delta), delta))
    best = max(runs, key=lambda run: flip_score(run[0]))
    best[0]["restart_scores"] = [round(flip_score(r), 4) for r, _ in runs]
    best[0]["inverted_into"] = int(target)
    return best


def flip_report(model: nn.Module, x: torch.Tensor,
                cfg: InversionConfig = InversionConfig()) -> tuple[dict, torch.Tensor]:
    """Where the universal inverted perturbation sends ``x``, and the perturbation delta (1, C, H,
    W, pixel units). The report: ``flip_rate`` (fraction whose class changes), ``histogram`` and
    ``concentration`` of the perturbed classes, ``target_class_estimate`` (its top class),
    ``mapping_consistency`` (of the flipped images, the fraction that go where most flipped
    images of their source class go: 1 for both all-to-one and all-to-all triggers) and the
    perturbation's size. The inversion is run ``cfg.restarts`` times (seeds ``cfg.seed``,
    ``cfg.seed + 1``, ...; each draws its own batches) and the run with the highest
    all_to_all_score (then flip_score) is kept: a single run can settle on a scattered
    perturbation instead of the trigger, depending on the batches it draws."""
    before = predictions(model, x).cpu()
    runs = [_flip_run(model, x, before, dataclasses.replace(cfg, seed=cfg.seed + i)) for i in range(cfg.restarts)]
    best = max(runs, key=lambda run: restart_rank(run[0]))
    best[0]["restart_scores"] = [round(all_to_all_score(r), 4) for r, _ in runs]
    return best


def _flip_run(model: nn.Module, x: torch.Tensor, before: torch.Tensor,
              cfg: InversionConfig) -> tuple[dict, torch.Tensor]:
    """One universal inversion and its flip report (see flip_report)."""
    x_flip, delta = invert_universal(model, x, cfg, clean=before)
    return _landing(model, x_flip, before, delta), delta


def _landing(model: nn.Module, x_flip: torch.Tensor, before: torch.Tensor, delta: torch.Tensor) -> dict:
    """landing_report of the perturbed images ``x_flip`` against the predictions ``before``, with
    the perturbation ``delta``'s size."""
    after = predictions(model, x_flip).cpu()
    return landing_report(before, after, model.cc_spec.num_classes) | {
        "delta_mean_abs": float(delta.abs().mean()),
        "delta_pixels_changed": float((delta.abs().amax(1) > 0.1).float().mean())}


def inversion_report(model: nn.Module, x: torch.Tensor, cfg: InversionConfig = InversionConfig()) -> dict:
    """Channel outliers and, when there are any, the class histogram of the inverted trigger."""
    outliers = channel_outliers(model, cfg.u)
    report = {"channel_outliers": outliers[:32], "n_channel_outliers": len(outliers),
              "max_channel_z": max((o["z"] for o in outliers), default=None),
              "histogram": None, "concentration": 0.0, "target_class_estimate": None, "delta_mean_abs": None}
    if outliers:
        x_inv, delta = invert_through_channels(model, x, outliers[:cfg.max_channels], cfg)
        hist = class_histogram(model, x_inv)
        report |= {"histogram": hist.tolist(), "concentration": concentration(hist),
                   "target_class_estimate": int(hist.argmax()), "delta_mean_abs": float(delta.abs().mean())}
    return report


def histogram_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig) -> dict:
    """Adversarial class histogram of ``x`` under ``model``, with its statistics."""
    adv = pgd(model, x, y, cfg)
    hist = class_histogram(model, adv)
    return {"histogram": hist.tolist(), "concentration": concentration(hist),
            "anomaly_index": anomaly_index(hist), "target_class_estimate": int(hist.argmax())}


def flip_score(flip: dict) -> float:
    """Flip rate x mapping consistency of a universal inversion, in [0, 1] (a clean model's
    cheapest universal perturbation flips images to scattered classes)."""
    return flip["flip_rate"] * flip["mapping_consistency"]


def all_to_all_score(flip: dict) -> float:
    """The scan's all-to-all signal: the flip score when the flips spread over classes, else 0
    (all into one class, consistency is 1 by construction and says nothing)."""
    return flip_score(flip) if flip["concentration"] < TARGET_FROM_INVERSION else 0.0


def restart_rank(flip: dict) -> tuple[float, float]:
    """How flip_report ranks its restarts, best highest: all_to_all_score, then flip_score."""
    return all_to_all_score(flip), flip_score(flip)


def all_to_all_suspected(flip: dict | None) -> bool:
    """The universal inversion (or a patch probe's stamp) fires and spreads its flips over
    classes, each source class to one place: no single target."""
    return flip is not None and all_to_all_score(flip) >= FLIP_THRESHOLD


def trigger_all_to_all(flip: dict | None, found: dict | None) -> bool:
    """The universal inversion, or a probe's trigger that fires (trigger_score), looks all-to-all."""
    return all_to_all_suspected(flip) or (bool(trigger_score(found)) and all_to_all_suspected(found))


def names_target(found: dict | None) -> bool:
    """A probe's trigger fires (trigger_score) into one class (concentration >= TARGET_FROM_INVERSION):
    the first signal flagged_target reads, so the ones after it are not needed."""
    return bool(trigger_score(found)) and found["concentration"] >= TARGET_FROM_INVERSION


def flagged_target(adversarial: dict, inversion: dict | None, found: dict | None = None,
                   targeted: dict | None = None) -> int | None:
    """The target class a signal flags: a probe's top class when its trigger (stamp or warp) fires
    (trigger_score) into one class (concentration >= TARGET_FROM_INVERSION), else the channel
    inversion's top class when its concentration reaches TARGET_FROM_INVERSION, else the
    adversarial histogram's top class when its anomaly index exceeds ANOMALY_THRESHOLD; None when
    none flags one. The universal inversion names no target: when it sends everything to one
    class, that class is as often a clean model's easiest sink as the target (on the zoo WaNet it
    named 9, not 0; sweep_defend_unlearn.md); the targeted inversion (``targeted``,
    targeted_flip_report's) does when it fires, and comes second, after the probe: a cheap
    perturbation that sends most images into the class the adversarial histogram flags is that
    histogram's class confirmed. ``inversion`` may be None only when ``found`` names the target."""
    if names_target(found):
        return found["target_class_estimate"]
    if targeted is not None and flip_score(targeted) >= FLIP_THRESHOLD:
        return targeted["inverted_into"]
    if inversion["concentration"] >= TARGET_FROM_INVERSION:
        return inversion["target_class_estimate"]
    if adversarial["anomaly_index"] > ANOMALY_THRESHOLD:
        return adversarial["target_class_estimate"]
    return None


def suspected_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pgd_cfg: PGDConfig = PGDConfig(),
                     inversion_cfg: InversionConfig = InversionConfig(), found: dict | None = None,
                     universal: tuple[dict, torch.Tensor] | None = None) -> dict:
    """{"target": flagged class or None, "adversarial": histogram report, "inversion": channel
    inversion report (None when ``found`` names the target: not made), "flip": universal
    inversion report, "trigger": its delta (1, C, H, W, pixel units) when it fires, else None,
    "found": ``found`` (a probe's report on ``model`` and ``x``,
    made beforehand; None when none fired), "all_to_all": whether the flip or the
    found trigger looks all-to-all} of ``model`` on synthetic images ``x`` (N, C, H, W) with labels ``y`` (N,).
    ``universal``: flip_report's (report, delta) on ``model`` and ``x`` when made beforehand."""
    adversarial = histogram_report(model, x, y, pgd_cfg)
    inversion = None if names_target(found) else inversion_report(model, x, inversion_cfg)
    flip, delta = universal if universal is not None else flip_report(model, x, inversion_cfg)
    delta = delta.to(x.device)
    targeted = flip if "inverted_into" in flip else None
    return {"target": flagged_target(adversarial, inversion, found, targeted), "adversarial": adversarial,
            "inversion": inversion, "flip": flip, "trigger": delta if flip_score(flip) >= FLIP_THRESHOLD else None,
            "found": found, "all_to_all": trigger_all_to_all(flip, found)}


def scan(model: nn.Module, synth_cfg: SynthConfig = SynthConfig(n_samples=256, iterations=100),
         pgd_cfg: PGDConfig = PGDConfig(), device=None, progress: bool = True,
         inversion_cfg: InversionConfig = InversionConfig(),
         patch_cfg: PatchProbeConfig | None = PatchProbeConfig(),
         warp_cfg: WarpProbeConfig | None = WarpProbeConfig()) -> dict:
    """The risk report of ``model``: ``risk`` (max of ``risk_signals``), ``target_class_estimate``,
    ``all_to_all_suspected``, the adversarial histogram's statistics (top level),
    ``inversion`` (through outlier channels), ``flip`` (universal inversion), ``targeted`` (the
    targeted inversion into the adversarial histogram's class, made when that histogram flags one
    and the universal inversion does not fire; else None), ``patch`` (patch
    probe; None without ``patch_cfg``), ``warp`` (warp probe; None without ``warp_cfg``), spectra,
    timings."""
    start = time.perf_counter()
    x, y, log = synthesize(model, synth_cfg, device=device, progress=progress)
    t_synth = time.perf_counter() - start
    report = histogram_report(model, x, y, pgd_cfg)
    t_pgd = time.perf_counter() - start - t_synth
    report["inversion"] = inversion_report(model, x, inversion_cfg)
    t_inversion = time.perf_counter() - start - t_synth - t_pgd
    report["flip"], _ = flip_report(model, x, inversion_cfg)
    report["targeted"] = None
    if flip_score(report["flip"]) < FLIP_THRESHOLD and report["anomaly_index"] > ANOMALY_THRESHOLD:
        report["targeted"] = targeted_flip_report(model, x, report["target_class_estimate"], inversion_cfg)[0]
    t_flip = time.perf_counter() - start - t_synth - t_pgd - t_inversion
    report["patch"] = patch_probe(model, x, patch_cfg) if patch_cfg is not None else None
    t_patch = time.perf_counter() - start - t_synth - t_pgd - t_inversion - t_flip
    report["warp"] = warp_probe(model, x, warp_cfg) if warp_cfg is not None else None
    t_warp = time.perf_counter() - start - t_synth - t_pgd - t_inversion - t_flip - t_patch
    report["risk_signals"] = {"inversion": report["inversion"]["concentration"],
                              "all_to_all": all_to_all_score(report["flip"]),
                              "targeted": flip_score(report["targeted"]) if report["targeted"] else 0.0,
                              "adversarial": adversarial_score(report["anomaly_index"]),
                              "patch": patch_score(report["patch"]), "warp": warp_score(report["warp"])}
    report["risk"] = max(report["risk_signals"].values())
    found = found_trigger(report["patch"], report["warp"])
    report["all_to_all_suspected"] = trigger_all_to_all(report["flip"], found)
    flagged = flagged_target(report, report["inversion"], found, report["targeted"])
    if flagged is not None:
        report["target_class_estimate"] = flagged
    report["spectra"] = spectra(model)
    report["timings_s"] = {"synthesize": t_synth, "adversarial": t_pgd, "inversion": t_inversion, "flip": t_flip,
                           "patch": t_patch, "warp": t_warp, "total": time.perf_counter() - start}
    report["config"] = {"synth": synth_cfg.to_dict(), "pgd": pgd_cfg.to_dict(), "inversion": inversion_cfg.to_dict(),
                        "patch": patch_cfg.to_dict() if patch_cfg is not None else None,
                        "warp": warp_cfg.to_dict() if warp_cfg is not None else None}
    return report

"""The suspect step: the trigger probes on the synthetic images, the universal / targeted inversion,
and from them the suspected target, the trigger a channel clean acts on, the one that is unlearned
and the one the distillation gate verifies the teacher against."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cc_core.adversarial import add_pixel_delta, predictions
from cc_core.probes import (RESIDUAL_FLIP, apply_found_trigger, blend_probe, found_trigger, mask_probe, patch_probe,
                            patch_score, perturbation_trigger, trigger_flip_rate, trigger_score, trigger_text,
                            warp_probe)
from cc_core.scan import (ANOMALY_THRESHOLD, FLIP_THRESHOLD, all_to_all_suspected, flip_report,
                          flip_score, histogram_report, suspected_target, targeted_flip_report)
from cc_core.defense.config import DefendConfig


def probe_triggers(model: nn.Module, x: torch.Tensor, cfg: DefendConfig) -> dict:
    """{"patch": the patch probe's report, "warp": the warp probe's, "blend": the blend probe's, "mask": the mask probe's,
    "trigger": the one that fires (found_trigger; None when none), "universal": the scan's universal
    inversion, {"flip": flip_report's report, "delta": its perturbation as nested lists (1, C, H, W,
    pixel units)}, made when none fires and ``cfg.perturbation_channel_u`` is set (else None),
    "channel_trigger": what the trigger channel clean cleans by (channel_trigger)} of ``model`` on
    synthetic images ``x``. Under ``cfg.perturbation_over_probe`` the universal inversion is made also
    when a probe fires, and replaces the probe's trigger when it fires and flips more ("universal"'s
    "overruled": that trigger's kind, flip rate and class; None when it was not replaced); a probe that is off (``cfg``) gives None, and each runs only when none
    before it fired (the stamp comes first, then the field, then the pattern, then the mask)."""
    patch = patch_probe(model, x, cfg.patch_probe) if cfg.patch_probe is not None else None
    run_warp = cfg.warp_probe is not None and not patch_score(patch)
    warp = warp_probe(model, x, cfg.warp_probe) if run_warp else None
    run_blend = cfg.blend_probe is not None and found_trigger(patch, warp) is None
    blend = blend_probe(model, x, cfg.blend_probe) if run_blend else None
    run_mask = cfg.mask_probe is not None and found_trigger(patch, warp, blend) is None
    mask = mask_probe(model, x, cfg.mask_probe) if run_mask else None
    found = found_trigger(patch, warp, blend, mask)
    universal = None
    if cfg.perturbation_channel_u is not None and (found is None or cfg.perturbation_over_probe):
        flip, delta, targeted = untargeted_or_targeted(model, x, cfg)
        universal = {"flip": flip, "delta": delta.detach().cpu().tolist(), "targeted": targeted, "overruled": None}
        if found is not None and perturbation_fires(flip, cfg.perturbation_scope) and flip["flip_rate"] > found["flip_rate"]:
            universal["overruled"] = {"kind": found["kind"], "flip_rate": found["flip_rate"],
                                      "target_class_estimate": found["target_class_estimate"]}
            found = None
        elif found is not None:
            universal = None
    return {"patch": patch, "warp": warp, "blend": blend, "mask": mask, "trigger": found, "universal": universal,
            "channel_trigger": channel_trigger(found, universal, len(x), cfg.perturbation_scope)}


def untargeted_or_targeted(model: nn.Module, x: torch.Tensor, cfg: DefendConfig) -> tuple[dict, torch.Tensor, dict | None]:
    """The universal inverted perturbation of ``model`` on synthetic images ``x`` (N, C, H, W):
    flip_report's (report, delta), and what was tried beyond it (None when nothing was). Under
    ``cfg.perturbation_scope`` "targeted", when that untargeted perturbation does not fire
    (perturbation_fires) and the adversarial histogram flags a class (anomaly index >
    ANOMALY_THRESHOLD, PGD against the model's own predictions), the targeted inversion into that
    class (scan.targeted_flip_report) is made and taken instead when it fires: an all-to-one
    trigger the untargeted descent passes by. The record: {"anomaly_index", "into" (the flagged
    class; None when none), "flip_rate" (the targeted perturbation's; None when not made), "taken"}."""
    flip, delta = flip_report(model, x, cfg.inversion)
    if cfg.perturbation_scope != "targeted" or perturbation_fires(flip, cfg.perturbation_scope):
        return flip, delta, None
    adversarial = histogram_report(model, x, predictions(model, x), cfg.pgd)
    record = {"anomaly_index": adversarial["anomaly_index"], "into": None, "flip_rate": None, "taken": False}
    if adversarial["anomaly_index"] <= ANOMALY_THRESHOLD:
        return flip, delta, record
    record["into"] = adversarial["target_class_estimate"]
    targeted, targeted_delta = targeted_flip_report(model, x, record["into"], cfg.inversion)
    record["flip_rate"] = targeted["flip_rate"]
    if not perturbation_fires(targeted, cfg.perturbation_scope):
        return flip, delta, record
    return targeted, targeted_delta, record | {"taken": True}


def perturbation_fires(flip: dict | None, scope: str) -> bool:
    """Whether the universal inversion's perturbation (its report ``flip``) counts as a trigger under
    DefendConfig.perturbation_scope ``scope``."""
    if flip is None:
        return False
    return all_to_all_suspected(flip) or (scope in ("any", "targeted") and flip_score(flip) >= FLIP_THRESHOLD)


def channel_trigger(found: dict | None, universal: dict | None, n: int, scope: str = "all-to-all") -> dict | None:
    """The trigger the trigger channel clean cleans by: the probes' firing one (``found``), else the
    universal inverted perturbation (``universal``, probe_triggers') when it fires under ``scope``
    (perturbation_fires), measured on ``n`` synthetic images: the trigger the distillation gate
    verifies against (gate_trigger)."""
    flip, delta = universal_inversion(universal) or (None, None)
    return gate_trigger(found, flip, delta if perturbation_fires(flip, scope) else None, n)


def probe_text(probed: dict) -> str:
    """The log's words for probe_triggers' report ``probed``: the firing trigger, else an all-to-all
    universal perturbation the channel clean will use ('' when neither)."""
    if (found := probed["trigger"]) is not None:
        return (f"the {found['kind']} probe's trigger ({trigger_text(found)}) flips {found['flip_rate']:.0%} "
                f"of the synthetic images (class {found['target_class_estimate']} most)")
    targeted = (probed["universal"] or {}).get("targeted")
    overruled = (probed["universal"] or {}).get("overruled")
    if (trigger := probed["channel_trigger"]) is not None and overruled:
        return (f"the {overruled['kind']} probe's trigger flips {overruled['flip_rate']:.0%} of the synthetic images, "
                f"the universal inverted perturbation {trigger['flip_rate']:.0%} (class "
                f"{trigger['target_class_estimate']} most): the perturbation is taken as the trigger")
    if (trigger := probed["channel_trigger"]) is not None:
        where = ("each class to its own (all-to-all)" if all_to_all_suspected(trigger)
                 else f"class {trigger['target_class_estimate']} most")
        which = ("the perturbation inverted into the adversarially flagged class" if targeted and targeted["taken"]
                 else "the universal inverted perturbation")
        return f"no probe fires; {which} flips {trigger['flip_rate']:.0%} of the synthetic images, {where}"
    if targeted and targeted["flip_rate"] is not None:
        return (f"no probe fires, nor the universal inverted perturbation; inverted into class {targeted['into']} "
                f"(flagged adversarially, anomaly index {targeted['anomaly_index']:.1f}) it flips only "
                f"{targeted['flip_rate']:.0%}")
    return ""


def universal_inversion(universal: dict | None) -> tuple[dict, torch.Tensor] | None:
    """probe_triggers' "universal" record as flip_report's (report, delta), for suspected_target; None stays None."""
    return (universal["flip"], torch.tensor(universal["delta"])) if universal is not None else None


def exclusion_summary(target: int | None, inversion_concentration: float | None, excluded: int,
                      flip: dict | None = None, all_to_all: bool = False, trigger: dict | None = None,
                      suspicion: dict | None = None) -> dict:
    """The report's record of which synthetic images the fine-tune left out (``suspected_target``: the
    class left out, None when none was), of the universal inverted trigger (flip rate, consistency), of
    the all-to-all verdict, of the probes' firing trigger (``trigger``, None when none fired), and of
    what each target signal said (target_signals)."""
    return {"suspected_target": target, "inversion_concentration": inversion_concentration,
            "synthetic_excluded": excluded,
            "flip_rate": flip["flip_rate"] if flip else None,
            "flip_mapping_consistency": flip["mapping_consistency"] if flip else None,
            "all_to_all_suspected": all_to_all, "trigger": trigger, **target_signals(suspicion)}


def target_signals(suspicion: dict | None) -> dict:
    """What each signal says the target is and how strongly: the firing probe's class (its flip rate),
    the channel inversion's top class (its concentration; None when not run), the adversarial
    histogram's (its anomaly index) and the targeted inversion's (its flip rate; None when not taken); ``target_estimate`` is the class the scan flags (flagged_target;
    None when no signal is strong enough) and ``target_signals_agree`` whether every signal that names
    a class names that one."""
    if suspicion is None:
        return {"target_estimate": None, "target_signals": None, "target_signals_agree": None}
    found, inversion, adversarial = suspicion["found"], suspicion["inversion"], suspicion["adversarial"]
    signals = {"probe": [found["target_class_estimate"], found["flip_rate"]] if trigger_score(found) else None,
               "channel_inversion": ([inversion["target_class_estimate"], inversion["concentration"]]
                                     if inversion else None),
               "adversarial": [adversarial["target_class_estimate"], adversarial["anomaly_index"]],
               "targeted_inversion": ([suspicion["flip"]["inverted_into"], suspicion["flip"]["flip_rate"]]
                                      if "inverted_into" in suspicion["flip"] else None)}
    named = {sig[0] for sig in signals.values() if sig is not None}
    return {"target_estimate": suspicion["target"], "target_signals": signals,
            "target_signals_agree": len(named) == 1}


def found_summary_text(trigger: dict | None) -> str:
    """The defend log's words for the probes' firing trigger ('' when none fired)."""
    if trigger is None:
        return ""
    return (f"; the {trigger['kind']} probe's trigger ({trigger_text(trigger)}) flips "
            f"{trigger['flip_rate']:.0%} (class {trigger['target_class_estimate']} most), "
            f"{trigger['flip_rate_compact']:.0%} after compaction")


def scan_and_suspect(original: nn.Module, compact: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     cfg: DefendConfig, found: dict | None = None, universal: dict | None = None
                     ) -> tuple[dict | None, dict | None, Callable | None, dict | None]:
    """The original model's adversarial histogram report on the synthetic images (None when
    neither the scan nor the exclusion asks for it); when the fine-tune uses the suspicion
    (``cfg.exclude_suspected_target`` or an unlearning weight), the exclusion summary (else None)
    and the trigger to unlearn, as a function from normalized images to triggered ones (else None):
    the probes' firing trigger (``found``, a probe's report on ``original`` and ``x``)
    per ``cfg.patch_unlearn`` (its flip rate on ``compact``, the compacted model before the
    fine-tune, decides "residual"), else the universal inverted trigger when it fired within
    ``cfg.unlearn_scope`` (under "residual", an all-to-one one only when it still flips RESIDUAL_FLIP
    of ``x`` on ``compact``: the summary's "perturbation_residual"). The suspected target class is left out only with
    ``cfg.exclude_suspected_target``, and never when the trigger looks all-to-all. Last, the
    trigger the distillation gate verifies the teacher against (gate_trigger). ``universal``: the
    universal inversion probe_triggers made on ``original`` and ``x`` (None: made here)."""
    overruled = (universal or {}).get("overruled")
    if not (cfg.exclude_suspected_target or cfg.finetune.unlearn_weight):
        adversarial = histogram_report(original, x, y, cfg.pgd) if cfg.scan_before else None
        return adversarial, None, None, gate_trigger(found, None, None, len(x))
    suspicion = suspected_target(original, x, y, cfg.pgd, cfg.inversion, found, universal_inversion(universal))
    targeted = (universal or {}).get("targeted")
    # An all-to-all trigger has no target class: a class PGD names then is arbitrary, and leaving
    # its images out only costs that class.
    has_target = cfg.exclude_suspected_target and not suspicion["all_to_all"]
    target = suspicion["target"] if has_target else None
    excluded = int((y == target).sum()) if target is not None else 0
    flip = suspicion["flip"]
    spec = original.cc_spec
    universal = suspicion["trigger"] if all_to_all_suspected(flip) else None
    verify = suspicion["trigger"] if perturbation_fires(flip, cfg.perturbation_scope) else None
    delta, residual_record = suspicion["trigger"] if cfg.unlearn_scope == "any" else universal, None
    if cfg.unlearn_scope == "residual" and universal is None and verify is not None:
        residual = trigger_flip_rate(compact, x, perturbation_trigger(flip, verify, len(x)), len(x))
        residual_record = {"flip_rate_compact": residual, "unlearned": residual >= RESIDUAL_FLIP}
        delta = verify if residual_record["unlearned"] else None
    unlearn = (lambda images: add_pixel_delta(images, delta, spec)) if delta is not None else None
    fired = None
    if trigger_score(found):
        residual = trigger_flip_rate(compact, x, found, found["n"])
        unlearned = cfg.patch_unlearn == "always" or (cfg.patch_unlearn == "residual" and residual >= RESIDUAL_FLIP)
        fired = {k: v for k, v in found.items() if k in TRIGGER_RECORD_KEYS} | {
            "flip_rate_compact": residual, "unlearned": unlearned}
        if unlearned:
            unlearn = lambda images: apply_found_trigger(images, found, spec)  # noqa: E731
    inversion = suspicion["inversion"]
    summary = exclusion_summary(target, inversion["concentration"] if inversion else None, excluded, flip,
                                suspicion["all_to_all"], fired, suspicion)
    summary["targeted_inversion"] = targeted
    summary["perturbation_residual"] = residual_record
    summary["probe_overruled"] = overruled
    return suspicion["adversarial"], summary, unlearn, gate_trigger(found, flip, verify, len(x))


def gate_trigger(found: dict | None, flip: dict | None, universal: torch.Tensor | None, n: int) -> dict | None:
    """What the distillation gate verifies the teacher against: the probes' firing trigger
    (``found``), else the universal inverted perturbation ``universal`` (1, C, H, W) when the
    scan calls it all-to-all (its report ``flip``, on ``n`` synthetic images), the trigger an
    all-to-all backdoor is unlearned as; else None."""
    if trigger_score(found):
        return found
    return perturbation_trigger(flip, universal, n) if universal is not None else None


# What the report keeps of a probe's firing trigger: enough to apply it again (stamp, field or pattern) and its statistics.
TRIGGER_RECORD_KEYS = ("kind", "row", "col", "size", "value", "shift", "pattern", "alpha", "pull_class", "max_shift_used", "n",
                       "flip_rate", "target_class_estimate", "concentration", "mapping_consistency")

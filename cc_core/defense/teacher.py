"""The distillation gate: whether the student distills from the clipped teacher (verified against a
found trigger and for fidelity to the original), the teacher's own fine-tune, and the check that
keeps a distilled student only when it carries no more of the inverted trigger than one without."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from cc_core.adversarial import predictions
from cc_core.finetune import FinetuneConfig, finetune
from cc_core.probes import RESIDUAL_FLIP, apply_found_trigger, flip_mapping, trigger_flip_rate, trigger_score, trigger_text
from cc_core.scan import InversionConfig, all_to_all_suspected, flip_report
from cc_core.defense.config import DISTILL_CHECK_INVERSION, DefendConfig


# The "verified" gate's fidelity bar: the share of synthetic images on which the teacher agrees with
# the original (a teacher that loses more than this costs its student accuracy; docs/PRESET.md).
TEACHER_AGREEMENT = 0.99


# The distillation check keeps a distilled student when the universal inversion flips at most this
# much more of the synthetic images on it than on the undistilled one (docs/PRESET.md).
DISTILL_FLIP_MARGIN = 0.1


DISTILL_CHECK_SAMPLES = 512


def gated_teacher(teacher: nn.Module | None, original: nn.Module, cfg: DefendConfig, x: torch.Tensor | None = None,
                  found: dict | None = None, x_distill: torch.Tensor | None = None,
                  student: nn.Module | None = None) -> tuple[nn.Module | None, dict]:
    """The teacher the fine-tune distills from, by distillation_gate's decision: ``teacher``, a
    frozen copy of ``student`` where the gate anchors the student to itself, or None where it
    closes; with the gate's record."""
    record = distillation_gate(teacher, original, cfg, x, found, x_distill, can_anchor=student is not None)
    if not record["distill"]:
        return None, record
    return (copy.deepcopy(student).eval() if record["self_anchored"] else teacher), record


def distillation_gate(teacher: nn.Module | None, original: nn.Module, cfg: DefendConfig, x: torch.Tensor | None = None,
                      found: dict | None = None, x_distill: torch.Tensor | None = None,
                      can_anchor: bool = False) -> dict:
    """Whether the fine-tune distills, and from what: ``teacher`` (distillation_teacher's; None when
    there is no distillation) or nothing when the gate closes. With ``cfg.kd_gate`` "verified" the
    teacher must be clean and faithful: the trigger it is verified against (``found``, gate_trigger's:
    a probe's stamp, field or pattern, or an all-to-all universal perturbation, measured on the
    synthetic images ``x``) must flip < RESIDUAL_FLIP of them on it, and it must give >=
    TEACHER_AGREEMENT of the images the student is distilled on (``x_distill``, default ``x``: the
    synthetic images less the suspected target's, which carry the trigger and which a clean teacher
    takes out of the target class) the class ``original`` gives them or, for an all-to-all trigger,
    the class that trigger maps to it (teacher_agreement; a teacher the cleaning cost accuracy pulls
    the student down with it). A teacher the gate does not verify (any, with "always") is fine-tuned
    first when ``cfg.teacher_finetune`` is set (finetune_teacher), otherwise, under "verified",
    replaced by a frozen copy of the student (the compacted model before its fine-tune) with
    ``cfg.self_anchor`` where there is one (``can_anchor``), and otherwise not used. The record:
    {"gate", "distill", "teacher_finetune" (the teacher is to be fine-tuned first), "verified_against"
    (the trigger's kind; None when none), "teacher_trigger_flip_rate", "teacher_agreement",
    "teacher_undoes_mapping" (None when not measured), "reason" (why "verified" did not verify the
    teacher; None otherwise), "check" (distill_check's record, filled in after the fine-tune when it
    runs), "self_anchored" (the teacher is the student's copy)}."""
    record = {"gate": cfg.kd_gate, "distill": False, "teacher_finetune": False, "verified_against": None,
              "teacher_trigger_flip_rate": None, "teacher_agreement": None, "teacher_undoes_mapping": None,
              "reason": None, "check": None, "self_anchored": False}
    if teacher is None:
        return record
    if cfg.kd_gate == "verified":
        record |= verify_teacher(teacher, original, x, found, x_distill)
        if record["reason"] and cfg.teacher_finetune is None:
            if cfg.self_anchor and can_anchor:
                return record | {"distill": True, "self_anchored": True}
            return record
    return record | {"distill": True, "teacher_finetune": cfg.teacher_finetune is not None
                     and (cfg.kd_gate == "always" or record["reason"] is not None)}


def verify_teacher(teacher: nn.Module, original: nn.Module, x: torch.Tensor | None, found: dict | None,
                   x_distill: torch.Tensor | None = None) -> dict:
    """The "verified" gate's measurements of ``teacher`` (see gated_teacher; the agreement on
    ``x_distill``, default ``x``): {"verified_against" (the trigger's kind), "teacher_trigger_flip_rate",
    "teacher_agreement", "teacher_undoes_mapping" (teacher_agreement's), "reason": why it is not
    verified, None when it is}."""
    out = {"verified_against": None, "teacher_trigger_flip_rate": None, "teacher_agreement": None,
           "teacher_undoes_mapping": None, "reason": None}
    if x is None or not trigger_score(found):
        return out | {"reason": "the probes found no trigger to verify the teacher against"}
    teacher = teacher.to(x.device)
    out["verified_against"] = found["kind"]
    out["teacher_trigger_flip_rate"] = flip = trigger_flip_rate(teacher, x, found, found["n"])
    if flip >= RESIDUAL_FLIP:
        return out | {"reason": f"{trigger_name(found)} still flips {flip:.0%} of the synthetic images on the teacher"}
    agreement, undone = teacher_agreement(teacher, original, x if x_distill is None else x_distill, found)
    out |= {"teacher_agreement": agreement, "teacher_undoes_mapping": undone}
    if agreement + undone < TEACHER_AGREEMENT:
        undone_text = f" (and {undone:.1%} the class the trigger maps to it)" if undone else ""
        return out | {"reason": f"the teacher gives only {agreement:.1%} of the distilled synthetic images the original's class"
                                f"{undone_text} (< {TEACHER_AGREEMENT:.0%})"}
    return out


def teacher_agreement(teacher: nn.Module, original: nn.Module, x: torch.Tensor, found: dict | None) -> tuple[float, float]:
    """(agreement, undone) on synthetic images ``x`` (N, C, H, W): the fraction the teacher gives
    the class ``original`` gives them, and the fraction it gives instead the class the trigger
    ``found`` maps to the original's, when that trigger is all-to-all (its mapping measured on
    ``original`` and ``x``; 0 otherwise). Images synthesized through a model with an all-to-all
    backdoor carry its trigger, and a teacher without the backdoor gives them back the class the
    trigger took them from: that disagreement is the cleaning, not lost fidelity. One target class
    says nothing of where an image came from, so an all-to-one trigger excuses nothing."""
    ours, theirs = predictions(teacher, x), predictions(original, x)
    agreement = float((ours == theirs).float().mean())
    if not all_to_all_suspected(found):
        return agreement, 0.0
    triggered = predictions(original, apply_found_trigger(x, found, original.cc_spec))
    mapping = flip_mapping(theirs.cpu(), triggered.cpu(), original.cc_spec.num_classes).to(ours.device)
    return agreement, float(((ours != theirs) & (mapping[ours] == theirs)).float().mean())


def trigger_name(found: dict) -> str:
    """'the probe's patch' / '... warp' / '... blend', or 'the universal inverted perturbation'."""
    return trigger_text(found) if found["kind"] == "perturbation" else f"the probe's {found['kind']}"


def needs_distill_check(cfg: DefendConfig, record: dict) -> bool:
    """Whether the fine-tune distills from a teacher the gate did not verify and ``cfg`` asks for
    the distillation check (gated_teacher's ``record``)."""
    return (cfg.distill_check is not None and record["distill"] and not record.get("self_anchored")
            and (cfg.kd_gate == "always" or record["reason"] is not None))


def distill_check(distilled: nn.Module, undistilled: nn.Module, x: torch.Tensor,
                  cfg: InversionConfig = DISTILL_CHECK_INVERSION) -> dict:
    """The universal inversion's flip rate (scan.flip_report with ``cfg``) on the first
    DISTILL_CHECK_SAMPLES synthetic images of ``x`` (N, C, H, W) for two students fine-tuned the
    same way but for distillation; the distilled one is kept when its flip rate exceeds the
    undistilled one's by at most DISTILL_FLIP_MARGIN: {"flip_rate_distilled",
    "flip_rate_undistilled", "margin", "kept"}."""
    x = x[:DISTILL_CHECK_SAMPLES]
    distilled_flip = flip_report(distilled.eval(), x, cfg)[0]["flip_rate"]
    undistilled_flip = flip_report(undistilled.eval(), x, cfg)[0]["flip_rate"]
    return {"flip_rate_distilled": distilled_flip, "flip_rate_undistilled": undistilled_flip,
            "margin": DISTILL_FLIP_MARGIN, "kept": distilled_flip <= undistilled_flip + DISTILL_FLIP_MARGIN}


def distill_check_text(check: dict) -> str:
    """The defend log's words for the distillation check's verdict."""
    kept = "distilled" if check["kept"] else "undistilled"
    return (f"distillation check: the universal inversion flips {check['flip_rate_distilled']:.0%} of the synthetic "
            f"images on the distilled student, {check['flip_rate_undistilled']:.0%} on the undistilled one: "
            f"the {kept} student is kept")


def distillation_text(record: dict) -> str:
    """The defend log's words for the distillation gate's decision ('' when there is nothing to say)."""
    if record.get("self_anchored"):
        return f"the student distills from itself as it starts the fine-tune ({record['reason']})"
    if record["teacher_finetune"]:
        return "the teacher is fine-tuned before the student distills from it" + (
            f" ({record['reason']})" if record["reason"] else "")
    return f"no distillation: {record['reason']}" if record["reason"] else ""


def teacher_finetune_config(cfg: DefendConfig) -> FinetuneConfig:
    """The teacher's own fine-tune: the student's (distillation off) with ``cfg.teacher_finetune``."""
    return dataclasses.replace(finetune_config(cfg, None), **(cfg.teacher_finetune or {}))


def finetune_teacher(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None,
                     cfg: DefendConfig, x_trigger: torch.Tensor | None = None, left_out_class: int | None = None,
                     progress: bool = False) -> list[dict]:
    """Fine-tune ``teacher`` in place on the student's fine-tune data (``x`` (N, C, H, W), ``y``
    (N,), their adversarial and trigger copies, the class left out) with teacher_finetune_config:
    the recipe that removes a backdoor from the student, for a teacher nothing verified clean."""
    return finetune(teacher, x, y, x_adv, None, teacher_finetune_config(cfg), progress=progress,
                    x_trigger=x_trigger, left_out_class=left_out_class)


def finetune_config(cfg: DefendConfig, teacher: nn.Module | None) -> FinetuneConfig:
    """The student's fine-tune: ``cfg.finetune`` with its distillation terms off and
    ``cfg.undistilled_finetune`` on top when there is no ``teacher`` (the gate closed), and with
    ``cfg.distill_finetune`` when there is one and it distills."""
    if teacher is None:
        return dataclasses.replace(cfg.finetune, kd_weight=0.0, feature_weight=0.0, **(cfg.undistilled_finetune or {}))
    if not cfg.finetune.needs_teacher:
        return cfg.finetune
    return dataclasses.replace(cfg.finetune, **(cfg.distill_finetune or {}))

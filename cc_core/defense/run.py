"""End to end (``cc_core.defend``): clean + compact, synthesize, suspect, recovery fine-tune, evaluate.

``defend(model, ratio)`` runs docs/METHOD.md steps 1-7 without any real data and returns the new
model with a report in the ``cleancompact.report/1`` shape (docs/ARCHITECTURE.md). Presets:
``cpu`` (what finishes in minutes on 2 CPU cores) and ``paper`` (full-size, GPU-scale). The
baselines (CLP, ANP) at the same parameter budget: ``defend_baseline``."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cc_core.adversarial import pgd
from cc_core.compact import clean_compact
from cc_core.errors import ConfigError
from cc_core.finetune import guard_text, guarded_finetune
from cc_core.device import resolve_device
from cc_core.models import count_params
from cc_core.scan import histogram_report
from cc_core.synth import SynthConfig, synthesize
from cc_core.defense.config import DefendConfig, resolve_config
from cc_core.defense.report import DefendResult, REPORT_FORMAT, environment, macs, make_report, measure
from cc_core.defense.images import exclude_class
from cc_core.defense.suspect import found_summary_text, probe_text, probe_triggers, scan_and_suspect
from cc_core.defense.cleaning import bn_match_text, channel_clean, channel_clean_text, distillation_teacher, match_compact_bn
from cc_core.defense.teacher import distill_check, distill_check_text, distillation_text, finetune_config, finetune_teacher, gated_teacher, needs_distill_check


@dataclass
class DefenseRun:
    """What every step of one defense shares: its settings, device, progress and log, and the
    seconds each step took (``timings``, by step name)."""
    cfg: DefendConfig
    device: torch.device
    progress: bool
    log: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, step: str, add: bool = False):
        """Time the block as ``step`` (``add``: on top of what the step already took)."""
        start = time.perf_counter()
        yield
        self.timings[step] = (self.timings.get(step, 0.0) if add else 0.0) + time.perf_counter() - start

    def synthesize(self, source: nn.Module, synth: SynthConfig, given: tuple | None = None, step: str = "synthesize",
                   what: str = "") -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Synthetic images (N, C, H, W) and labels (N,) from ``source``'s BatchNorm statistics
        (``given`` (x, y) reused instead when set), with the synthesis log."""
        with self.timed(step):
            if given is not None:
                x, y = (t.to(self.device) for t in given)
                made = {"bn_loss": [float("nan")], "ce_loss": [float("nan")], "reused": True}
            else:
                x, y, made = synthesize(source, synth, device=self.device, progress=self.progress)
        self.log(f"[defend] synthesized {what}{len(y)} images in {self.timings[step]:.1f} s "
                 f"(final BN loss {made['bn_loss'][-1]:.3f})")
        return x, y, made

    def probe(self, original: nn.Module, x: torch.Tensor) -> dict:
        """probe_triggers on the synthetic images ``x``, logged."""
        with self.timed("trigger_probe"):
            probed = probe_triggers(original, x, self.cfg)
        if text := probe_text(probed):
            self.log(f"[defend] {text}")
        return probed


def defend(model: nn.Module, ratio: float | None = None, *, config: DefendConfig | None = None,
           preset: str = "cpu", eval_data=None, attack=None, progress: bool = True, log=print,
           synthetic: tuple | None = None, scan_synthetic: tuple | None = None, **overrides) -> DefendResult:
    """Run C&C on ``model`` (not modified) at compression ``ratio``.

    The settings are ``config`` if given, else ``preset`` with ``overrides`` (DefendConfig
    fields; nested ones as dicts, e.g. ``finetune={"epochs": 5}``). ``eval_data`` (ImageData)
    and ``attack`` only MEASURE ACC/ASR/RA before and after; the defense sees no real data.
    ``synthetic`` = (x, y) reuses synthetic images made earlier from the same model (sweeps and
    benchmarks share one synthesis across settings when ``synth_model='original'``), and
    ``scan_synthetic`` the scan's own (``cfg.scan_synth``) the same way."""
    if config is None:
        config = resolve_config(preset, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    cfg = config.replace(ratio=ratio) if ratio is not None else config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = DefenseRun(cfg, resolve_device(cfg.device), progress, log)
    t_start = time.perf_counter()
    original = copy.deepcopy(model).eval().to(run.device)
    spec = original.cc_spec

    probed = {"trigger": None, "universal": None, "channel_trigger": None}
    x_syn = y_syn = x_scan = y_scan = synth_log = None  # made after compaction under synth_model "compact"
    if cfg.synth_model == "original":
        x_syn, y_syn, synth_log = run.synthesize(original, cfg.synth, synthetic)
        x_scan, y_scan = x_syn, y_syn
        if cfg.scan_synth_config is not None:
            x_scan, y_scan, _ = run.synthesize(original, cfg.scan_synth_config, scan_synthetic, "synthesize_scan",
                                               "the scan's ")
        probed = run.probe(original, x_scan)
    new, plan, channel_info, candidate, bn_match = compact_step(run, original, x_syn, x_scan, probed["channel_trigger"])
    if cfg.synth_model == "compact":
        x_syn, y_syn, synth_log = run.synthesize(new, cfg.synth)
        x_scan, y_scan = x_syn, y_syn
        probed = run.probe(original, x_scan)

    with run.timed("scan"):
        scan_before, exclusion, unlearn, verify_against = scan_and_suspect(original, new, x_scan, y_scan, cfg,
                                                                           probed["trigger"], probed["universal"])
        x_ft, y_ft, excluded, n_made = finetune_images(cfg, x_syn, y_syn, x_scan, y_scan, exclusion)
    teacher, distillation = gated_teacher(candidate, original, cfg, x_scan, verify_against, x_ft, new)
    teacher = teacher.to(run.device) if teacher is not None else None
    if text := distillation_text(distillation):
        log(f"[defend] {text}")
    x_trigger = unlearn(x_ft) if unlearn is not None else None
    if exclusion is not None:
        log(f"[defend] {exclusion_text(exclusion, n_made, x_trigger is not None)}")
    adv_model = new if cfg.adversarial_model == "compact" else original
    with run.timed("adversarial"):
        x_adv = pgd(adv_model, x_ft, y_ft, cfg.pgd) if cfg.finetune.adv_weight > 0 else None
    if scan_before:
        log(f"[defend] adversarial histogram before: concentration {scan_before['concentration']:.2f}, "
            f"estimated target {scan_before['target_class_estimate']}")

    left_out = exclusion["suspected_target"] if excluded else None
    if distillation["teacher_finetune"]:
        teacher_metrics = teacher_step(run, teacher, x_ft, y_ft, x_adv, x_trigger, left_out, eval_data, attack)
        if teacher_metrics is not None:
            distillation["teacher_metrics"] = teacher_metrics
    new, history, guard = finetune_step(run, new, teacher, distillation, x_ft, y_ft, x_adv, x_trigger, left_out, x_scan)

    with run.timed("scan", add=True):
        scan_after = histogram_report(new, x_scan, y_scan, cfg.pgd) if cfg.scan_before else None
    with run.timed("evaluate", add=True):
        metrics = measure(original, new, eval_data, attack, run.device)

    new = new.cpu().eval()
    new.cc_spec = spec.replace(structure=new.cc_spec.structure)
    report = make_report(original.cpu(), new, cfg, plan, metrics, scan_before, scan_after, run.timings,
                         history, synth_log, run.device, channel_info, exclusion, distillation, guard, bn_match)
    run.timings["total"] = time.perf_counter() - t_start
    return DefendResult(new, report, plan)


def compact_step(run: DefenseRun, original: nn.Module, x_syn: torch.Tensor | None, x_scan: torch.Tensor | None,
                 clean_by: dict | None):
    """Channel clean (by ``clean_by``, the probes' channel trigger, on the scan's images ``x_scan``),
    Tucker-2 decomposition, clipping and rank pruning, then the BatchNorm matching: (the compact
    model on the run's device, the plan, the channel clean's record, the distillation teacher
    candidate, the BatchNorm matching's record)."""
    cfg = run.cfg
    with run.timed("channel_clean"):
        cleaned, channel_info = channel_clean(original.cpu(), cfg, x_scan.cpu() if clean_by else None, clean_by)
    calibration = x_syn[:cfg.calibration_samples].cpu() if cfg.needs_calibration else None
    new, plan = clean_compact(cleaned, ratio=cfg.ratio, tau=cfg.tau, normalizer=cfg.normalizer,
                              calibration=calibration, **cfg.compact)
    run.timings.update({k: plan.timings_s[k] for k in ("decompose", "clean", "compact")})
    original.to(run.device)
    new = new.to(run.device).eval()
    run.log(f"[defend] clean+compact: {channel_clean_text(channel_info)}, "
            f"{plan.params_before:,} -> {plan.params_after:,} parameters ({plan.ratio_achieved:.2f}x) "
            f"in {sum(run.timings.values()) - run.timings.get('synthesize', 0.0):.1f} s")
    candidate = distillation_teacher(cleaned, cfg)
    start = time.perf_counter()
    bn_match = match_compact_bn(new, cleaned, cfg, x_syn, candidate, clean_by)
    if bn_match is not None:
        run.timings["bn_match"] = time.perf_counter() - start
        run.log(f"[defend] {bn_match_text(bn_match)} in {run.timings['bn_match']:.1f} s")
    return new, plan, channel_info, candidate, bn_match


def finetune_images(cfg: DefendConfig, x_syn: torch.Tensor, y_syn: torch.Tensor, x_scan: torch.Tensor,
                    y_scan: torch.Tensor, exclusion: dict | None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The fine-tune's synthetic images and labels: ``x_syn`` (and the scan's own with
    ``cfg.finetune_on_scan_synthetic``) less the suspected target's; with how many were left out and
    how many were made. Records the count left out in ``exclusion`` (scan_and_suspect's)."""
    suspected = exclusion["suspected_target"] if exclusion else None
    x_ft, y_ft, excluded = exclude_class(x_syn, y_syn, suspected)
    n_made = len(y_syn)
    if cfg.finetune_on_scan_synthetic and x_scan is not x_syn:
        x_more, y_more, excluded_more = exclude_class(x_scan, y_scan, suspected)
        x_ft, y_ft, excluded = torch.cat([x_ft, x_more]), torch.cat([y_ft, y_more]), excluded + excluded_more
        n_made += len(y_scan)
    if exclusion is not None:  # counted on the fine-tune's images, which need not be the scan's
        exclusion["synthetic_excluded"] = excluded
    return x_ft, y_ft, excluded, n_made


def exclusion_text(exclusion: dict, n_made: int, unlearned: bool) -> str:
    """The defend log's words for the suspected target and what the fine-tune leaves out or unlearns."""
    a2a = " (all-to-all suspected)" if exclusion["all_to_all_suspected"] else ""
    return (f"suspected target class: {exclusion['suspected_target']}; {exclusion['synthetic_excluded']} "
            f"of {n_made} synthetic images left out of the fine-tune; the universal inverted trigger flips "
            f"{exclusion['flip_rate']:.0%}{a2a}{found_summary_text(exclusion['trigger'])}"
            f"{'; a trigger is unlearned' if unlearned else ''}")


def teacher_step(run: DefenseRun, teacher: nn.Module, x_ft, y_ft, x_adv, x_trigger, left_out: int | None,
                 eval_data=None, attack=None) -> dict | None:
    """Fine-tune the unverified ``teacher`` in place (finetune_teacher); with ``eval_data``, its
    ACC / ASR before and after (measure's record; None without)."""
    teacher_before = copy.deepcopy(teacher) if eval_data is not None else None
    with run.timed("teacher_finetune"):
        finetune_teacher(teacher, x_ft, y_ft, x_adv, run.cfg, x_trigger, left_out, run.progress)
    run.log(f"[defend] teacher fine-tuned in {run.timings['teacher_finetune']:.1f} s")
    if teacher_before is None:
        return None
    with run.timed("evaluate"):
        return measure(teacher_before, teacher, eval_data, attack, run.device)


def finetune_step(run: DefenseRun, new: nn.Module, teacher: nn.Module | None, distillation: dict, x_ft, y_ft, x_adv,
                  x_trigger, left_out: int | None, x_scan: torch.Tensor) -> tuple[nn.Module, list[dict], dict]:
    """The recovery fine-tune of the compact model ``new`` (guarded_finetune), and the distillation
    check against a student fine-tuned without the teacher when it applies (``distillation`` gets its
    record; the check inverts on the scan's images ``x_scan``). Returns (the student kept, its history,
    its guard's record)."""
    cfg = run.cfg
    with run.timed("finetune"):
        ft_cfg = finetune_config(cfg, teacher)
        undistilled = copy.deepcopy(new) if needs_distill_check(cfg, distillation) else None
        history, guard = guarded_finetune(new, x_ft, y_ft, x_adv, teacher, ft_cfg, progress=run.progress,
                                          x_trigger=x_trigger, left_out_class=left_out)
        if text := guard_text(guard):
            run.log(f"[defend] {text}")
    run.log(f"[defend] fine-tuned in {run.timings['finetune']:.1f} s")
    if undistilled is not None:
        with run.timed("distill_check"):
            undistilled_history, undistilled_guard = guarded_finetune(
                undistilled, x_ft, y_ft, x_adv, None, finetune_config(cfg, None), progress=run.progress,
                x_trigger=x_trigger, left_out_class=left_out)
            distillation["check"] = check = distill_check(new, undistilled, x_scan, cfg.distill_check)
            if not check["kept"]:
                new, history, guard = undistilled, undistilled_history, undistilled_guard
        run.log(f"[defend] {distill_check_text(check)} ({run.timings['distill_check']:.1f} s)")
    return new, history, guard


BASELINES = ("clp", "anp")


def defend_baseline(model: nn.Module, method: str, ratio: float, eval_data=None, attack=None,
                    clean_data=None, u: float = 3.0, anp_cfg=None, device=None,
                    progress: bool = True, log=print) -> DefendResult:
    """CLP or ANP, pruned to the same parameter budget as C&C at ``ratio`` (Table 2 setting).

    The parameter count of a pruned model is its number of nonzero parameters."""
    from cc_core.baselines import ANPConfig, anp_masks, anp_prune, clp_to_budget, nonzero_params

    if method not in BASELINES:
        raise ConfigError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    if not ratio > 1:
        raise ConfigError(f"ratio must be > 1, got {ratio!r}")
    device = resolve_device(device)
    t_start = time.perf_counter()
    original = copy.deepcopy(model).eval().cpu()
    start = time.perf_counter()
    if method == "clp":
        pruned, info = clp_to_budget(original, ratio, u)
    else:
        if clean_data is None:
            raise ConfigError("ANP needs clean data (--clean-data): it is not data-free")
        cfg = anp_cfg or ANPConfig()
        pruned, info = anp_prune(original, anp_masks(original, clean_data, cfg, progress), cfg.threshold, ratio)
        info["clean_samples"] = len(clean_data)
    timings = {"prune": time.perf_counter() - start}
    log(f"[defend] {method}: {info['nonzero_params']:,} nonzero of {info['total_params']:,} parameters "
        f"in {timings['prune']:.1f} s")
    start = time.perf_counter()
    metrics = measure(original, pruned, eval_data, attack, device)
    timings["evaluate"] = time.perf_counter() - start
    pruned = pruned.cpu().eval()
    params_after = nonzero_params(pruned)
    spec = original.cc_spec
    report = {
        "format": REPORT_FORMAT,
        "model": {"arch": spec.arch, "params_before": count_params(original), "params_after": params_after,
                  "compression": count_params(original) / params_after,
                  "macs_before": macs(original, spec.input_shape), "macs_after": macs(pruned, spec.input_shape)},
        "config": {"method": method, "ratio": ratio, "u": u if method == "clp" else None,
                   "anp": dataclasses.asdict(anp_cfg or ANPConfig()) if method == "anp" else None},
        "metrics": metrics,
        "scan": {"target_class_estimate": None, "concentration_before": None, "concentration_after": None},
        "onnx": None,
        "timings_s": timings | {"total": time.perf_counter() - t_start},
        "baseline": info,
        "environment": environment(device),
    }
    return DefendResult(pruned, report, None)

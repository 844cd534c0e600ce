"""End to end (``cc_core.defend``): clean + compact, synthesize, adversarial, recovery fine-tune, evaluate, export.

``defend(model, ratio)`` runs docs/METHOD.md steps 1-7 without any real data and returns the new
model with a report in the ``cleancompact.report/1`` shape (docs/ARCHITECTURE.md). Presets:
``cpu`` (what finishes in minutes on 2 CPU cores) and ``paper`` (full-size, GPU-scale).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cc_core.adversarial import PGDConfig, add_pixel_delta, pgd, predictions
from cc_core.baselines.clp import CHANNEL_MODES
from cc_core.compact import clean_compact
from cc_core.compact.bn_match import match_bn_statistics
from cc_core.compact.transform import needs_calibration
from cc_core.errors import ConfigError
from cc_core.fileio import git_commit
from cc_core.finetune import FinetuneConfig, finetune, guard_text, guarded_finetune
from cc_core.device import precision, resolve_device
from cc_core.metrics import evaluate
from cc_core.models import count_params
from cc_core.settings import parse_toml
from cc_core.probes import (RESIDUAL_FLIP, BlendProbeConfig, MaskProbeConfig, PatchProbeConfig, WarpProbeConfig,
                            apply_found_trigger, blend_probe, flip_mapping, found_trigger, mask_probe, patch_probe,
                            patch_score, perturbation_trigger, trigger_flip_rate, trigger_score, trigger_text,
                            warp_probe)
from cc_core.scan import (ANOMALY_THRESHOLD, FLIP_THRESHOLD, InversionConfig, all_to_all_suspected, flip_report,
                          flip_score, histogram_report, suspected_target, targeted_flip_report)
from cc_core.synth import SynthConfig, balanced_labels, synthesize

REPORT_FORMAT = "cleancompact.report/1"
UNLEARN_SCOPES = ("all-to-all", "any", "residual")
PERTURBATION_SCOPES = ("all-to-all", "any", "targeted")
PATCH_UNLEARN = ("residual", "always", "never")
KD_GATES = ("always", "verified")
BN_MATCH_SCOPES = ("always", "trigger")
MODEL_STAGES = ("compact", "original")
RESYNTHESES = (None, "cleaned", "finetuned", "recognized")
# DefendConfig's fields that take one of a few values, and the probe sections a dict stands for.
CHOICES = {"channel_mode": CHANNEL_MODES, "unlearn_scope": UNLEARN_SCOPES, "perturbation_scope": PERTURBATION_SCOPES,
           "kd_gate": KD_GATES, "bn_match_scope": BN_MATCH_SCOPES, "patch_unlearn": PATCH_UNLEARN,
           "adversarial_model": MODEL_STAGES, "synth_model": MODEL_STAGES, "resynthesize_suspected_target": RESYNTHESES}
PROBE_SECTIONS = {"patch_probe": PatchProbeConfig, "warp_probe": WarpProbeConfig, "blend_probe": BlendProbeConfig,
                  "mask_probe": MaskProbeConfig}
# The "verified" gate's fidelity bar: the share of synthetic images on which the teacher agrees with
# the original (a teacher that loses more than this costs its student accuracy; docs/PRESET.md).
TEACHER_AGREEMENT = 0.99
# The distillation check keeps a distilled student when the universal inversion flips at most this
# much more of the synthetic images on it than on the undistilled one (docs/PRESET.md).
DISTILL_FLIP_MARGIN = 0.1
DISTILL_CHECK_SAMPLES = 512
# What ``distill_check=True`` runs: one inversion of 50 steps, the scan's verdict at a fifth of its cost.
DISTILL_CHECK_INVERSION = InversionConfig(steps=50, restarts=1)


def check_inversion(value) -> InversionConfig | None:
    """DefendConfig.distill_check from what a flag, a file or the caller gives: None / False (off),
    True (DISTILL_CHECK_INVERSION), a dict (overrides of it) or an InversionConfig."""
    if value is None or value is False:
        return None
    if value is True:
        return DISTILL_CHECK_INVERSION
    if isinstance(value, dict):
        try:
            return dataclasses.replace(DISTILL_CHECK_INVERSION, **value)
        except TypeError as e:
            raise ConfigError(f"distill_check takes inversion settings: {e}") from None
    if isinstance(value, InversionConfig):
        return value
    raise ConfigError(f"distill_check must be true, false, inversion settings or None, got {value!r}")


@dataclass(frozen=True)
class DefendConfig:
    """Every setting of a defense. The presets (cc_core/presets/*.toml) set some of them; why each
    preset value is what it is, with the measurements behind it: docs/PRESET.md."""

    ratio: float = 2.0
    # Clipping of normalized singular values (METHOD.md step 2); None: no clipping.
    tau: float | None = 4.0
    normalizer: str = "mean"
    # CLP's data-free channel clean before the Tucker step: zero output channels whose Lipschitz
    # bound exceeds their layer's mean + u std (None: off), or shrink / hold them (channel_mode).
    channel_u: float | None = 3.0
    channel_mode: str = "zero"
    # When a probe's trigger fires on the synthetic images, zero the channels it excites (effect
    # z-score > u per layer; cc_core.trigger_clean). None: off. Needs synth_model="original".
    trigger_channel_u: float | None = None
    # Whether CLP's channel clean also runs when a probe's trigger fires (False: that trigger's channels alone).
    clp_with_trigger: bool = True
    # The same clean with the scan's universal inverted perturbation as the trigger, when no probe
    # fires and that perturbation maps each class to its own (all-to-all). None: off.
    perturbation_channel_u: float | None = None
    # With a floor, that clean lowers its threshold from perturbation_channel_u in steps of 0.5 down
    # to this floor until the perturbation flips fewer than perturbation_channel_quiet of the
    # synthetic images (cc_core.trigger_clean.prune_until_quiet): its effect can be spread over more
    # channels than a fixed threshold takes. None: the fixed threshold.
    perturbation_channel_floor: float | None = None
    perturbation_channel_quiet: float = 0.02
    # ...but never below a threshold after which some class keeps fewer than this fraction of its
    # synthetic images (the channels a class needs are going).
    perturbation_channel_keep: float = 0.9
    # Which universal inverted perturbation counts as a trigger when no probe fires: only one that
    # sends each class to its own ("all-to-all"), or any that fires (flip_score >= FLIP_THRESHOLD,
    # "any": then it also names the trigger the distillation gate verifies the teacher against), or,
    # where the untargeted one does not fire, also the targeted inversion into the class the
    # adversarial histogram flags ("targeted": untargeted_or_targeted).
    perturbation_scope: str = "all-to-all"
    # Also invert the perturbation when a probe fires, and act on it instead of the probe's trigger
    # when it fires (perturbation_scope) and flips more of the synthetic images: a probe can fire on
    # a trigger that is not its kind (the tuning zoo's noise model: the warp probe, 44% against 87%).
    perturbation_over_probe: bool = False
    compact: dict = field(default_factory=dict)  # extra clean_compact options (rank_strategy, ...)
    synth: SynthConfig = SynthConfig()
    pgd: PGDConfig = PGDConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    adversarial_model: str = "compact"  # which model PGD attacks for the adversarial term
    # "original": synthesize from the suspect before compaction (probes, channel cleans and BN
    # matching need it); "compact": from the compacted model.
    synth_model: str = "compact"
    scan_before: bool = True
    # Leave the synthetic images of the suspected target class out of the fine-tune (they carry
    # the trigger; leaving them out costs that class accuracy).
    exclude_suspected_target: bool = True
    # Put images of the left-out class back: made through the cleaned model ("cleaned"), through
    # the fine-tuned one ("finetuned", then fine-tuned again), or those the fine-tuned model
    # recognizes ("recognized"). None: the class stays out.
    resynthesize_suspected_target: str | None = None
    # A second round of synthetic images after compaction (SynthConfig overrides; with a
    # competition_weight, pushed to where compact and original disagree). None: no second round.
    competition_synth: dict | None = None
    # SynthConfig overrides for the scan's own synthetic images (the probes, the channel cleans, the
    # scan and the distillation gate use them; the fine-tune keeps ``synth``'s). None: one set.
    scan_synth: dict | None = None
    finetune_on_scan_synthetic: bool = False  # the scan's images join the fine-tune too
    # The trigger inversions that name the suspected target (run when excluding it or unlearning).
    inversion: InversionConfig = InversionConfig()
    # Which inverted trigger the fine-tune unlearns (finetune.unlearn_weight > 0): only an
    # all-to-all one, any that fires, or an all-to-all one and any firing one that still flips
    # RESIDUAL_FLIP of the synthetic images on the compacted model ("residual", patch_unlearn's rule).
    unlearn_scope: str = "all-to-all"
    # The probes (cc_core.probes; None: off): solid patches, smooth warps (run when no patch fires),
    # smooth blended patterns (run when neither fires), mask-and-pattern stamps of a few percent of
    # the image (run when none of those fires). A firing probe's trigger names the target,
    # guides the trigger channel clean, verifies the teacher and may be unlearned (patch_unlearn).
    patch_probe: PatchProbeConfig | None = PatchProbeConfig()
    warp_probe: WarpProbeConfig | None = None
    blend_probe: BlendProbeConfig | None = None
    mask_probe: MaskProbeConfig | None = None
    # Unlearn a firing probe's trigger: when it still flips >= RESIDUAL_FLIP of the synthetic
    # images after compaction ("residual"), "always" or "never".
    patch_unlearn: str = "residual"
    # Distill from the clipped full-rank teacher "always", or only when a found trigger no longer
    # flips it and it agrees with the original ("verified": gated_teacher). An unverified teacher
    # hands its backdoor on.
    kd_gate: str = "always"
    # Fine-tune overrides for an unverified teacher, fine-tuned before it is distilled from ({}: the
    # student's recipe); None: not used under "verified".
    teacher_finetune: dict | None = None
    # Where "verified" verifies no teacher (and none is fine-tuned): distill from the student itself
    # as it starts the fine-tune (gated_teacher), so that the fine-tune's other terms pull it no
    # further from its starting outputs on clean synthetic images than they must; False: no distillation.
    self_anchor: bool = False
    # Fine-tune overrides for a student that distills (DISTILL_ALONE: from its teacher alone); None: as is.
    distill_finetune: dict | None = None
    # Keep a student distilled from an unverified teacher only when the universal inversion flips
    # at most DISTILL_FLIP_MARGIN more of the synthetic images on it than on one fine-tuned without
    # the teacher (True / False / inversion settings; check_inversion).
    distill_check: InversionConfig | None = None
    # Synthetic images the "sensitivity" rank strategy measures each layer on.
    calibration_samples: int = 256
    # Match the compact model's BatchNorm statistics to the clipped full-rank model's on this many
    # synthetic images (cc_core.compact.bn_match; None: off), "always" or only where a probe's
    # trigger fired ("trigger").
    bn_match_samples: int | None = None
    bn_match_scope: str = "always"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, section in PROBE_SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, section(**getattr(self, name)))
        object.__setattr__(self, "distill_check", check_inversion(self.distill_check))
        self._check_values()
        self._check_sections()
        self._check_stage_order()
        self._check_channel_cleans()

    def _check_values(self) -> None:
        """Each field on its own: ranges, and the fields that take one of a few values (CHOICES)."""
        if not isinstance(self.ratio, (int, float)) or not self.ratio > 1:
            raise ConfigError(f"ratio must be > 1 for a defense that compacts, got {self.ratio!r}")
        if self.tau is not None and not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau!r}")
        if self.channel_u is not None and not self.channel_u > 0:
            raise ConfigError(f"channel_u must be > 0 (or None to turn the channel clean off), got {self.channel_u!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        if not isinstance(self.calibration_samples, int) or self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples must be a positive integer, got {self.calibration_samples!r}")
        if self.bn_match_samples is not None and (not isinstance(self.bn_match_samples, int) or self.bn_match_samples < 1):
            raise ConfigError(f"bn_match_samples must be a positive integer (or None to turn it off), "
                              f"got {self.bn_match_samples!r}")

    def _check_sections(self) -> None:
        """The override sections (synthesis or fine-tune settings over the fields they start from)."""
        for name, base, what in (("competition_synth", self.synth, "synthesis"), ("scan_synth", self.synth, "synthesis"),
                                 ("teacher_finetune", self.finetune, "fine-tune"),
                                 ("distill_finetune", self.finetune, "fine-tune")):
            if getattr(self, name) is not None:
                try:
                    dataclasses.replace(base, **getattr(self, name))
                except TypeError as e:
                    raise ConfigError(f"{name} takes {what} settings: {e}") from None

    def _check_stage_order(self) -> None:
        """Settings that need images made before compaction, or another setting, to run at all."""
        if self.distill_check is not None and self.resynthesize_suspected_target in ("finetuned", "recognized"):
            raise ConfigError("distill_check compares one fine-tune with and without distillation; "
                              f"resynthesize_suspected_target={self.resynthesize_suspected_target!r} fine-tunes twice")
        if self.scan_synth is not None and self.synth_model != "original":
            raise ConfigError("scan_synth makes the scan's images before compaction: it needs synth_model='original'")
        if self.finetune_on_scan_synthetic and self.scan_synth is None:
            raise ConfigError("finetune_on_scan_synthetic adds the scan's own images to the fine-tune: it needs scan_synth")
        if self.bn_match_samples is not None and self.synth_model != "original":
            raise ConfigError("bn_match_samples needs synthetic images made before compaction (synth_model='original')")
        if self.needs_calibration and self.synth_model != "original":
            raise ConfigError("rank_strategy 'sensitivity' and method 'activation' measure the layers on synthetic "
                              "images made before compaction: they need synth_model='original'")

    def _check_channel_cleans(self) -> None:
        """The trigger channel clean (by a probe's trigger) and the perturbation's (by the inverted one)."""
        if self.perturbation_channel_u is not None:
            if not self.perturbation_channel_u > 0:
                raise ConfigError("perturbation_channel_u must be > 0 (or None to turn it off), "
                                  f"got {self.perturbation_channel_u!r}")
            if self.synth_model != "original":
                raise ConfigError("perturbation_channel_u needs synthetic images made before compaction "
                                  "(synth_model='original')")
        floor, start = self.perturbation_channel_floor, self.perturbation_channel_u
        if floor is not None and not (floor > 0 and (start is None or floor <= start)):
            raise ConfigError(f"perturbation_channel_floor must be in (0, perturbation_channel_u], got {floor!r} "
                              f"(perturbation_channel_u {start!r}; null turns the floor off)")
        if not 0 <= self.perturbation_channel_keep <= 1:
            raise ConfigError(f"perturbation_channel_keep must be in [0, 1] (0: no guard), got {self.perturbation_channel_keep!r}")
        if not 0 < self.perturbation_channel_quiet <= 1:
            raise ConfigError(f"perturbation_channel_quiet must be in (0, 1], got {self.perturbation_channel_quiet!r}")
        if self.trigger_channel_u is not None:
            if not self.trigger_channel_u > 0:
                raise ConfigError(f"trigger_channel_u must be > 0 (or None to turn it off), got {self.trigger_channel_u!r}")
            probes = (self.patch_probe, self.warp_probe, self.blend_probe, self.mask_probe)
            if all(probe is None for probe in probes) or self.synth_model != "original":
                raise ConfigError("trigger_channel_u needs a trigger probe and synthetic images made before compaction "
                                  "(patch_probe, warp_probe, blend_probe or mask_probe set, synth_model='original')")

    @property
    def scan_synth_config(self) -> SynthConfig | None:
        """The synthesis settings of the scan's own images (``scan_synth`` over ``synth``); None when
        the scan runs on the fine-tune's images, also when those settings are the fine-tune's."""
        scan = None if self.scan_synth is None else dataclasses.replace(self.synth, **self.scan_synth)
        return None if scan == self.synth else scan

    @property
    def needs_calibration(self) -> bool:
        return needs_calibration(self.compact.get("rank_strategy"), self.compact.get("method"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "DefendConfig":
        """A copy with ``changes``; a section (synth, finetune, ...) given as a dict changes only its keys.
        An unknown field or a value of the wrong type is a ConfigError."""
        try:
            for key in ("synth", "pgd", "finetune", "inversion", "patch_probe", "warp_probe", "blend_probe",
                        "mask_probe", "distill_check"):
                if isinstance(changes.get(key), dict) and getattr(self, key) is not None:
                    changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
            if "compact" in changes:
                changes["compact"] = self.compact | changes["compact"]
            return dataclasses.replace(self, **changes)
        except TypeError as e:
            raise ConfigError(f"invalid setting: {e}") from None


# A student that learns from its teacher alone (DefendConfig.distill_finetune, opt-in).
DISTILL_ALONE = {"synth_weight": 0.0, "mixup_alpha": 1.0, "epochs": 30, "max_grad_norm": 1.0}


def preset_settings(name: str) -> dict:
    """The settings of preset ``name`` as its file (cc_core/presets/<name>.toml) writes them: the fields
    that differ from DefendConfig's defaults. Why each is what it is: docs/PRESET.md."""
    from importlib import resources

    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    return parse_toml(resources.files("cc_core.presets").joinpath(f"{name}.toml").read_text(), f"preset {name}")


def config_from_dict(settings: dict, base: "DefendConfig | None" = None) -> "DefendConfig":
    """``base`` (DefendConfig's defaults when None) with ``settings`` laid over it: top-level keys are
    DefendConfig fields, a dict changes only the keys it names of a section (synth, finetune, ...)."""
    return (base or DefendConfig()).replace(**settings)


def with_seed(cfg: "DefendConfig", seed: int) -> "DefendConfig":
    """``cfg`` with ``seed`` in every section that has one (synthesis, PGD, fine-tune, inversion, probes)."""
    return cfg.replace(**seed_settings(cfg, seed))


def seed_settings(cfg: "DefendConfig", seed: int) -> dict:
    """The settings that put ``seed`` in every section of ``cfg`` that has one: {section: {"seed": seed}}."""
    return {f.name: {"seed": seed} for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name)) and hasattr(getattr(cfg, f.name), "seed")}


PRESET_NAMES = ("cpu", "paper")
PRESETS: dict[str, DefendConfig] = {name: config_from_dict(preset_settings(name)) for name in PRESET_NAMES}


def resolve_config(preset: str = "cpu", **overrides) -> DefendConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset].replace(**overrides)


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
    cleaned, new, plan, channel_info, candidate, bn_match = compact_step(run, original, x_syn, x_scan,
                                                                         probed["channel_trigger"])
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
    x_ft, y_ft = more_finetune_images(run, original, new, cleaned, x_ft, y_ft, exclusion, excluded)
    x_trigger = unlearn(x_ft) if unlearn is not None else None
    if exclusion is not None:
        log(f"[defend] {exclusion_text(exclusion, n_made, x_trigger is not None)}")
    adv_model = new if cfg.adversarial_model == "compact" else original
    with run.timed("adversarial"):
        x_adv = pgd(adv_model, x_ft, y_ft, cfg.pgd) if cfg.finetune.adv_weight > 0 else None
    if scan_before:
        log(f"[defend] adversarial histogram before: concentration {scan_before['concentration']:.2f}, "
            f"estimated target {scan_before['target_class_estimate']}")

    suspected = exclusion["suspected_target"] if exclusion else None
    left_out = suspected if excluded and cfg.resynthesize_suspected_target != "cleaned" else None
    if distillation["teacher_finetune"]:
        teacher_metrics = teacher_step(run, teacher, x_ft, y_ft, x_adv, x_trigger, left_out, eval_data, attack)
        if teacher_metrics is not None:
            distillation["teacher_metrics"] = teacher_metrics
    new, history, guard = finetune_step(run, new, teacher, distillation, x_ft, y_ft, x_adv, x_trigger, left_out,
                                        (x_syn, y_syn, x_scan), exclusion, excluded, unlearn, adv_model)

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
    Tucker-2 decomposition, clipping and rank pruning, then the BatchNorm matching: (the
    channel-cleaned model, the compact one on the run's device, the plan, the channel clean's
    record, the distillation teacher candidate, the BatchNorm matching's record)."""
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
    return cleaned, new, plan, channel_info, candidate, bn_match


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


def more_finetune_images(run: DefenseRun, original: nn.Module, new: nn.Module, cleaned: nn.Module, x_ft: torch.Tensor,
                         y_ft: torch.Tensor, exclusion: dict | None, excluded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_ft``, ``y_ft`` with the images the settings add before the fine-tune: the suspected
    target's made again through the channel-cleaned model (resynthesize_suspected_target
    "cleaned") and the competition round (competition_synth)."""
    cfg = run.cfg
    suspected = exclusion["suspected_target"] if exclusion else None
    if cfg.resynthesize_suspected_target == "cleaned" and excluded:
        with run.timed("resynthesize"):
            x_new, y_new = resynthesize_class(cleaned, suspected, excluded, cfg.synth, run.device, run.progress)
            x_ft, y_ft = torch.cat([x_ft, x_new]), torch.cat([y_ft, y_new])
            exclusion["synthetic_resynthesized"] = len(y_new)
        run.log(f"[defend] {excluded} synthetic images of class {suspected} made again through the channel-cleaned "
                f"model in {run.timings['resynthesize']:.1f} s")
    if cfg.competition_synth is not None:
        with run.timed("competition_synthesize"):
            x_new, y_new = synthesize_competing(original, new, cfg, suspected if excluded else None, run.device,
                                                run.progress)
            x_ft, y_ft = torch.cat([x_ft, x_new]), torch.cat([y_ft, y_new])
        run.log(f"[defend] {len(y_new)} more synthetic images made after compaction in "
                f"{run.timings['competition_synthesize']:.1f} s")
    return x_ft, y_ft


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
                  x_trigger, left_out: int | None, made: tuple, exclusion: dict | None, excluded: int, unlearn,
                  adv_model: nn.Module) -> tuple[nn.Module, list[dict], dict]:
    """The recovery fine-tune of the compact model ``new`` (guarded_finetune), a second round on the
    suspected target's images made again (resynthesize_suspected_target "finetuned" / "recognized"),
    and the distillation check against a student fine-tuned without the teacher when it applies
    (``distillation`` gets its record). ``made``: (x_syn, y_syn, x_scan), the images synthesized
    before the fine-tune. Returns (the student kept, its history, its guard's record)."""
    cfg = run.cfg
    x_syn, y_syn, x_scan = made
    with run.timed("finetune"):
        ft_cfg = finetune_config(cfg, teacher)
        undistilled = copy.deepcopy(new) if needs_distill_check(cfg, distillation) else None
        history, guard = guarded_finetune(new, x_ft, y_ft, x_adv, teacher, ft_cfg, progress=run.progress,
                                          x_trigger=x_trigger, left_out_class=left_out)
        if text := guard_text(guard):
            run.log(f"[defend] {text}")
        if cfg.resynthesize_suspected_target in ("finetuned", "recognized") and excluded:
            suspected = exclusion["suspected_target"]
            if cfg.resynthesize_suspected_target == "finetuned":
                x_new, y_new = resynthesize_class(new, suspected, excluded, cfg.synth, run.device, run.progress)
            else:
                x_new, y_new = recognized_class(new, x_syn, y_syn, suspected)
            exclusion["synthetic_resynthesized"] = len(y_new)
            x_ft, y_ft = torch.cat([x_ft, x_new]), torch.cat([y_ft, y_new])
            x_trigger = unlearn(x_ft) if unlearn is not None else None
            x_adv = pgd(adv_model, x_ft, y_ft, cfg.pgd) if cfg.finetune.adv_weight > 0 else None
            history += finetune(new, x_ft, y_ft, x_adv, teacher, ft_cfg, progress=run.progress, x_trigger=x_trigger)
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


def exclude_class(x: torch.Tensor, y: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y) without the samples labelled ``target`` (all of them when None), and how many went."""
    if target is None:
        return x, y, 0
    keep = y != target
    return x[keep], y[keep], int((~keep).sum())


def synthesize_competing(original: nn.Module, compact: nn.Module, cfg: DefendConfig, left_out: int | None,
                         device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The second round of ``cfg.competition_synth``: images (n, C, H, W) from ``original``'s
    BatchNorm statistics that ``compact`` (not modified) classifies unlike ``original`` (with a
    competition weight > 0), with labels (n,) balanced over every class but ``left_out``. Seeded
    apart from the first round."""
    synth = dataclasses.replace(cfg.synth, **cfg.competition_synth)
    synth = dataclasses.replace(synth, seed=synth.seed + 2)
    labels = balanced_labels(synth.n_samples, original.cc_spec.num_classes,
                             torch.Generator().manual_seed(synth.seed), exclude=left_out)
    x, y, _ = synthesize(original, synth, labels=labels, device=device, progress=progress,
                         student=compact if synth.competition_weight > 0 else None)
    return x, y


def resynthesize_class(cleaned: nn.Module, target: int, n: int, synth: SynthConfig, device=None,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images (n, C, H, W) labelled ``target``, made through ``cleaned`` (the
    channel-cleaned full-rank model) instead of the backdoored original: the suspected target's
    own images, made through the original, carry its trigger, and leaving the class out of the
    fine-tune costs that class most of the accuracy the defense loses. Seeded apart from the
    first synthesis."""
    labels = torch.full((n,), int(target), dtype=torch.long)
    cfg = dataclasses.replace(synth, seed=synth.seed + 1)
    x, y, _ = synthesize(cleaned, cfg, labels=labels, device=device, progress=progress)
    return x, y


def recognized_class(student: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic images ``x`` labelled ``target`` that the fine-tuned ``student`` (whose
    backdoor is gone) also puts in ``target``, with their labels: (n, C, H, W), (n,)."""
    x_target, y_target = x[y == target], y[y == target]
    keep = predictions(student, x_target) == target
    return x_target[keep], y_target[keep]


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


def channel_clean(model: nn.Module, cfg: DefendConfig, x: torch.Tensor | None = None,
                  found: dict | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with its outlier-Lipschitz channels (``cfg.channel_u``) zeroed, shrunk or
    held at their mean (``cfg.channel_mode``; the model itself when off, and when a probe's trigger
    fires and ``cfg.clp_with_trigger`` is False), then the trigger channel
    clean (``trigger_clean``) with ``found`` (channel_trigger's: the probes' firing trigger or an
    all-to-all universal perturbation) on synthetic images ``x``;
    and {"u", "mode", "pruned": {conv: n}, "n_pruned", "clp_skipped" (for the firing trigger),
    "trigger": trigger_clean's record}."""
    from cc_core.baselines.clp import clp

    skip_clp = (cfg.channel_u is not None and not cfg.clp_with_trigger and cfg.trigger_channel_u is not None
                and probe_fired(found))
    if cfg.channel_u is None or skip_clp:
        cleaned, info = model, {"u": None, "mode": None, "pruned": {}, "n_pruned": 0}
    else:
        cleaned, info = clp(model, cfg.channel_u, cfg.channel_mode)
    info["clp_skipped"] = skip_clp
    cleaned, info["trigger"] = trigger_clean(cleaned, x, found, cfg)
    return cleaned, info


def probe_fired(found: dict | None) -> bool:
    """Whether channel_trigger's ``found`` is a probe's firing trigger (not the universal perturbation)."""
    return bool(trigger_score(found)) and found.get("kind") != "perturbation"


def trigger_clean(model: nn.Module, x: torch.Tensor | None, found: dict | None,
                  cfg: DefendConfig) -> tuple[nn.Module, dict]:
    """``model`` with the channels the trigger ``found`` excites zeroed (cc_core.trigger_clean); else
    ``model`` itself. A probe's firing stamp, warp or blend cleans at z > ``cfg.trigger_channel_u``,
    and only when it still flips >= RESIDUAL_FLIP of the first ``found["n"]`` synthetic images ``x``
    on ``model`` (CLP's clean may have taken it out already); an all-to-all universal perturbation
    (channel_trigger's) at z > ``cfg.perturbation_channel_u``, whatever it flips there: inverted on
    the original, it can stop flipping the channel-cleaned model while the backdoor stays (the zoo's
    all-to-all Blended model, perturbation_clean.md). With ``cfg.perturbation_channel_floor`` the
    perturbation's threshold is lowered from there until it flips fewer than
    ``cfg.perturbation_channel_quiet`` of those images, but not past a threshold that costs a class
    more than ``cfg.perturbation_channel_keep`` allows (prune_until_quiet; the record's "flip_rates",
    "stopped_by" and "u" say where it stopped). The record: {"u", "kind" (the trigger's),
    "trigger_flip_rate" (on ``model``; None when no trigger or the clean is off),
    "trigger_flip_rate_after", "pruned", "n_pruned", "channels"}."""
    from cc_core.trigger_clean import prune_trigger_channels, prune_until_quiet

    perturbation = found is not None and found.get("kind") == "perturbation"
    u = cfg.perturbation_channel_u if perturbation else cfg.trigger_channel_u
    info = {"u": u, "kind": None, "trigger_flip_rate": None, "trigger_flip_rate_after": None,
            "pruned": {}, "n_pruned": 0, "channels": []}
    if u is None or x is None or not trigger_score(found):
        return model, info
    info["kind"] = found["kind"]
    info["trigger_flip_rate"] = trigger_flip_rate(model, x, found, found["n"])
    if info["trigger_flip_rate"] < RESIDUAL_FLIP and not perturbation:
        return model, info
    x_triggered = apply_found_trigger(x, found, model.cc_spec)
    if perturbation and cfg.perturbation_channel_floor is not None:
        pruned, channels = prune_until_quiet(model, x, x_triggered, lambda m: trigger_flip_rate(m, x, found, found["n"]),
                                             u, cfg.perturbation_channel_floor, cfg.perturbation_channel_quiet,
                                             min_keep=cfg.perturbation_channel_keep)
        after = channels["flip_rates"][-1][1]  # measured on the model it returns
    else:
        pruned, channels = prune_trigger_channels(model, x, x_triggered, u)
        after = trigger_flip_rate(pruned, x, found, found["n"])
    return pruned, info | channels | {"trigger_flip_rate_after": after}


def channel_clean_text(info: dict) -> str:
    """The defend log's words for channel_clean's record ``info``."""
    clp_text = ("no outlier-channel clean (a probe's trigger fired)" if info.get("clp_skipped")
                else f"{info['n_pruned']} outlier channels zeroed")
    return clp_text + trigger_clean_text(info["trigger"])


def trigger_clean_text(info: dict) -> str:
    """The defend log's words for the trigger channel clean ('' when it did not run)."""
    if info["trigger_flip_rate"] is None:
        return ""
    if not info["n_pruned"] and info["trigger_flip_rate_after"] is None:
        return f" (the probe's {info['kind']} flips {info['trigger_flip_rate']:.0%} after them: no trigger channel clean)"
    return (f", then {info['n_pruned']} channels the probe's {info['kind']} excites (it flips "
            f"{info['trigger_flip_rate']:.0%} -> {info['trigger_flip_rate_after']:.0%})")


def gated_teacher(teacher: nn.Module | None, original: nn.Module, cfg: DefendConfig, x: torch.Tensor | None = None,
                  found: dict | None = None, x_distill: torch.Tensor | None = None,
                  student: nn.Module | None = None) -> tuple[nn.Module | None, dict]:
    """The teacher the fine-tune distills from: ``teacher`` (distillation_teacher's; None when
    there is no distillation) or None when the gate closes. With ``cfg.kd_gate`` "verified" the
    teacher must be clean and faithful: the trigger it is verified against (``found``, gate_trigger's:
    a probe's stamp, field or pattern, or an all-to-all universal perturbation, measured on the
    synthetic images ``x``) must flip < RESIDUAL_FLIP of them on it, and it must give >=
    TEACHER_AGREEMENT of the images the student is distilled on (``x_distill``, default ``x``: the
    synthetic images less the suspected target's, which carry the trigger and which a clean teacher
    takes out of the target class) the class ``original`` gives them or, for an all-to-all trigger,
    the class that trigger maps to it (teacher_agreement; a teacher the cleaning cost accuracy pulls
    the student down with it). A teacher the gate does not verify (any, with "always") is fine-tuned
    first when ``cfg.teacher_finetune`` is set (finetune_teacher), otherwise, under "verified",
    replaced by a frozen copy of ``student`` (the compacted model before its fine-tune) with
    ``cfg.self_anchor``, and otherwise not used. The record: {"gate", "distill", "teacher_finetune"
    (the teacher is to be fine-tuned first), "verified_against" (the trigger's kind; None when none), "teacher_trigger_flip_rate",
    "teacher_agreement", "teacher_undoes_mapping" (None when not measured), "reason" (why
    "verified" did not verify the teacher; None otherwise), "check" (distill_check's record, filled
    in after the fine-tune when it runs), "self_anchored" (the teacher is the student's copy)}."""
    record = {"gate": cfg.kd_gate, "distill": False, "teacher_finetune": False, "verified_against": None,
              "teacher_trigger_flip_rate": None, "teacher_agreement": None, "teacher_undoes_mapping": None,
              "reason": None, "check": None, "self_anchored": False}
    if teacher is None:
        return None, record
    if cfg.kd_gate == "verified":
        record |= verify_teacher(teacher, original, x, found, x_distill)
        if record["reason"] and cfg.teacher_finetune is None:
            if cfg.self_anchor and student is not None:
                return copy.deepcopy(student).eval(), record | {"distill": True, "self_anchored": True}
            return None, record
    return teacher, record | {"distill": True, "teacher_finetune": cfg.teacher_finetune is not None
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
    """The student's fine-tune: ``cfg.finetune`` with its distillation terms off when there is no
    ``teacher`` (the gate closed), and with ``cfg.distill_finetune`` when there is one and it distills."""
    if not cfg.finetune.needs_teacher:
        return cfg.finetune
    if teacher is None:
        return dataclasses.replace(cfg.finetune, kd_weight=0.0, feature_weight=0.0)
    return dataclasses.replace(cfg.finetune, **(cfg.distill_finetune or {}))


def match_compact_bn(new: nn.Module, cleaned: nn.Module, cfg: DefendConfig, x: torch.Tensor,
                     clipped: nn.Module | None = None, found: dict | None = None) -> dict | None:
    """With ``cfg.bn_match_samples`` set, move the BatchNorm running statistics of the compact model
    ``new`` (in place) to those of ``cleaned`` with its singular values clipped at full rank
    (``clipped`` when already built, distillation_teacher's; only read), on the first
    bn_match_samples synthetic images ``x`` (N, C, H, W) (match_bn_statistics); returns its record,
    with the number of images, or None when off. Under ``cfg.bn_match_scope`` "trigger" nothing is
    moved unless ``found`` (channel_trigger's) is a probe's firing trigger: the record then says why."""
    if cfg.bn_match_samples is None:
        return None
    if cfg.bn_match_scope == "trigger" and not probe_fired(found):
        return {"images": 0, "skipped": "no probe's trigger fired"}
    reference = clipped if clipped is not None else clipped_full_rank(cleaned, cfg)
    device = next(new.parameters()).device
    x = x[:cfg.bn_match_samples]
    return match_bn_statistics(new, reference.to(device), x.to(device)) | {"images": len(x)}


def bn_match_text(record: dict) -> str:
    if record.get("skipped"):
        return f"BatchNorm statistics not matched ({record['skipped']})"
    return (f"BatchNorm statistics matched to the clipped full-rank model's on {record['images']} synthetic images: "
            f"{record['channels']} channels in {record['layers']} layers (largest std change "
            f"{record['max_scale_change']:.0%})")


def distillation_teacher(cleaned: nn.Module, cfg: DefendConfig) -> nn.Module | None:
    """The clean-step-only model KD distills from: ``cleaned`` (the channel-cleaned original)
    with its singular values clipped at full rank; None without KD."""
    if not cfg.finetune.needs_teacher:
        return None
    return clipped_full_rank(cleaned, cfg)


def clipped_full_rank(cleaned: nn.Module, cfg: DefendConfig) -> nn.Module:
    """``cleaned`` with its singular values clipped at ``cfg.tau`` and no rank cut, in eval mode."""
    model, _ = clean_compact(cleaned, ratio=1.0, tau=cfg.tau, normalizer=cfg.normalizer)
    return model.eval()


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

"""The defense's settings: ``DefendConfig`` (every setting, validated where it is made), the presets
(cc_core/presets/*.toml, the fields that differ from the defaults) and the helpers that lay
overrides and seeds over them. Why each preset value is what it is: docs/PRESET.md."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


from cc_core.adversarial import PGDConfig
from cc_core.baselines.clp import CHANNEL_MODES
from cc_core.compact.transform import needs_calibration
from cc_core.errors import ConfigError
from cc_core.finetune import FinetuneConfig
from cc_core.settings import parse_toml
from cc_core.probes import BlendProbeConfig, MaskProbeConfig, PatchProbeConfig, WarpProbeConfig
from cc_core.scan import InversionConfig
from cc_core.synth import SynthConfig


UNLEARN_SCOPES = ("all-to-all", "any", "residual")


PERTURBATION_SCOPES = ("all-to-all", "any", "targeted")


PATCH_UNLEARN = ("residual", "always", "never")


KD_GATES = ("always", "verified")


BN_MATCH_SCOPES = ("always", "trigger")


MODEL_STAGES = ("compact", "original")


# DefendConfig's fields that take one of a few values, and the probe sections a dict stands for.
CHOICES = {"channel_mode": CHANNEL_MODES, "unlearn_scope": UNLEARN_SCOPES, "perturbation_scope": PERTURBATION_SCOPES,
           "kd_gate": KD_GATES, "bn_match_scope": BN_MATCH_SCOPES, "patch_unlearn": PATCH_UNLEARN,
           "adversarial_model": MODEL_STAGES, "synth_model": MODEL_STAGES}


PROBE_SECTIONS = {"patch_probe": PatchProbeConfig, "warp_probe": WarpProbeConfig, "blend_probe": BlendProbeConfig,
                  "mask_probe": MaskProbeConfig}


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
    # Fine-tune overrides for a student with no teacher to distill from (the gate verified none):
    # nothing says its backdoor is gone, so it may take a trigger-agnostic term (finetune.noise_weight).
    undistilled_finetune: dict | None = None
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
        for name, base, what in (("scan_synth", self.synth, "synthesis"),
                                 ("teacher_finetune", self.finetune, "fine-tune"),
                                 ("distill_finetune", self.finetune, "fine-tune"),
                                 ("undistilled_finetune", self.finetune, "fine-tune")):
            if getattr(self, name) is not None:
                try:
                    dataclasses.replace(base, **getattr(self, name))
                except TypeError as e:
                    raise ConfigError(f"{name} takes {what} settings: {e}") from None

    def _check_stage_order(self) -> None:
        """Settings that need images made before compaction, or another setting, to run at all."""
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

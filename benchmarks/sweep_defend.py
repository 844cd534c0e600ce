"""Choose C&C's defaults by measurement: sweep tau x normalizer and ablate each loss term on
zoo models (ACC / ASR on the real CIFAR-10 test set, which the defense never sees).

Run: python -m benchmarks.sweep_defend [--models badnet wanet] [--grid focused|energy|recovery|clean|synthesis|wanet3|target|channel|unlearn|allocation|...]
          [--recipe cifar10-resnet18|gtsrb-resnet18|...]
Writes benchmarks/results/sweep_defend_<grid>.{json,md} (``_<recipe>`` appended for a recipe other than
the CIFAR-10 zoo's). Synthetic data is made once per model
from the original model (the cpu preset's synth_model) and shared by every setting, so settings
differ only in what they vary.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from unittest import mock

import torch

from benchmarks.bench import DEFAULT_RECIPE, RECIPES, distill_check_flips
from benchmarks.experiments.blend_probe import true_blend
from benchmarks.common import machine, shared_synthetic, write_results
from benchmarks.zoo import RECIPE as ZOO_RECIPE, ensure_model, model_name
from cc_core.attacks import load_attack
from cc_core.data import ImageData, load_dataset, normalize
from cc_core.io import load_model
from cc_core import probes
from cc_core.defense import run as defense_run, suspect, teacher
from cc_core.defense.config import DISTILL_ALONE, PRESETS, resolve_config
from cc_core.defense.run import defend
from cc_core.probes import BlendProbeConfig, trigger_report
from cc_core.synth import SynthConfig

COMMAND = "python -m benchmarks.sweep_defend"
DATASET_NAMES = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB"}
PAPER = {"channel_u": None}  # the paper's C&C: singular-value clipping is the only clean step
ENERGY = {"compact": {"rank_strategy": "energy"}}
SOFT_PGD = {"pgd": {"eps": 4 / 255, "step": 1 / 255}}
# Each grid's rows are (label, ratio, DefendConfig overrides, fine-tune overrides) on top of the
# grid's base (BASES), which pins what the label calls "default" so a rerun after a preset change
# still measures the same settings.
PRE_ENERGY = ({"compact": {"rank_strategy": "uniform"}, "tau": 3.0}, {"kd_weight": 1.0})  # cpu preset before the energy round
NO_KD = {"kd_weight": 0.0}
PRE_TAU4 = (ENERGY | {"tau": 3.0}, NO_KD)  # the cpu preset before the clean round moved tau to 4
SENSITIVITY = {"compact": {"rank_strategy": "sensitivity"}}
# Every grid below ran before the preset distilled (kd_weight 1 behind kd_gate "verified") and had a
# warp probe or a teacher fine-tune: their default fine-tune is CE only, a row that asks for
# distillation gets it ungated from the clipped teacher as is, and no warp is probed for.
BASES = {grid: (base | {"kd_gate": "always", "warp_probe": None, "teacher_finetune": None}, NO_KD | ft)
         for grid, (base, ft) in {
    "focused": PRE_ENERGY, "energy": PRE_ENERGY, "recovery": PRE_TAU4, "clean": PRE_TAU4,
    "synthesis": (ENERGY, {}), "wanet3": (ENERGY, {}), "target": (ENERGY, {}), "channel": (ENERGY, {}),
    "unlearn": (ENERGY, {}), "allocation": (ENERGY, {}), "architecture": (ENERGY, {}),
    "masked": (SENSITIVITY, {"mask_left_out_class": False}), "oracle": (SENSITIVITY, {}),
    "distill": (SENSITIVITY, {}), "distill2": (SENSITIVITY, {})}.items()} | {
    # the cpu preset as it was at 8d1d710 (warp probe on) and at c223e6d (no teacher fine-tune)
    "warp": ({"warp_probe": {}, "teacher_finetune": None}, {}),
    "teacher": ({"warp_probe": None, "teacher_finetune": None}, {}),
    "warp_probe": ({"warp_probe": {}}, {}),  # the cpu preset as shipped, with the warp probe on
    "teacher2": ({"warp_probe": None, "teacher_finetune": None}, {}),
    "teacher3": ({"warp_probe": None, "teacher_finetune": {"lr": 3e-4}}, {}),  # the cpu preset at 7d7da14
    # the cpu preset as shipped
    **dict.fromkeys(("synthesis2", "opt_ins", "synthesis_budget", "averaging", "synthesis_long",
                     "smoothing", "blend", "blend_unlearn", "blend_oracle", "teacher_as_is", "unlearn_a2a", "blend_teacher", "online_adv", "online_adv_eps", "online_teacher", "online_teacher2", "online_student"), ({}, {})),
    # the cpu preset at 0911a44 but for the teacher fine-tune, which each row of these two grids sets
    **dict.fromkeys(("mixup", "blended", "distill_check"), ({"warp_probe": None}, {"mixup_alpha": 0.0}))}
# ...and every one without the distillation check and without the blend probe (on in the preset
# since 89f8225, after every grid here was run; a row that wants either sets it).
BASES = {grid: (base | {"distill_check": None, "blend_probe": None}, ft) for grid, (base, ft) in BASES.items()}
# ...but these, run after it: the cpu preset as shipped, blend probe on.
BASES |= dict.fromkeys(("pure_kd", "pure_kd_clipped", "preset_4x", "preset", "preset_2x_removal", "preset_warp_probe", "preset_warp_probe_bn_match", "preset_warp_probe_trigger_clean_only", "preset_warp_probe_trigger_clean_only_bn_match_scoped",
                        "preset_warp_probe_trigger_clean_only_bn_match", "kd_budget", "pure_kd_blended", "hooi",
                        "bn_match", "bn_match_zoo", "activation", "activation_compact", "diversity", "opt_in_combined", "bn_weight", "tv_weight", "prior", "prior_target", "scan_split", "scan_split_unlearn", "scan_split_unlearn_always", "opt_in_stack",
                        "opt_in_stack_zoo", "scan_union",
                        "opt_in_stack_epochs", "scan_union_bn_match", "scan_union_unlearn",
                        "preset_and_candidate"), ({}, {}))
# ...and every grid above ran with the synthesis the cpu preset had until the smooth + rough images
# (grid scan_union_bn_match's setting) became its default: one set of images at BN weight 1 and TV
# weight 1e-4, no BatchNorm matching.
PRESET_BEFORE_SMOOTH = {"synth": {"bn_weight": 1.0, "tv_weight": 1e-4}, "scan_synth": None,
                        "finetune_on_scan_synthetic": False, "bn_match_samples": None}
BASES = {grid: (PRESET_BEFORE_SMOOTH | base, ft) for grid, (base, ft) in BASES.items()}
# ...and before the preset probed for a warp, zeroed a firing trigger's channels without CLP's and
# matched the BatchNorm statistics after one fired (grid preset_warp_probe_trigger_clean_only_bn_match_scoped's
# setting, the preset from then on): a row that wants any of these sets it.
PRESET_BEFORE_TRIGGER_CHANNELS = {"warp_probe": None, "clp_with_trigger": True, "bn_match_scope": "always"}
BASES = {grid: (PRESET_BEFORE_TRIGGER_CHANNELS | base, ft) for grid, (base, ft) in BASES.items()}
# ...and with the 1024 synthetic images the preset made until grid preset_synthesis_512 halved them.
BASES = {grid: (base | {"synth": {"n_samples": 1024} | base.get("synth", {})}, ft) for grid, (base, ft) in BASES.items()}
BASES["preset_synthesis_512"] = ({}, {})  # the preset from here on
BASES["universal_unlearn"] = ({}, {})
BASES["universal_unlearn_4x"] = ({}, {})
BASES["universal_mild"] = ({}, {})
BASES["no_probe_no_class_left_out"] = ({}, {})
BASES["perturbation_any"] = ({}, {})
BASES["general_removal"] = ({}, {})
BASES["general_candidate"] = ({}, {})
BASES["targeted_removal"] = ({}, {})
BASES["short_training"] = ({}, {})
BASES["short_training_residual"] = ({}, {})
BASES["unlearn_perturbation"] = ({}, {})
BASES["until_quiet"] = ({}, {})
BASES["residual_unlearn"] = ({}, {})
BASES["global_noise"] = ({}, {})
BASES["global_noise_paths"] = ({}, {})
BASES["global_noise_no_clp"] = ({}, {})
BASES["global_noise_diagnose"] = ({}, {})
BASES["strongest_evidence"] = ({}, {})
BASES["self_anchor"] = ({}, {})
BASES["self_anchor_start"] = ({}, {})
BASES["short_training_combined"] = ({}, {})
BASES["clip_strength"] = ({}, {})
BASES["noise_consistency"] = ({}, {})
BASES["noise_consistency_smooth"] = ({}, {})
BASES["noise_consistency_smooth_strength"] = ({}, {})
BASES["noise_term_zoo"] = ({}, {})
BASES["preset_now"] = ({}, {})
BASES["undistilled_noise"] = ({}, {})
BASES["noise_term_wanet"] = ({}, {})
NO_PROBES = {"patch_probe": None, "warp_probe": None, "blend_probe": None, "trigger_channel_u": None}
CHECK_INVERSION_639AF7D = {"steps": 100, "restarts": 3}  # what distill_check=True ran with from 639af7d
TEACHER_FINETUNE_0911A44 = {"lr": 2e-4, "mixup_alpha": 0.0}  # the cpu preset's teacher fine-tune from edcff5b to 0911a44
DISTILL_ALONE_UNCLIPPED = {"synth_weight": 0.0, "mixup_alpha": 1.0, "epochs": 30}  # DISTILL_ALONE as first run, at 3bbf9cb
SMOOTH_SYNTH = {"synth": {"bn_weight": 30.0, "tv_weight": 10.0}}  # images as smooth as the data (grid tv_weight's best)
# ...for the fine-tune, the scan on images of its own at the preset's weights (DefendConfig.scan_synth)
SCAN_SPLIT = SMOOTH_SYNTH | {"scan_synth": {"bn_weight": 1.0, "tv_weight": 1e-4}}
# ...with the scan's images in the fine-tune too and the BatchNorm statistics matched on 512 images
SCAN_UNION_BN_MATCH = SCAN_SPLIT | {"finetune_on_scan_synthetic": True, "bn_match_samples": 512}
# ...with the BatchNorm matching and the unverified teacher fine-tuned at lr 0.0002 (grid opt_in_stack's first setting)
STACKED = SCAN_SPLIT | {"bn_match_samples": 512, "teacher_finetune": {"lr": 2e-4}}
GENERAL_CANDIDATE = {"perturbation_scope": "any", "exclude_suspected_target": False}
TRUE_TRIGGER = "true trigger"  # a row's extra: the attack's own trigger stands in for the probes' (Blended only)
UNTARGETED_MISSES = "untargeted misses"  # a row's extra: the untargeted universal inversion is made not to fire
GRIDS = {
    "focused": [("paper C&C, tau 3", 2.0, PAPER | {"tau": 3.0}, {}),
                ("paper C&C, tau 2", 2.0, PAPER | {"tau": 2.0}, {}),
                ("channel u 3, no clipping", 2.0, {"tau": None}, {}),
                ("default (channel u 3, tau 3)", 2.0, {}, {}),
                ("default + adversarial term", 2.0, {}, {"adv_weight": 1.0}),
                ("default, no distillation", 2.0, {}, {"kd_weight": 0.0}),
                ("default, no synthetic CE", 2.0, {}, {"synth_weight": 0.0}),
                ("default, no fine-tune", 2.0, {}, {"epochs": 0}),
                ("default, fine-tune lr 0.01", 2.0, {}, {"lr": 0.01}),
                ("default (channel u 3, tau 3)", 4.0, {}, {}),
                ("default, 30 fine-tune epochs", 4.0, {}, {"epochs": 30}),
                ("default, energy rank allocation", 2.0, {"compact": {"rank_strategy": "energy"}}, {}),
                ("default, energy rank allocation", 4.0, {"compact": {"rank_strategy": "energy"}}, {})],
    # Second round, on the focused grid's best rank allocation (energy).
    "energy": [("energy, no distillation", 2.0, ENERGY, {"kd_weight": 0.0}),
               ("energy + feature distillation", 2.0, ENERGY, {"feature_weight": 1.0}),
               ("energy, tau 2", 2.0, ENERGY | {"tau": 2.0}, {}),
               ("energy + adversarial 0.3 at eps 4/255", 2.0, ENERGY | SOFT_PGD, {"adv_weight": 0.3}),
               ("energy + adversarial 0.3 at eps 4/255, no distillation", 2.0, ENERGY | SOFT_PGD,
                {"adv_weight": 0.3, "kd_weight": 0.0}),
               ("energy, no distillation", 4.0, ENERGY, {"kd_weight": 0.0}),
               ("energy + feature distillation", 4.0, ENERGY, {"feature_weight": 1.0}),
               ("energy, tau 2", 4.0, ENERGY | {"tau": 2.0}, {}),
               ("energy + adversarial 0.3 at eps 4/255, no distillation", 4.0, ENERGY | SOFT_PGD,
                {"adv_weight": 0.3, "kd_weight": 0.0})],
    # Third round, on the energy grid's best (energy ranks, no distillation): can the recovery do more?
    "recovery": [(label, ratio, {}, ft) for ratio in (2.0, 4.0) for label, ft in (
        ("energy, no distillation, 20 fine-tune epochs", {"epochs": 20}),
        ("energy, no distillation, fine-tune lr 0.003", {"lr": 0.003}),
        ("energy, feature distillation only (no logit distillation)", {"feature_weight": 1.0}),
        ("energy, no distillation, no BN freeze", {"freeze_bn": False}))],
    # Fourth round, on the recovery grid's base: the clean step's knobs (clipping threshold and
    # normalizer, channel-clean threshold) at 2x, where the defaults' ACC drop is largest.
    "clean": [(f"{norm} tau {tau}" if tau else "channel clean only, no clipping", 2.0, {"normalizer": norm, "tau": tau}, {})
              for norm, taus in (("mean", (None, 2.0, 3.0, 4.0, 6.0)), ("max", (0.5, 0.7)), ("median", (3.0, 5.0)))
              for tau in taus]
             + [(f"channel u {u}, mean tau 3" if u else "no channel clean, mean tau 3", 2.0, {"channel_u": u}, {})
                for u in (2.5, 4.0, None)],
    # Fifth round, on the shipped cpu preset (tau 4): synthesis is ~90% of a defend's time; how
    # much do fewer images or iterations cost? (The demo's 512 x 100 gave BadNet 2x 83.48 / 2.22.)
    "synthesis": [(f"{n} images x {it} iterations", ratio, {"synth": {"n_samples": n, "iterations": it}}, {})
                  for ratio in (2.0, 4.0) for n, it in ((1024, 200), (512, 100), (1024, 100))],
    # Sixth round, on the shipped cpu preset: the zoo's WaNet moved to a stronger warp (s=3), which
    # the preset removes less well (2x: ASR 8%); which clean or recovery knob brings it back?
    "wanet3": [("cpu preset (channel u 3, tau 4)", 2.0, {}, {}),
               ("channel u 2.5", 2.0, {"channel_u": 2.5}, {}),
               ("channel u 2", 2.0, {"channel_u": 2.0}, {}),
               ("tau 3", 2.0, {"tau": 3.0}, {}),
               ("adversarial 0.3 at eps 4/255", 2.0, SOFT_PGD, {"adv_weight": 0.3}),
               ("channel u 2.5", 4.0, {"channel_u": 2.5}, {}),
               ("channel u 2", 4.0, {"channel_u": 2.0}, {})],
    # Seventh round: synthetic images labelled with the backdoor's target class are made through
    # the backdoored model and carry its trigger; does leaving them out of the fine-tune stop the
    # fine-tune from teaching the backdoor back?
    "target": [(label, ratio, {"exclude_suspected_target": exclude}, {}) for ratio in (2.0, 4.0)
               for label, exclude in (("cpu preset: suspected target's synthetic images left out", True),
                                      ("all synthetic images kept (the preset before this round)", False))]
              + [("no fine-tune (clean + compact only)", 2.0, {}, {"epochs": 0}),
                 ("suspected target left out + logit distillation", 2.0, {}, {"kd_weight": 1.0})],
    # Eighth round: most of the ACC cost at 2x is the channel clean (sweep_defend_clean.md, tau 3:
    # drop 0.95 points without it, 4.38 with it at u 3); can an outlier channel be defused at a smaller cost
    # than zeroing it: shrunk to the threshold, or held at its mean output (BN shift kept)?
    "channel": [(label, ratio, overrides, {}) for ratio in (2.0, 4.0) for label, overrides in (
        ("cpu preset: outlier channels zeroed", {}),
        ("outlier channels shrunk to the threshold", {"channel_mode": "shrink"}),
        ("outlier channels held at their mean output", {"channel_mode": "mean"}))]
               + [("held at mean, all synthetic images kept", 2.0, {"channel_mode": "mean", "exclude_suspected_target": False}, {}),
                  ("held at mean, no fine-tune", 2.0, {"channel_mode": "mean"}, {"epochs": 0})],
    # Ninth round: the scan's universal inverted trigger (one sparse perturbation that flips the
    # synthetic images, to one class or, all-to-all, each class to its own) unlearned in the
    # fine-tune: its images trained towards their benign labels. Can it remove what the channel
    # clean misses (all-to-all), or replace the channel clean and its ACC cost?
    # (Run before the preset took unlearning up for all-to-all triggers only; the rows pin the
    # preset of that time: no unlearning, or unlearning whatever the trigger's kind.)
    "unlearn": [(label, ratio, overrides | {"unlearn_scope": "any"}, ft) for ratio in (2.0, 4.0)
                for label, overrides, ft in (
        ("cpu preset", {}, {"unlearn_weight": 0.0}),
        ("+ inverted trigger unlearned", {}, {"unlearn_weight": 1.0}),
        ("+ inverted trigger unlearned, no channel clean", {"channel_u": None}, {"unlearn_weight": 1.0}))],
    "allocation": [(label, ratio, overrides, {}) for ratio in (2.0, 4.0) for label, overrides in (
        ("energy rank allocation", {}),
        ("sensitivity rank allocation (256 calibration images)", {"compact": {"rank_strategy": "sensitivity"}}))],
    # The suspected class, left out of the fine-tune, loses most of the remaining ACC (WaNet 2x:
    # 90.4 -> 66.9%): every CE term pushes its logit down. Against the allocation grid's
    # sensitivity rows: the same settings with its logit masked out of the CE softmax.
    "masked": [("sensitivity ranks, left-out class masked out of the fine-tune's CE", ratio, {},
                {"mask_left_out_class": True}) for ratio in (2.0, 4.0)],
    # Diagnostic, not a defense (it uses training data): how much of the ACC drop is the synthetic
    # data's fault? Real training images (clean, seeded subset) take the synthetic images' place in
    # every step (rank measurement, scan, fine-tune). Against the allocation grid's sensitivity rows.
    # Rows are (label, ratio, overrides, fine-tune overrides, number of real images).
    "oracle": [(label, ratio, overrides, {}, n_real) for ratio in (2.0, 4.0) for label, overrides, n_real in (
        ("1024 real training images in place of the synthetic ones", {}, 1024),
        ("1024 real training images, no class left out", {"exclude_suspected_target": False}, 1024))]
    + [("5120 real training images, no class left out", 4.0, {"exclude_suspected_target": False}, {}, 5120)],
    # The oracle grid puts most of the 4x ACC drop on the recovery's training signal, not on the
    # compression. Logit distillation from the clipped full-rank model (soft targets: every class's
    # logit, the left-out class's too) against the allocation grid's sensitivity rows (hard labels).
    "distill": [(label, ratio, {}, ft) for ratio in (4.0, 2.0) for label, ft in (
        ("+ logit distillation from the clipped model", {"kd_weight": 1.0}),
        ("logit distillation only (no synthetic CE)", {"kd_weight": 1.0, "synth_weight": 0.0}),
        ("logit distillation only, 30 fine-tune epochs", {"kd_weight": 1.0, "synth_weight": 0.0, "epochs": 30}))],
    # Distillation carried WaNet's backdoor back before (sweep_defend_energy.md): the clipped teacher
    # still holds the target class up. Its logit taken out of the distillation (the CE on the other
    # classes' images still pushes it down, which is part of what removes WaNet's backdoor).
    "distill2": [(label, ratio, {}, ft) for ratio in (4.0, 2.0) for label, ft in (
        ("+ logit distillation from the clipped model", {"kd_weight": 1.0}),
        ("+ logit distillation, the left-out class's logit out of it", {"kd_weight": 1.0, "kd_mask_left_out_class": True}))],
    # What the warp probe's field does in the pipeline (WaNet: the trigger channel clean, the gate, unlearning).
    "warp": [(label, 2.0, overrides, ft) for label, overrides, ft in (
        ("cpu preset (warp probe: trigger channel clean u 3, distillation when verified)", {}, {}),  # at 8d1d710
        ("no warp probe (the preset before it)", {"warp_probe": None}, {}),
        ("warp probe, no trigger channel clean", {"trigger_channel_u": None}, {}),
        ("warp probe, trigger channel clean, no distillation", {}, {"kd_weight": 0.0}),
        ("warp probe, trigger channel clean u 4", {"trigger_channel_u": 4.0}, {}),
        ("warp probe, trigger channel clean, suspected class kept", {"exclude_suspected_target": False}, {}))],
    # The same on a wider model (--recipe cifar10-resnet18-w0.5): does its teacher, with the warp's
    # channels zeroed, keep the original's classes well enough for the gate to let it teach?
    "warp_probe": [("cpu preset + warp probe (trigger channel clean u 3, distillation when verified)", 2.0, {}, {})],
    # A teacher the gate cannot verify (WaNet: no trigger found), fine-tuned with the student's recipe
    # before the student distills from it.
    "teacher": [(label, ratio, {"kd_gate": "always", "teacher_finetune": teacher_ft}, {}) for ratio in (2.0, 4.0)
                for label, teacher_ft in (
                    ("teacher fine-tuned first, then distilled from (ungated)", {}),
                    ("teacher fine-tuned first for 3 epochs", {"epochs": 3}),
                    ("teacher fine-tuned first at lr 0.0003", {"lr": 3e-4}))],
    # ...gentler still, and with the suspected class's logit out of the distillation.
    "teacher2": [(label, ratio, {"kd_gate": "always", "teacher_finetune": teacher_ft}, ft) for ratio in (2.0, 4.0)
                 for label, teacher_ft, ft in (
                     ("teacher fine-tuned first at lr 0.0001", {"lr": 1e-4}, {}),
                     ("teacher fine-tuned first at lr 0.0003, the left-out class's logit out of the distillation",
                      {"lr": 3e-4, "kd_mask_left_out_class": False}, {"kd_mask_left_out_class": True}),
                     ("teacher fine-tuned first at lr 0.0001, the left-out class's logit out of the distillation",
                      {"lr": 1e-4, "kd_mask_left_out_class": False}, {"kd_mask_left_out_class": True}))],
    # Around the preset's teacher fine-tune: its learning rate between the two measured, and more of the
    # fine-tuned teacher in the student (feature distillation, a heavier logit distillation).
    "teacher3": [(label, ratio, overrides, ft) for ratio in (2.0, 4.0) for label, overrides, ft in (
        ("teacher fine-tuned at lr 0.0002", {"teacher_finetune": {"lr": 2e-4}}, {}),
        ("+ feature distillation (weight 1) from the fine-tuned teacher", {}, {"feature_weight": 1.0}),
        ("logit distillation weight 2", {}, {"kd_weight": 2.0}))],
    # More inputs for the distillation from the same thousand synthetic images (mixup), and the left-out
    # class's logit out of the distillation, so a fine-tuned teacher that still carries some backdoor (Blended:
    # ASR 38% after its fine-tune) cannot teach its target class; the teacher's own fine-tune is the preset's at 0911a44.
    "mixup": [(label, ratio, {"teacher_finetune": TEACHER_FINETUNE_0911A44}, ft) for ratio in (2.0, 4.0)
              for label, ft in (("mixup alpha 1 in the student's fine-tune", {"mixup_alpha": 1.0}),
                                ("left-out class's logit out of the distillation", {"kd_mask_left_out_class": True}),
                                ("mixup alpha 1 + left-out logit out of the distillation",
                                 {"mixup_alpha": 1.0, "kd_mask_left_out_class": True}))],
    # The Blended teacher keeps its backdoor through the preset's teacher fine-tune (ASR 58.8 -> 38.2%) and the
    # student distilled from it gets 82.39 / 32.39 at 2x: a harder teacher fine-tune, or no teacher at all.
    "blended": [(label, 2.0, {"teacher_finetune": teacher_ft}, ft) for label, teacher_ft, ft in (
        ("teacher fine-tuned at lr 0.001", {"lr": 1e-3, "mixup_alpha": 0.0}, {}),
        ("teacher fine-tuned at lr 0.001, left-out logit out of the distillation", {"lr": 1e-3, "mixup_alpha": 0.0},
         {"kd_mask_left_out_class": True}),
        ("no teacher fine-tune (an unverified teacher is not used)", None, {}))],
    # Distill from the fine-tuned teacher, then keep that student only if the universal inversion does not
    # flip markedly more on it than on one fine-tuned without distillation (student_signals.md).
    "distill_check": [("teacher fine-tuned at lr 0.0002, distillation check", ratio,
                       {"teacher_finetune": TEACHER_FINETUNE_0911A44, "distill_check": CHECK_INVERSION_639AF7D}, {}) for ratio in (2.0, 4.0)],
    # The clean step on other architectures (Table 5's VGG-19-BN kept ASR 93% under the preset).
    "architecture": [("cpu preset", 2.0, {}, {}),
                     ("channel u 2.5", 2.0, {"channel_u": 2.5}, {}),
                     ("channel u 2", 2.0, {"channel_u": 2.0}, {}),
                     ("tau 3", 2.0, {"tau": 3.0}, {}),
                     ("tau 2", 2.0, {"tau": 2.0}, {}),
                     ("paper C&C (no channel clean), tau 2", 2.0, PAPER | {"tau": 2.0}, {}),
                     ("synthetic images of the suspected class kept", 2.0, {"exclude_suspected_target": False}, {})],
    # How the synthetic images are made, at the preset's size: the oracle grid's 1024 real images
    # recover 81.36% on WaNet at 4x where the synthetic ones recover 73.38%, so the images, not their
    # number, hold back the recovery. DeepInversion's weight on the first BatchNorm layer (the
    # image's low-level statistics), a larger step, a wider jitter.
    "synthesis2": [(label, ratio, {"synth": synth} if synth else {}, {}) for ratio in (2.0, 4.0)
                   for label, synth in (("cpu preset", {}),
                                        ("first BatchNorm layer weighted x10", {"first_bn_weight": 10.0}),
                                        ("synthesis lr 0.25", {"lr": 0.25}),
                                        ("jitter 4", {"jitter": 4}))],
    # The opt-in teacher fine-tune and distillation check as the CLI's flags set them, on models they
    # were not measured on in bench_614903b/ (GTSRB Input-Aware kept 42.56% ASR past them).
    "opt_ins": [("--teacher-finetune-lr 0.0002 --distill-check", ratio,
                 {"teacher_finetune": {"lr": 2e-4}, "distill_check": True}, {}) for ratio in (2.0, 4.0)],
    # Better synthetic images or more of them, at twice the preset's synthesis cost each: the oracle
    # grid's real images recover far more than as many synthetic ones, so it asks which of the two
    # spends compute better.
    "synthesis_budget": [(f"{n} images x {it} iterations", ratio, {"synth": {"n_samples": n, "iterations": it}}, {})
                         for ratio in (2.0, 4.0) for n, it in ((1024, 200), (1024, 400), (2048, 200))],
    # The paper preset's 1000 synthesis iterations with the cpu preset's 1024 images (five times its
    # synthesis): does the +1 point that 400 iterations gave at 4x keep growing?
    "synthesis_long": [("1024 images x 1000 iterations", ratio, {"synth": {"iterations": 1000}}, {}) for ratio in (4.0, 2.0)],
    # The fine-tuned student's weights averaged over its steps (FinetuneConfig.ema_decay): the
    # student fits its 921 synthetic images entirely, and an average of the late weights is a
    # cheap way to generalize better from a small training set.
    "averaging": [(label, ratio, {}, ft) for ratio in (2.0, 4.0) for label, ft in (
        ("cpu preset", {}),
        ("weights averaged, decay 0.9", {"ema_decay": 0.9}),
        ("weights averaged, decay 0.97", {"ema_decay": 0.97}),
        ("20 fine-tune epochs, weights averaged, decay 0.98", {"epochs": 20, "ema_decay": 0.98}))],
    # Label smoothing of the fine-tune's CE: the left-out suspected class gets s / K of every
    # image's target instead of being pushed down on all of them (plain CE) or left alone (masked,
    # which let the WaNet backdoor back).
    "smoothing": [(label, ratio, {}, ft) for ratio in (2.0, 4.0) for label, ft in (
        ("cpu preset", {}),
        ("label smoothing 0.1", {"label_smoothing": 0.1}),
        ("label smoothing 0.3", {"label_smoothing": 0.3}))],
    # The blend probe (off in the preset then) on the Blended model, whose ASR the preset then left
    # above 5%: no stamp or field fires there, so nothing is trigger-cleaned, unlearned as a trigger
    # or lets the teacher be verified. Its best pattern pulls 65% of the synthetic images into the
    # target (blend_probe.md); on the all-to-all Blended model it stays at the 20-30% every model shows.
    "blend": [(label, ratio, overrides, {}) for ratio in (2.0, 4.0) for label, overrides in (
        ("cpu preset", {}),
        ("blend probe on", {"blend_probe": {}}))],
    # At 4x the blend grid's pattern still flipped 16% after compaction and was unlearned, which cost
    # the target class 23 points: the same probe with nothing unlearned but the trigger channel clean.
    "blend_unlearn": [("blend probe on, its pattern never unlearned", 4.0, {"blend_probe": {}, "patch_unlearn": "never"}, {})],
    # The ceiling of a blend probe on the all-to-all Blended model: the attack's own pattern handed to
    # the pipeline as the probes' firing trigger (it flips 27% of the synthetic images, blend_probe.md).
    "blend_oracle": [(label, ratio, {}, {}, *extra) for ratio in (2.0, 4.0) for label, *extra in (
        ("cpu preset",),
        ("the true blend trigger as the probes' (oracle)", TRUE_TRIGGER))],
    # The clipped, channel-cleaned teacher of the all-to-all Blended model is at 82.39 / 6.94 on the real
    # test set, ahead of its students on both (78.20 / 17.76 at 2x); the fine-tune on synthetic images
    # is what raises the ASR (that teacher fine-tuned: 28.87%, sweep_defend_distill_check.md). No probe
    # fires there, so the gate never lets the student distill from it: the same teacher used as is.
    "teacher_as_is": [(label, ratio, overrides, {}) for ratio in (2.0, 4.0) for label, overrides in (
        ("cpu preset", {}),
        ("distilled from the clipped teacher as is (ungated)", {"kd_gate": "always"}))],
    # With its teacher verified, the all-to-all Blended student keeps 8.99 / 5.84% ASR at 2x / 4x, near
    # its teacher's 6.94%: the unlearning of the universal inverted trigger, harder.
    "unlearn_a2a": [(label, ratio, {}, ft) for ratio in (2.0, 4.0) for label, ft in (
        ("cpu preset", {}),
        ("unlearning weight 2", {"unlearn_weight": 2.0}),
        ("unlearning weight 4", {"unlearn_weight": 4.0}))],
    # The blend probe's channel-cleaned teacher agrees with the original on 98.2% of the synthetic
    # images of the all-to-one Blended model, under the gate's 99% bar: distilled from as is.
    "blend_teacher": [(label, ratio, overrides, {}) for ratio in (2.0, 4.0) for label, overrides in (
        ("blend probe on", {"blend_probe": {}}),
        ("blend probe on, distilled from its teacher ungated", {"blend_probe": {}, "kd_gate": "always"}))],
    # WaNet's ASR rests on the fine-tune pushing the left-out class down on every image (masked out:
    # 15% at 2x, sweep_defend_masked.md). PGD run on each batch against the student as it trains,
    # towards that class, labelled with the images' own classes: does it unlearn the shortcut itself?
    "online_adv": [(label, ratio, {}, ft) for ratio in (2.0,) for label, ft in (
        ("cpu preset", {}),
        ("+ online PGD towards the left-out class", {"online_adv_weight": 1.0}),
        ("+ online PGD towards the left-out class, that class masked out of the CE",
         {"online_adv_weight": 1.0, "mask_left_out_class": True}),
        ("+ online untargeted PGD, the left-out class masked out of the CE",
         {"online_adv_weight": 1.0, "online_adv_targeted": False, "mask_left_out_class": True}))],
    # eps 8/255 took ACC to 49-57% (class 0 to 0-2% when targeted): smaller balls.
    "online_adv_eps": [(label, 2.0, {}, ft | {"online_adv_weight": 1.0, "online_adv_eps": eps / 255})
                       for eps, label, ft in (
        (2, "+ online PGD eps 2/255 towards the left-out class, masked out of the CE", {"mask_left_out_class": True}),
        (2, "+ online PGD eps 2/255 towards the left-out class", {}),
        (2, "+ online untargeted PGD eps 2/255, left-out class masked out of the CE",
         {"online_adv_targeted": False, "mask_left_out_class": True}),
        (1, "+ online PGD eps 1/255 towards the left-out class, masked out of the CE", {"mask_left_out_class": True}),
        (4, "+ online untargeted PGD eps 4/255, left-out class masked out of the CE",
         {"online_adv_targeted": False, "mask_left_out_class": True}))],
    # The teacher fine-tune (opt-in) passes WaNet's 2x bound (82.54 / 3.90) but hands GTSRB Input-Aware
    # and Blended students their teachers' backdoors; online PGD at eps 1/255 cost WaNet 0.7 points
    # and held its ASR without the class push (online_adv_eps): does it hold those leaks?
    "online_teacher": [(label, 2.0, {"teacher_finetune": {"lr": 2e-4, **teacher_ft}}, ft) for label, teacher_ft, ft in (
        ("teacher fine-tuned at lr 0.0002, distilled from", {}, {}),
        ("teacher fine-tuned at lr 0.0002; student + online PGD eps 1/255 towards the left-out class",
         {"online_adv_weight": 0.0}, {"online_adv_weight": 1.0, "online_adv_eps": 1 / 255}),
        ("teacher fine-tuned at lr 0.0002, both + online PGD eps 1/255 towards the left-out class",
         {}, {"online_adv_weight": 1.0, "online_adv_eps": 1 / 255}),
        ("teacher fine-tuned at lr 0.0002; student + online PGD eps 2/255 towards the left-out class",
         {"online_adv_weight": 0.0}, {"online_adv_weight": 1.0, "online_adv_eps": 2 / 255}))],
    # online_teacher: on both, online PGD held GTSRB Input-Aware's leak (42.70 -> 5.26%) but cost WaNet
    # 4.3 points; on the student alone it cost WaNet 1.6 and held little. The teacher is where the
    # leak comes from: online PGD in the teacher's fine-tune alone, and smaller balls.
    "online_teacher2": [(label, 2.0, {"teacher_finetune": {"lr": 2e-4, "online_adv_weight": 1.0,
                                                           "online_adv_eps": teacher_eps / 255}}, ft)
                        for label, teacher_eps, ft in (
        ("teacher fine-tuned at lr 0.0002 + online PGD eps 1/255 towards the left-out class", 1, {}),
        ("teacher fine-tuned at lr 0.0002 + online PGD eps 0.5/255 towards the left-out class", 0.5, {}),
        ("teacher fine-tuned at lr 0.0002, both + online PGD eps 0.5/255 towards the left-out class", 0.5,
         {"online_adv_weight": 1.0, "online_adv_eps": 0.5 / 255}))],
    # GTSRB Input-Aware keeps 17.48% ASR under the cpu preset (RESULTS.md): the online term in the
    # student's fine-tune alone, no teacher fine-tune.
    "online_student": [(label, 2.0, {}, ft) for label, ft in (
        ("cpu preset + online PGD eps 1/255 towards the left-out class", {"online_adv_weight": 1.0,
                                                                          "online_adv_eps": 1 / 255}),
        ("cpu preset + online PGD eps 2/255 towards the left-out class", {"online_adv_weight": 1.0,
                                                                          "online_adv_eps": 2 / 255}))],
    # A student that learns only its teacher's soft labels, on mixup images, for 30 epochs (no synthetic
    # CE), from a teacher nothing verifies after that teacher is fine-tuned with the student's own recipe
    # (lr 0.001, CE, 10 epochs; a verified teacher is used as is).
    "pure_kd": [("unverified teacher fine-tuned at lr 0.001; student: distillation only, mixup 1, 30 epochs", ratio,
                 {"teacher_finetune": {}, "distill_finetune": DISTILL_ALONE_UNCLIPPED}, {}) for ratio in (2.0, 4.0)],
    # pure_kd's 4x GTSRB BadNet all-to-all student fell to 50.77 (the preset: 93.52): the same students
    # with their gradients clipped to norm 1 (DISTILL_ALONE), and the preset as shipped for reference.
    "pure_kd_clipped": [("unverified teacher fine-tuned at lr 0.001; student: distillation only, mixup 1, 30 epochs, "
                         "gradient norm 1", ratio, {"teacher_finetune": {}, "distill_finetune": DISTILL_ALONE}, {})
                        for ratio in (2.0, 4.0)],
    "preset_4x": [("cpu preset", 4.0, {}, {})],  # RESULTS.md has no 4x GTSRB rows
    # The shipped preset at both of issue 4's ratios; with --seed, on models of the zoo's recipe trained from
    # other seeds, to see how far one preset's result moves with the model it defends.
    "preset": [("cpu preset", ratio, {}, {}) for ratio in (2.0, 4.0)],
    # The WaNet trained from seed 2 keeps 63.12% ASR at 2x under the preset (1.81% at 4x): does a longer
    # fine-tune or the warp probe's channel clean take the warp out of its 2x student?
    "preset_2x_removal": [("cpu preset, 20 fine-tune epochs", 2.0, {}, {"epochs": 20}),
                          ("cpu preset + warp probe", 2.0, {"warp_probe": {}}, {})],
    # ...the warp probe took it to 84.03 / 1.42 (its field fired, 25 channels zeroed, teacher verified):
    # the same on the other seeds and at 4x, where it cost the zoo's model 4 points (warp_probe_bench.md).
    "preset_warp_probe": [("cpu preset + warp probe", ratio, {"warp_probe": {}}, {}) for ratio in (2.0, 4.0)],
    # ...with it every WaNet seed's 4x drop is still 5.1-7.9 points, mostly the nine kept classes: BatchNorm
    # matching (which gained WaNet 3.3 points at 4x without the probe, bn_match_zoo) on top of it.
    "preset_warp_probe_bn_match": [("cpu preset + warp probe, BatchNorm statistics matched on 512 synthetic images", 4.0,
                                    {"warp_probe": {}, "bn_match_samples": 512}, {})],
    # The warp probe's 2x student ends at its teacher's ACC, and seed 0's teacher has lost 4.5 points to CLP's
    # 7 outlier channels before any field channel (trigger_channel_count_warp_probe.md): the field's channels
    # alone, found on the original (clp_with_trigger=False; --trigger-clean-only).
    "preset_warp_probe_trigger_clean_only": [("cpu preset + warp probe, the firing trigger's channels only (no CLP)", ratio,
                                              {"warp_probe": {}, "clp_with_trigger": False}, {}) for ratio in (2.0, 4.0)],
    # ...which leaves the 4x drop 0.2-0.8 points over the bound; BatchNorm matching gained the warp probe's 4x rows
    # 0.7-1.9 points (preset_warp_probe_bn_match). At both ratios: a candidate for the cpu preset.
    "preset_warp_probe_trigger_clean_only_bn_match": [(
        "cpu preset + warp probe, the firing trigger's channels only (no CLP), BatchNorm statistics matched on 512 "
        "synthetic images", ratio, {"warp_probe": {}, "clp_with_trigger": False, "bn_match_samples": 512}, {})
        for ratio in (2.0, 4.0)],
    # ...the same with the matching only where a probe's trigger fired (bn_match_scope="trigger"): on the
    # models where one fires the rows are the grid's above; where none does (all-to-all, input-specific
    # triggers, clean models) there is no matching, as in the preset.
    "preset_warp_probe_trigger_clean_only_bn_match_scoped": [(
        "cpu preset + warp probe, the firing trigger's channels only (no CLP), BatchNorm statistics matched on 512 "
        "synthetic images when a probe's trigger fired", ratio,
        {"warp_probe": {}, "clp_with_trigger": False, "bn_match_samples": 512, "bn_match_scope": "trigger"}, {})
        for ratio in (2.0, 4.0)],
    # Half the synthetic images at the same 200 iterations: synthesis was most of a defense's time
    # (docs/MEASUREMENTS.md has the timings).
    "preset_synthesis_512": [("cpu preset, 512 synthetic images x 200 iterations", ratio, {"synth": {"n_samples": 512}}, {})
                             for ratio in (2.0, 4.0)],
    # A removal step that needs no probe to fire: the fine-tune unlearns a universal perturbation found
    # afresh against the student each epoch (FinetuneConfig.universal_*), with and without the suspected
    # target's synthetic images left out (leaving them out costs that class, docs/PROTOCOL.md).
    "universal_unlearn": [(label, 2.0, overrides, ft) for label, overrides, ft in (
        ("cpu preset", {}, {}),
        ("cpu preset, no class left out", {"exclude_suspected_target": False}, {}),
        ("universal unlearning r 3, no class left out", {"exclude_suspected_target": False}, {"universal_weight": 1.0}),
        ("universal unlearning r 5, no class left out", {"exclude_suspected_target": False},
         {"universal_weight": 1.0, "universal_radius": 5.0}))],
    # At weight 1 the universal term cost BadNet 10 (r 3) and 30 (r 5) ACC points at 2x (universal_unlearn):
    # milder weights and radii, with the probes on and off. With them off (and so no trigger channel clean),
    # the removal rests on CLP and the fine-tune, as on a model whose trigger no probe sees.
    "universal_mild": [(label, 2.0, overrides, ft) for label, overrides, ft in (
        ("probes off, cpu preset", NO_PROBES, {}),
        ("probes off, no class left out, universal r 3 w 0.2", NO_PROBES | {"exclude_suspected_target": False},
         {"universal_weight": 0.2}),
        ("probes off, no class left out, universal r 2 w 0.5", NO_PROBES | {"exclude_suspected_target": False},
         {"universal_weight": 0.5, "universal_radius": 2.0}),
        ("no class left out, universal r 3 w 0.2", {"exclude_suspected_target": False}, {"universal_weight": 0.2}))],
    # ...and the row universal_mild lacks: probes off, no class left out, no universal term.
    "no_probe_no_class_left_out": [("probes off, no class left out", 2.0,
                                    NO_PROBES | {"exclude_suspected_target": False}, {})],
    # Where no probe fires, the scan's universal inverted perturbation as the trigger whenever it fires
    # (perturbation_scope "any"), not only when all-to-all: its channels zeroed, the teacher verified against it.
    "perturbation_any": [(label, 2.0, NO_PROBES | overrides, {}) for label, overrides in (
        ("probes off, perturbation_scope any", {"perturbation_scope": "any"}),
        ("probes off, perturbation_scope any, no class left out", {"perturbation_scope": "any",
                                                                   "exclude_suspected_target": False}))],
    # Where no probe fires (the probes off stand for a trigger no probe sees), the scan's universal
    # inverted perturbation as the trigger for every backdoor, its channels zeroed and it unlearned,
    # against the preset's fallback (CLP + the fine-tune), with and without the suspected class left out.
    "general_removal": [(label, 2.0, NO_PROBES | overrides, {}) for label, overrides in (
        ("probes off, cpu preset", {}),
        ("probes off, no class left out", {"exclude_suspected_target": False}),
        ("probes off, perturbation_scope any", {"perturbation_scope": "any"}),
        ("probes off, perturbation_scope any, no class left out", {"perturbation_scope": "any",
                                                                   "exclude_suspected_target": False}),
        ("probes off, perturbation and unlearning scope any, no class left out",
         {"perturbation_scope": "any", "unlearn_scope": "any", "exclude_suspected_target": False}))],
    # The preset with the universal perturbation as the trigger wherever no probe fires and no class
    # left out (general_removal's best row), with the probes on and off, against the preset.
    # With no probe and the untargeted universal inversion made to miss (as on a trigger it passes
    # by), the targeted inversion into the adversarially flagged class against no removal step at all.
    "targeted_removal": [(label, 2.0, NO_PROBES | GENERAL_CANDIDATE | overrides, {}, UNTARGETED_MISSES)
                         for label, overrides in (
                             ("probes off, untargeted inversion misses, perturbation_scope any", {}),
                             ("probes off, untargeted inversion misses, perturbation_scope targeted",
                              {"perturbation_scope": "targeted"}))],
    # A short-trained patch model (recipe cifar10-resnet18-6ep): where the probe's stamp fires and its
    # channels are zeroed yet some backdoor stays, what takes the rest out.
    "short_training": [(label, 2.0, overrides, {}) for label, overrides in (
        ("cpu preset", {}),
        ("CLP's clean also where a probe's trigger fired", {"clp_with_trigger": True}),
        ("the probe's trigger unlearned always", {"patch_unlearn": "always"}))],
    # ...where the stamp, after its channels are zeroed, no longer flips the sure synthetic images:
    # unlearned towards the teacher's output on the image without it, or more channels zeroed; or
    # no probe, and the universal inverted perturbation unlearned though it looks all-to-one.
    "short_training_residual": [
        ("the probe's trigger unlearned always, towards the clean image's output", 2.0, {"patch_unlearn": "always"},
         {"unlearn_target": "clean_output"}),
        ("trigger channel clean at z > 2", 2.0, {"trigger_channel_u": 2.0}, {}),
        ("probes off, the universal inverted perturbation unlearned whatever its kind", 2.0,
         NO_PROBES | {"unlearn_scope": "any"}, {})],
    # Where no probe fires (probes off) and the universal or targeted inverted perturbation does: that
    # perturbation unlearned in the fine-tune as well as its channels zeroed, whatever its kind (today
    # only an all-to-all one is unlearned), against the preset.
    "unlearn_perturbation": [(label, 2.0, NO_PROBES | overrides, {}) for label, overrides in (
        ("probes off, cpu preset", {}),
        ("probes off, the firing perturbation unlearned whatever its kind", {"unlearn_scope": "any"}))],
    # A firing all-to-one perturbation unlearned only when it still flips RESIDUAL_FLIP of the synthetic
    # images on the compacted model (the rule patch_unlearn "residual" applies to a probe's trigger),
    # towards the synthetic label or the clean image's output; with the channel clean at the fixed
    # z > 4 (where the short-trained BadNet's perturbation survives it) and as the preset descends.
    "residual_unlearn": [(label, 2.0, NO_PROBES | overrides, ft) for label, overrides, ft in (
        ("probes off, perturbation channel clean fixed at z > 4", {"perturbation_channel_floor": None}, {}),
        ("probes off, fixed z > 4, a residual perturbation unlearned",
         {"perturbation_channel_floor": None, "unlearn_scope": "residual"}, {}),
        ("probes off, fixed z > 4, a residual perturbation unlearned towards the clean image's output",
         {"perturbation_channel_floor": None, "unlearn_scope": "residual"}, {"unlearn_target": "clean_output"}),
        ("probes off, cpu preset, a residual perturbation unlearned", {"unlearn_scope": "residual"}, {}))],
    # The tuning zoo's global additive trigger (attack "noise", target 2): the preset, and a firing
    # perturbation unlearned when it survives its channel clean (as residual_unlearn).
    "global_noise": [(label, 2.0, overrides, ft) for label, overrides, ft in (
        ("cpu preset", {}, {}),
        ("a residual perturbation unlearned", {"unlearn_scope": "residual"}, {}),
        ("a residual perturbation unlearned towards the clean image's output", {"unlearn_scope": "residual"},
         {"unlearn_target": "clean_output"}))],
    # On the noise model the warp probe fires (a field pulls 44% into class 2) while the universal
    # inverted perturbation flips 87%: the defense along the perturbation's path instead (probes off).
    "global_noise_paths": [("probes off", 2.0, NO_PROBES, {})],
    # ...where CLP's 7 channels leave a teacher that agrees with the original on 37% of the synthetic
    # images: the perturbation's path without CLP.
    "global_noise_no_clp": [("probes off, no CLP", 2.0, NO_PROBES | {"channel_u": None}, {})],
    # ...which zeroes 7 channels (87% -> 12%), verifies no teacher and loses classes 3 and 6 in the
    # fine-tune: the model before any fine-tune, and distilled from the unverified teacher anyway.
    "global_noise_diagnose": [
        ("probes off, no CLP, no fine-tune", 2.0, NO_PROBES | {"channel_u": None}, {"epochs": 0}),
        ("probes off, no CLP, distilled from the unverified teacher", 2.0,
         NO_PROBES | {"channel_u": None, "kd_gate": "always"}, {})],
    # The perturbation inverted also where a probe fires, and acted on instead of the probe's trigger
    # when it fires and flips more of the synthetic images (perturbation_over_probe).
    "strongest_evidence": [("the perturbation overrules a probe that flips fewer images", 2.0,
                            {"perturbation_over_probe": True}, {})],
    # Where the gate verifies no teacher the fine-tune has only the synthetic labels, and on the noise
    # model that costs classes 3 and 6 half their accuracy while the model before it lost 0.5 points
    # (global_noise_diagnose): the preset, and the student distilling from its own start (self_anchor).
    "self_anchor": [("cpu preset", 2.0, {}, {}),
                    ("the student distills from itself where no teacher is verified", 2.0, {"self_anchor": True}, {})],
    # ...which keeps 6.2 points less than the preset and 34% ASR: the model the fine-tune starts from.
    "self_anchor_start": [("cpu preset, no fine-tune", 2.0, {}, {"epochs": 0})],
    # C&C's own clean, the one step that needs no trigger: on the noise model compaction alone (no
    # probe, no CLP, no fine-tune) took the ASR from 99.98% to 25% for 0.5 points; clipping the
    # normalized singular values harder, before any fine-tune.
    "clip_strength": [(f"probes off, no CLP, no fine-tune, tau {tau:g}", 2.0,
                       NO_PROBES | {"channel_u": None, "tau": tau}, {"epochs": 0}) for tau in (4.0, 3.0, 2.0, 1.5)],
    # The noise model sends a third of real images to its target under random +-8/255 noise, and the
    # scan's inverted perturbations reach 100% without resembling its pattern: the fine-tune asked for
    # the same output with and without random noise (finetune.noise_weight), alone and with the
    # student anchored to itself where no teacher is verified.
    "noise_consistency": [("cpu preset", 2.0, {}, {}),
                          ("noise term, weight 1, eps 8/255", 2.0, {}, {"noise_weight": 1.0}),
                          ("noise term, weight 1, eps 8/255, self-anchored", 2.0, {"self_anchor": True}, {"noise_weight": 1.0}),
                          ("noise term, weight 3, eps 8/255, self-anchored", 2.0, {"self_anchor": True}, {"noise_weight": 3.0})],
    # ...where random +-8/255 noise sends 11% of the (rough) synthetic images to the target against 34% of
    # real ones: the fine-tune on images as smooth as the data (the scan keeps the preset's rough ones),
    # without and with the noise term.
    "noise_consistency_smooth": [("fine-tune on smooth synthetic images", 2.0, SCAN_SPLIT, {}),
                                 ("fine-tune on smooth synthetic images, noise term weight 1", 2.0, SCAN_SPLIT,
                                  {"noise_weight": 1.0})],
    # ...which took the ASR from 92% to 19% for 1 ACC point: a stronger term, and noise of twice the size.
    "noise_consistency_smooth_strength": [
        ("fine-tune on smooth synthetic images, noise term weight 3", 2.0, SCAN_SPLIT, {"noise_weight": 3.0}),
        ("fine-tune on smooth synthetic images, noise term weight 1, eps 16/255", 2.0, SCAN_SPLIT,
         {"noise_weight": 1.0, "noise_eps": 16 / 255})],
    # The smooth fine-tune images with the noise term at eps 16/255 (the noise model's best: 72.46 / 2.80)
    # on the tuning zoo's other models, against the same images without the term.
    "noise_term_zoo": [(label, ratio, SCAN_SPLIT, ft) for ratio in (2.0, 4.0) for label, ft in (
        ("fine-tune on smooth synthetic images", {}),
        ("fine-tune on smooth synthetic images, noise term weight 1, eps 16/255",
         {"noise_weight": 1.0, "noise_eps": 16 / 255}))],
    # noise_term_zoo's term cost the distilled students of BadNet and Blended 1-3 points at 4x: the term only
    # for a student with no verified teacher (DefendConfig.undistilled_finetune), on the smooth fine-tune images.
    "undistilled_noise": [("smooth fine-tune images; noise term w1, eps 16/255 for a student without a teacher", ratio,
                           SCAN_SPLIT | {"undistilled_finetune": {"noise_weight": 1.0, "noise_eps": 16 / 255}}, {})
                          for ratio in (2.0, 4.0)],
    # undistilled_noise took the zoo WaNet (no probe fires, no teacher verified) from the preset's 79.86 / 8.13
    # to 72.04 / 29.69 at 2x: the smooth images alone, and with the term for every student.
    "noise_term_wanet": [("fine-tune on smooth synthetic images", 2.0, SCAN_SPLIT, {}),
                         ("fine-tune on smooth synthetic images, noise term weight 1, eps 16/255", 2.0, SCAN_SPLIT,
                          {"noise_weight": 1.0, "noise_eps": 16 / 255})],
    # The shipped preset on the same models, machine and split, for noise_term_zoo to be read against.
    "preset_now": [("cpu preset", ratio, {}, {}) for ratio in (2.0, 4.0)],
    # The trigger channel clean lowering its threshold (from the preset's u) in steps of 0.5 down to
    # z > 2 until the trigger it cleans by (the probe's stamp, or with the probes off the inverted
    # perturbation) flips fewer than 10% / 2% of the synthetic images. As run at f8ca3f3, whose
    # trigger_channel_floor / _quiet applied to both; since then only the perturbation's clean has
    # them (perturbation_channel_floor / _quiet), so the probe's rows no longer differ from the preset.
    "until_quiet": [(f"probes off, trigger channel clean down to z > 2 until it flips < {quiet:.0%}", 2.0,
                     NO_PROBES | {"perturbation_channel_floor": 2.0, "perturbation_channel_quiet": quiet}, {})
                    for quiet in (0.1, 0.02)],
    # The two that helped above, milder and together.
    "short_training_combined": [
        ("trigger channel clean at z > 2.5", 2.0, {"trigger_channel_u": 2.5}, {}),
        ("trigger channel clean at z > 2.5, the probe's trigger unlearned always, towards the clean image's output",
         2.0, {"trigger_channel_u": 2.5, "patch_unlearn": "always"}, {"unlearn_target": "clean_output"}),
        ("trigger channel clean at z > 2, the probe's trigger unlearned always, towards the clean image's output",
         2.0, {"trigger_channel_u": 2.0, "patch_unlearn": "always"}, {"unlearn_target": "clean_output"})],
    "general_candidate": [(label, ratio, overrides, {}) for label, ratio, overrides in (
        ("cpu preset", 2.0, {}),
        ("perturbation_scope any, no class left out", 2.0, GENERAL_CANDIDATE),
        ("probes off, perturbation_scope any, no class left out", 2.0, NO_PROBES | GENERAL_CANDIDATE),
        ("perturbation_scope any, no class left out", 4.0, GENERAL_CANDIDATE))],
    "universal_unlearn_4x": [(label, 4.0, overrides, ft) for label, overrides, ft in (
        ("cpu preset", {}, {}),
        ("universal unlearning r 3, no class left out", {"exclude_suspected_target": False}, {"universal_weight": 1.0}))],
    # The Blended all-to-one model, with the blend probe (its teacher verified, used as is) and without
    # it (its teacher fine-tuned first, as pure_kd's unverified teachers are), each against the preset.
    "pure_kd_blended": [(label + probe_label, ratio, overrides | probe, {}) for ratio in (2.0, 4.0)
                        for label, overrides in (("cpu preset", {}), (
                            "unverified teacher fine-tuned at lr 0.001; student: distillation only, mixup 1, 30 epochs, "
                            "gradient norm 1", {"teacher_finetune": {}, "distill_finetune": DISTILL_ALONE}))
                        for probe_label, probe in (("", {}), (", blend probe off", {"blend_probe": None}))],
    # The compact step's Tucker-2 factors by HOOI (alternating least squares at the chosen ranks) in place
    # of truncated HOSVD, for the preset's student and for distillation alone.
    "hooi": [(label + ", HOOI factors", ratio, overrides | {"compact": {"method": "hooi"}}, {})
             for ratio in (2.0, 4.0) for label, overrides in (("cpu preset", {}), (
                 "unverified teacher fine-tuned at lr 0.001; student: distillation only, mixup 1, 30 epochs, "
                 "gradient norm 1", {"teacher_finetune": {}, "distill_finetune": DISTILL_ALONE}))],
    # After compaction, each BatchNorm's running statistics matched to the clipped full-rank model's on the
    # first N synthetic images (bn_match_samples), for the preset's student; bn_match_zoo: N = 512 at 2x and 4x.
    "bn_match": [(f"cpu preset, BatchNorm statistics matched on {n} synthetic images", ratio, {"bn_match_samples": n}, {})
                 for ratio in (2.0, 4.0) for n in (256, 512, 1024)],
    "bn_match_zoo": [("cpu preset, BatchNorm statistics matched on 512 synthetic images", ratio,
                      {"bn_match_samples": 512}, {}) for ratio in (2.0, 4.0)],
    # The compact step's factors activation-aware (each clipped weight decomposed again so that truncation
    # keeps what its outputs on the 256 calibration images use), alone and with the BatchNorm matching.
    "activation": [(label, ratio, {"compact": {"method": "activation"}} | overrides, {})
                   for ratio in (2.0, 4.0) for label, overrides in (
                       ("cpu preset, activation-aware factors", {}),
                       ("cpu preset, activation-aware factors, BatchNorm statistics matched on 512 synthetic images",
                        {"bn_match_samples": 512}))],
    # ...and what the compact model keeps before any fine-tune, HOSVD against activation-aware factors.
    "activation_compact": [(f"cpu preset, {method} factors, no fine-tune", ratio, {"compact": {"method": method}},
                            {"epochs": 0}) for ratio in (2.0, 4.0) for method in ("hosvd", "activation")],
    # Synthesis with the diversity term: same-label images pushed apart in the original's feature space.
    "diversity": [(f"cpu preset, synthesis diversity weight {w:g}", ratio, {"synth": {"diversity_weight": w}}, {})
                  for w in (0.5, 2.0) for ratio in (2.0, 4.0)],
    # The two opt-ins that help WaNet most, together: the unverified teacher fine-tuned at lr 0.0002 and
    # distilled from, and the BatchNorm statistics matched after compaction.
    "opt_in_combined": [("cpu preset, teacher fine-tuned at lr 0.0002, BatchNorm statistics matched on 512 synthetic "
                         "images", ratio, {"teacher_finetune": {"lr": 2e-4}, "bn_match_samples": 512}, {})
                        for ratio in (2.0, 4.0)],
    # The synthesis's weight on BatchNorm statistics against its CE (1 : 1 in the presets). CE falls to ~0.001
    # within the 200 steps either way, while the BN loss ends at 0.14 at weight 1 and 0.035 at weight 10 on the
    # zoo WaNet (one batch of 128): a heavier BN term buys closer statistics for almost no class evidence.
    # DeepInversion's CIFAR-10 script weights its (unsquared) BN term 10x.
    "bn_weight": [(f"cpu preset, synthesis BatchNorm weight {w:g}", ratio, {"synth": {"bn_weight": w}}, {})
                  for w in (10.0, 30.0) for ratio in (2.0, 4.0)],
    # bn_weight 30 gained 0.6 / 2.1 points on WaNet at 2x / 4x. The images stay far rougher than the data: their
    # mean squared neighbour difference (total_variation, normalized space) is 2.8 against 0.28 for real
    # CIFAR-10 test images (benchmarks/experiments/synthesis_prior.md), so the preset's TV weight (1e-4) does nothing. On one batch of 128 at BN weight 30,
    # TV weight 1 / 3 / 10 brings it to 1.07 / 0.61 / 0.36, with the BN and CE losses where they were.
    "tv_weight": [(f"cpu preset, synthesis BatchNorm weight 30, TV weight {tv:g}", ratio,
                   {"synth": {"bn_weight": 30.0, "tv_weight": tv}}, {}) for tv in (1.0, 3.0, 10.0) for ratio in (2.0, 4.0)],
    # tv_weight's best row (BN weight 30, TV weight 10: WaNet 81.41 / 1.64 and 76.12 / 1.54, against the preset's
    # 80.71 / 2.27 and 73.45 / 1.46) on the zoo's other models, before it goes into the presets.
    "prior": [("cpu preset, synthesis BatchNorm weight 30, TV weight 10", ratio,
               SMOOTH_SYNTH, {}) for ratio in (2.0, 4.0)],
    # With that prior, WaNet's nine other classes lose 1.3 points at 2x and class 0, left out, 2.7 (90.4 -> 63.5%).
    # The BatchNorm matching (opt-in) and the left-out class masked out of the CE, on the new images.
    "prior_target": [("prior; BatchNorm statistics matched on 512 synthetic images", ratio,
                      SMOOTH_SYNTH | {"bn_match_samples": 512}, {}) for ratio in (2.0, 4.0)]
                    + [("prior; left-out class masked out of the fine-tune's CE", ratio,
                        SMOOTH_SYNTH, {"mask_left_out_class": True}) for ratio in (2.0, 4.0)],
    # prior's smooth images with the scan (probes, suspicion, trigger channel clean, the gate's trigger check)
    # on images of its own, made with the weights its thresholds were set on (DefendConfig.scan_synth).
    "scan_split": [("cpu preset; fine-tune images at BN weight 30, TV weight 10; the scan's own at BN 1, TV 1e-4", ratio,
                    SCAN_SPLIT, {}) for ratio in (2.0, 4.0)],
    # scan_split's Blended 4x student fell to 65.08 where its blend pattern (flipping 22% after compaction) was
    # unlearned on the smooth images: the same with the pattern never unlearned (trigger channel clean kept).
    "scan_split_unlearn": [("scan_split, blend pattern never unlearned", 4.0,
                            SCAN_SPLIT | {"patch_unlearn": "never"}, {})],
    # ...and GTSRB BadNet all-to-all (2x ASR 1.26 -> 10.29% on smooth images), whose stamp flips 8% after
    # compaction, under the residual bar, so it is not unlearned: the same, always unlearned.
    "scan_split_unlearn_always": [("scan_split, found trigger always unlearned", ratio,
                                   SCAN_SPLIT | {"patch_unlearn": "always"}, {})
                                  for ratio in (2.0, 4.0)],
    # WaNet's three opt-ins that each gained ACC at 4x, stacked on the smooth fine-tune images (scan on its own
    # images, as scan_split): BatchNorm matching with the teacher fine-tuned at lr 0.0002 (opt_in_combined), and
    # with distillation alone from a teacher fine-tuned at lr 0.001 (pure_kd_clipped).
    "opt_in_stack": [(f"scan_split; BatchNorm statistics matched on 512 images; {label}", ratio,
                      SCAN_SPLIT | {"bn_match_samples": 512} | overrides, {})
                     for label, overrides in (
                         ("teacher fine-tuned at lr 0.0002", {"teacher_finetune": {"lr": 2e-4}}),
                         ("teacher fine-tuned at lr 0.001, student distillation only (DISTILL_ALONE)",
                          {"teacher_finetune": {}, "distill_finetune": DISTILL_ALONE}))
                     for ratio in (2.0, 4.0)],
    # opt_in_stack's first setting (WaNet 83.09 / 2.84 at 2x, 79.88 / 4.14 at 4x) on the zoo's other models.
    "opt_in_stack_zoo": [("scan_split; BatchNorm statistics matched on 512 images; teacher fine-tuned at lr 0.0002", ratio,
                          STACKED, {}) for ratio in (2.0, 4.0)],
    # ...and with twice the student's fine-tune epochs: opt_in_stack missed WaNet's 4x bound (drop <= 5) by 0.57.
    "opt_in_stack_epochs": [("scan_split; BatchNorm statistics matched on 512 images; teacher fine-tuned at lr 0.0002; "
                             "student fine-tuned 20 epochs", ratio,
                             STACKED | {"teacher_finetune": {"lr": 2e-4, "epochs": 10}}, {"epochs": 20})
                            for ratio in (2.0, 4.0)],
    # Smooth images cost GTSRB BadNet all-to-all's removal (2x ASR 1.26 -> 10.29%), which the preset's rough
    # images give: the fine-tune on both sets (the scan's rough images join the smooth ones), alone and
    # with opt_in_stack_zoo's opt-ins.
    "scan_union": [(f"scan_split; fine-tune on both sets{label}", ratio,
                    SCAN_SPLIT | {"finetune_on_scan_synthetic": True} | overrides, {})
                   for label, overrides in (
                       ("", {}),
                       ("; BatchNorm statistics matched on 512 images; teacher fine-tuned at lr 0.0002",
                        STACKED))
                   for ratio in (2.0, 4.0)],
    # The smooth images' regressions without the unverified teacher: both sets in the fine-tune (GTSRB BadNet
    # all-to-all) and the BatchNorm matching (Blended 4x kept 79.71 with it in opt_in_stack_zoo, 65.08 without).
    "scan_union_bn_match": [("scan_split; fine-tune on both sets; BatchNorm statistics matched on 512 images", ratio,
                             SCAN_UNION_BN_MATCH, {}) for ratio in (2.0, 4.0)],
    # The preset as shipped and the candidate side by side, ACC and wall time, on a machine of its own
    "preset_and_candidate": [(label, 2.0, overrides, {}) for label, overrides in (
        ("cpu preset", {}),
        ("scan_split; fine-tune on both sets; BatchNorm statistics matched on 512 images", SCAN_UNION_BN_MATCH))],
    # ...with the inverted or probed trigger unlearned harder (the two all-to-all models above 5% at 4x)
    "scan_union_unlearn": [(f"scan_split; fine-tune on both sets; BatchNorm statistics matched on 512 images; unlearn weight {w:g}",
                            4.0, SCAN_UNION_BN_MATCH, {"unlearn_weight": w}) for w in (1.0, 2.0, 4.0)],
    # A defense takes about 3 of issue 4's 10 minutes here, 6 s of them the fine-tune: pure_kd_clipped's
    # students spent more of the rest on distillation steps (epochs, learning rate) and synthetic images.
    "kd_budget": [(f"pure_kd_clipped with {n} synthetic images, {epochs} epochs" + (f", lr {lr:g}" if lr else ""),
                   ratio, {"teacher_finetune": {}, "synth": {"n_samples": n},
                           "distill_finetune": DISTILL_ALONE | {"epochs": epochs} | ({"lr": lr} if lr else {})}, {})
                  for ratio in (4.0,)
                  for n, epochs, lr in ((1024, 90, None), (1024, 90, 3e-3), (2048, 45, None), (2048, 90, None))],
}

GRID_NOTES = {"blend_oracle": "The oracle rows are a diagnostic, not a defense: they hand the pipeline the attack's own "
                       "pattern as if a probe had found it (measured on the model and the synthetic images as a probe's "
                       "trigger is), to bound what a blend probe could give.",
              "oracle": "A diagnostic, not a defense: these rows give the pipeline real training images (a clean, "
                        "seeded subset) in place of the synthetic ones, to measure how much of the ACC drop comes "
                        "from the synthetic data and how much from compression itself."}


@contextlib.contextmanager
def untargeted_misses():
    """Within: the untargeted universal inversion (flip_report) reports no flips, so that no
    perturbation fires from it, as on a trigger its descent passes by."""
    real = suspect.flip_report

    def missed(model, x, cfg):
        report, delta = real(model, x, cfg)
        return report | {"flip_rate": 0.0, "missed_flip_rate": report["flip_rate"]}, delta

    with mock.patch.object(suspect, "flip_report", missed), mock.patch.object(teacher, "flip_report", missed):
        yield


@contextlib.contextmanager
def true_trigger_probe(attack):
    """Within: defend's trigger probes report ``attack``'s own blend pattern as the firing trigger,
    measured on the model and the synthetic images as blend_probe measures its patterns, and it
    counts as firing whatever its flip rate (blend_score's threshold and specificity are for
    patterns a probe found)."""
    real = true_blend(attack)
    if real is None:
        raise ValueError(f"the true-trigger rows need a Blended attack, got {attack.label if attack else None}")

    def probe(model, x, cfg):
        found = trigger_report(model, x, real, BlendProbeConfig().n)
        return {"patch": None, "warp": None, "blend": found, "trigger": found}

    with mock.patch.object(defense_run, "probe_triggers", probe), \
            mock.patch.object(probes, "blend_score", lambda found: found["flip_rate"]):
        yield


def row_config(grid: str, ratio: float, overrides: dict, ft: dict) -> tuple:
    """(DefendConfig, DefendConfig overrides) of one row of ``grid``: the cpu preset with the grid's
    base (BASES) and the row's DefendConfig and fine-tune overrides on top."""
    base, base_ft = BASES[grid]
    compact = base.get("compact", {}) | overrides.get("compact", {})
    merged = base | overrides | {"compact": compact}
    if "synth" in base and "synth" in overrides:  # a row's synthesis settings refine its base's
        merged["synth"] = base["synth"] | overrides["synth"]
    cfg = resolve_config("cpu", ratio=ratio, finetune=base_ft | ft, scan_before=False, **merged)
    return cfg, merged


def run(models: list[str], grid: str, recipe_name: str = DEFAULT_RECIPE, seed: int | None = None) -> dict:
    """Every row of ``grid`` on each zoo model in ``models`` of ``recipe_name``, trained from the
    recipe's seed unless ``seed`` gives another (trained and cached under its own name if needed)."""
    torch.manual_seed(0)
    recipe = RECIPES[recipe_name] | ({} if seed is None else {"seed": seed})
    test = load_dataset(recipe["dataset"], "val")
    train = None  # loaded by the first row that uses real images
    rows = []
    for name in models:
        directory = ensure_model(name, recipe)
        model, attack = load_model(directory / "model.safetensors"), load_attack(directory)
        base, base_ft = BASES[grid]
        synthetic = {}  # synthesis config -> (label, x, y, seconds): loaded once per model
        real = {}  # number of real training images -> (x, y), for the oracle grid
        for label, ratio, overrides, ft, *extra in GRIDS[grid]:
            n_real = next((e for e in extra if isinstance(e, int)), None)  # the oracle grid's real images
            cfg, merged = row_config(grid, ratio, overrides, ft)
            made = {}
            for role, synth in (("fine-tune", cfg.synth), ("scan", cfg.scan_synth_config)):
                if synth is None:
                    continue
                key = json.dumps(synth.to_dict(), sort_keys=True)
                if key not in synthetic:
                    synthetic[key] = (synthesis_label(synth), *shared_synthetic(model_name(name, recipe), model, synth))
                made[role] = synthetic[key][1:3]
            x, y = made["fine-tune"]
            if n_real:
                if n_real not in real:
                    if train is None:
                        train = load_dataset(recipe["dataset"], "train")
                    real[n_real] = real_images(train, n_real, model.cc_spec)
                x, y = real[n_real]
            with true_trigger_probe(attack) if TRUE_TRIGGER in extra else contextlib.nullcontext(), \
                    untargeted_misses() if UNTARGETED_MISSES in extra else contextlib.nullcontext():
                result = defend(model, config=cfg, eval_data=test, attack=attack, progress=False,
                                log=lambda *a: None, synthetic=(x, y), scan_synthetic=made.get("scan"))
            r = result.report
            distillation = r["distillation"] or {}
            rows.append({"model": name, "train_seed": recipe["seed"], "ratio": ratio, "setting": label,
                         "overrides": merged, "finetune": base_ft | ft,
                         "channel_u": cfg.channel_u, "channel_mode": cfg.channel_mode, "tau": cfg.tau, "normalizer": cfg.normalizer,
                         "channels_zeroed": r["channel_clean"]["n_pruned"], **r["metrics"],
                         "suspected_target": r["scan"]["suspected_target"], "true_target": all_to_one_target(attack),
                         "synthetic_excluded": r["scan"]["synthetic_excluded"],
                         "flip_rate": r["scan"]["flip_rate"], "all_to_all_suspected": r["scan"]["all_to_all_suspected"],
                         "targeted_inversion": r["scan"].get("targeted_inversion"),
                         "perturbation_residual": r["scan"].get("perturbation_residual"),
                         "params_after": r["model"]["params_after"], "compression": r["model"]["compression"],
                         "trigger": r["scan"]["trigger"], "trigger_clean": r["channel_clean"].get("trigger"),
                         "distilled": distillation.get("distill"), "distillation_reason": distillation.get("reason"),
                         "teacher_metrics": distillation.get("teacher_metrics"), "distill_check": distillation.get("check"),
                         "seconds_excl_synthesis": r["timings_s"]["total"], "timings_s": r["timings_s"]})
            m = r["metrics"]
            print(f"{name} {ratio}x {label}: ACC {m['acc_after']:.4f} ASR {m['asr_after']:.4f} "
                  f"({r['timings_s']['total']:.0f} s)", flush=True)
        rows += [{"model": name, "setting": f"synthesis (shared): {what}", "seconds": seconds}
                 for what, _, _, seconds in synthetic.values()]
    flags = ("" if recipe_name == DEFAULT_RECIPE else f" --recipe {recipe_name}") + ("" if seed is None else f" --seed {seed}")
    return {"command": f"{COMMAND} --grid {grid} --models {' '.join(models)}{flags}", "machine": machine(),
            "grid": grid, "recipe": recipe_name, "dataset": recipe["dataset"], "train_seed": recipe["seed"],
            "eval_split": "val", "rows": rows}


def split_text(result: dict) -> str:
    """Which images a sweep scored on: the test set's validation half since the tuning protocol
    (docs/PROTOCOL.md), the whole test set before it."""
    return {"val": "test set's validation half"}.get(result.get("eval_split"), "test set (the whole of it, before the tuning protocol)")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# C&C sweep: grid `{result['grid']}`\n",
             f"`{result['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}"
             f"{train_seed_text(result)}. "
             f"ACC/ASR in %, on the real {DATASET_NAMES[result.get('dataset', 'cifar10')]} {split_text(result)} (never seen by the defense). Every setting uses the "
             "`cpu` preset except what its label says, and the same synthetic images (made once per model "
             "and synthesis setting from the original model). Targets (issue 4): ASR <= 5 and ACC drop <= 3 at 2x, <= 5 at 4x.\n",
             "| model | ratio | setting | channels zeroed | suspected target (images left out) | ACC before | ACC after | drop | target-class ACC before -> after | ASR before | ASR after | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if result["grid"] in GRID_NOTES:
        lines.insert(2, GRID_NOTES[result["grid"]] + "\n")
    for r in result["rows"]:
        if "acc_after" not in r:
            lines.append(f"| {r['model']} | | {r['setting']} | | | | | | | | | {r['seconds']:.0f} |")
            continue
        excluded = r.get("synthetic_excluded")
        target = f"{r['suspected_target']} ({excluded})" if excluded else "-"
        lines.append(f"| {r['model']} | {r['ratio']:g} | {r['setting']}{_teacher_text(r)} | {r['channels_zeroed']} | {target} | "
                     f"{100 * r['acc_before']:.2f} | {100 * r['acc_after']:.2f} | "
                     f"{100 * (r['acc_before'] - r['acc_after']):.2f} | {_target_class_acc(r)} | {100 * r['asr_before']:.2f} | "
                     f"{100 * r['asr_after']:.2f} | {r['seconds_excl_synthesis']:.0f} |")
    return "\n".join(lines) + "\n"


def train_seed_text(result: dict) -> str:
    """', models trained from seed N' when the sweep's models are not the zoo's own (zoo.RECIPE's seed)."""
    seed = result.get("train_seed", ZOO_RECIPE["seed"])
    return "" if seed == ZOO_RECIPE["seed"] else f", models trained from seed {seed} (the zoo's: {ZOO_RECIPE['seed']})"


def synthesis_label(synth: SynthConfig) -> str:
    """'N images x I iterations', then every setting that differs from the cpu preset's."""
    preset = PRESETS["cpu"].synth.to_dict()
    changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in synth.to_dict().items()
               if k not in ("n_samples", "iterations") and v != preset[k]]
    return ", ".join([f"{synth.n_samples} images x {synth.iterations} iterations", *changed])


def real_images(train: ImageData, n: int, spec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random ``n`` of the clean training images ``train``, (n, C, H, W) in the model's
    normalized input space like synthetic images, and their labels (n,)."""
    x, y = train.sample(n / len(train), seed).tensors()
    return normalize(x.float() / 255, spec.mean, spec.std), y


def all_to_one_target(attack) -> int | None:
    return attack.target if attack is not None and not attack.all_to_all else None


def _teacher_text(row: dict) -> str:
    """What the teacher's own fine-tune and the distillation check did (rows that have them), for the setting column."""
    t, check = row.get("teacher_metrics"), row.get("distill_check")
    text = "" if not t else (f" (teacher ACC {100 * t['acc_before']:.2f} -> {100 * t['acc_after']:.2f}, "
                             f"ASR {100 * t['asr_before']:.2f} -> {100 * t['asr_after']:.2f})")
    if check:
        text += f"; {distill_check_flips(check)}: the {'distilled' if check['kept'] else 'undistilled'} student is kept"
    return text


def _target_class_acc(row: dict) -> str:
    if row.get("per_class_acc_after") is None or row.get("true_target") is None:
        return "-"
    t = row["true_target"]
    return f"{100 * row['per_class_acc_before'][t]:.1f} -> {100 * row['per_class_acc_after'][t]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["badnet", "wanet"])
    parser.add_argument("--grid", choices=list(GRIDS), default="focused")
    parser.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE)
    parser.add_argument("--name", help="results file name under benchmarks/results/ (default "
                        "sweep_defend_<grid>, with _<recipe> for a recipe other than the default); "
                        "give one to keep another model set's results beside the committed ones")
    parser.add_argument("--seed", type=int, help="train the models from this seed instead of the recipe's "
                        "(cached as <name>-seed<N>); the results file gets a _seed<N> suffix")
    args = parser.parse_args()
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name.startswith(".")):
        parser.error(f"--name must be a plain file name, got {args.name!r}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    result = run(args.models, args.grid, args.recipe, args.seed)
    if args.name:
        result["command"] += f" --name {args.name}"
    suffix = ("" if args.recipe == DEFAULT_RECIPE else f"_{args.recipe}") + ("" if args.seed is None else f"_seed{args.seed}")
    print(*write_results(args.name or f"sweep_defend_{args.grid}{suffix}", result, markdown(result)), sep="\n")


if __name__ == "__main__":
    main()

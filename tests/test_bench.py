"""The benchmark runner's bookkeeping: rows, filters, and the RESULTS.md renderer."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench, zoo
from cc_core import ModelSpec
from cc_core.errors import InputError
from cleancompact.cli import main


def test_rows_have_unique_ids_and_commands_that_select_exactly_themselves():
    rows = bench.select()
    assert len({r.id for r in rows}) == len(rows)
    assert len(bench.TABLES["table2"]) == 8 * 6
    for row in rows:
        args = row.command.split()[3:]
        recipe = args[args.index("--recipe") + 1]
        attacks = [args[args.index("--attacks") + 1]]
        defenses = [args[args.index("--defenses") + 1]]
        ratios = [float(args[args.index("--ratios") + 1])] if "--ratios" in args else None
        selected = [r for r in bench.select(None, recipe, attacks, defenses, ratios)]
        assert selected == [row]


def test_zoo_commands_carry_the_attack_overrides():
    def flags(cmd):
        return " ".join(cmd)

    assert "--cross-ratio" not in flags(zoo.command("badnet", out="o"))
    default_wanet = flags(zoo.command("wanet", out="o"))
    assert f"--epochs {zoo.ATTACK_OVERRIDES['wanet']['epochs']}" in default_wanet
    assert f"--cross-ratio {zoo.ATTACK_OVERRIDES['wanet']['cross_ratio']}" in default_wanet
    trial = flags(zoo.command("wanet", out="o", overrides={"epochs": 7, "cross_ratio": 0.5, "attack_params": {"s": 3.0}}))
    assert "--epochs 7" in trial and "--cross-ratio 0.5" in trial and "--attack-param s=3.0" in trial
    assert "--cross-ratio" not in flags(zoo.command("wanet", out="o", overrides={}))
    # the overrides were set on CIFAR-10: they follow the dataset, not the exact recipe
    wider = flags(zoo.command("wanet", bench.RECIPES["cifar10-resnet18-w0.5"], out="o"))
    assert "--width 0.5" in wider and "--cross-ratio 0.5" in wider
    assert "--cross-ratio" not in flags(zoo.command("wanet", bench.RECIPES["gtsrb-resnet18"], out="o"))


def test_a_zoo_model_from_another_seed_is_trained_and_cached_under_its_own_name():
    reseeded = bench.RECIPES["cifar10-resnet18"] | {"seed": 2}
    assert zoo.model_name("wanet", reseeded) == zoo.model_name("wanet") + "-seed2"
    assert zoo.model_dir("wanet", reseeded) != zoo.model_dir("wanet")
    assert "--seed 2" in " ".join(zoo.command("wanet", reseeded))
    assert zoo.model_name("wanet", bench.RECIPES["cifar10-resnet18"] | {"seed": 0}) == zoo.model_name("wanet")


@pytest.mark.parametrize("kwargs", [{"defense": "cc"}, {"defense": "none", "ratio": 2.0},
                                    {"defense": "cc", "ratio": 1.0}, {"defense": "fineprune", "ratio": 2.0}])
def test_bad_rows_are_refused(kwargs):
    with pytest.raises(ValueError):
        bench.Row("cifar10-resnet18", "badnet", **kwargs)


def _fake_row(row: bench.Row, acc_before: float, acc_after: float, asr_after: float) -> dict:
    onnx = None if row.defense == "none" else {"latency_ms": {"original": 10.0, "compact": 5.0}, "speedup": 2.0,
                                               "speedup_batch1": 1.5}
    return {"row": {"recipe": row.recipe, "attack": row.attack, "defense": row.defense, "ratio": row.ratio},
            "id": row.id, "command": row.command, "params_before": 1000, "params_after": 500,
            "metrics": {"acc_before": acc_before, "acc_after": acc_after, "asr_before": 0.97, "asr_after": asr_after,
                        "ra_before": 0.0, "ra_after": 0.5},
            "timings_s": {"finetune": 3.0, "evaluate": 1.0}, "defense_s": 3.0, "onnx": onnx,
            "machine": {"cpu": "test cpu", "cores": 2, "torch": "x"}}


def test_render_reports_cells_missing_rows_and_the_target_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROWS_DIR", tmp_path / "bench")
    monkeypatch.setattr(bench, "RESULTS_MD", tmp_path / "RESULTS.md")
    (tmp_path / "bench").mkdir()
    written = [(bench.Row("cifar10-resnet18", "badnet", "cc", 2.0), 0.85, 0.84, 0.03),
               (bench.Row("cifar10-resnet18", "wanet", "cc", 2.0), 0.85, 0.82, 0.04),
               (bench.Row("cifar10-resnet18", "badnet", "none"), 0.85, 0.85, 0.97),
               (bench.Row("cifar10-resnet18", "badnet", "clp", 2.0), 0.8523, 0.20, 0.01)]
    for row, *values in written:
        fields = _fake_row(row, *values)
        if row.attack == "wanet":
            warp = {"kind": "warp", "shift": [[[0.5] * 4] * 4] * 2, "pull_class": 0, "max_shift_used": 0.5,
                    "flip_rate": 0.5, "flip_rate_compact": 0.3, "unlearned": True}
            fields["suspicion"] = {"suspected_target": 0, "inversion_concentration": 0.12, "synthetic_excluded": 103,
                                   "trigger": warp}
            fields["details"] = {"trigger": {"kind": "warp", "trigger_flip_rate": 0.33, "n_pruned": 18,
                                             "trigger_flip_rate_after": 0.06}}
            fields["distillation"] = {"gate": "verified", "distill": False, "teacher_trigger_flip_rate": 0.2,
                                      "reason": "the probe's warp still flips 20% of the synthetic images on the teacher"}
            fields["config"] = {"compact_resolved": {"rank_strategy": "sensitivity"}}
            fields["machine"] |= {"git_commit": "abc1234", "cpu_bf16_native": False}
        if row.attack == "badnet" and row.defense == "cc":
            fields["suspicion"] = {"suspected_target": 0, "inversion_concentration": 1.0, "synthetic_excluded": 52,
                                   "patch": {"size": 3, "value": 1.0, "row": 29, "col": 29, "flip_rate": 0.94,
                                             "flip_rate_compact": 0.0, "unlearned": False}}
            fields["details"] = {"trigger": {"stamp_flip_rate": 0.25, "n_pruned": 13, "stamp_flip_rate_after": 0.0}}
            fields["distillation"] = {"gate": "verified", "distill": True, "teacher_stamp_flip_rate": 0.0, "reason": None}
        (tmp_path / "bench" / f"{row.id}.json").write_text(json.dumps(fields))
    text = bench.render().read_text()
    assert ("| cifar10-resnet18-w0.25-wanet-cc-2x | 0 | 103 | 0.12 | - | - | warp a 4x4-point warp (max 0.50 px): "
            "flips 0.50, 0.30 after compaction, unlearned | warp flips 0.33 after CLP: 18 channels zeroed, then 0.06 | "
            "no: the probe's warp still flips 20% of the synthetic images on the teacher |") in text
    # a row from before the warp probe: its stamp under "patch", stamp_flip_rate keys
    assert ("| cifar10-resnet18-w0.25-badnet-cc-2x | 0 | 52 | 1.00 | - | - | patch 3x3 white at (29, 29): flips 0.94, "
            "0.00 after compaction | stamp flips 0.25 after CLP: 13 channels zeroed, then 0.00 "
            "| yes (the trigger flips 0.00 on the teacher) |") in text
    # the CLP row ran on another training of the model (original ACC 85.23, not the none row's 85.00)
    assert "| cifar10-resnet18-w0.25-badnet | 85.00 / 97.00 | not run | 20.00 / 1.00 † | 84.00 / 3.00 |" in text
    assert ("† measured on another training of the zoo model than the `No defense` cell's: "
            "cifar10-resnet18-w0.25-badnet-clp-2x (its original ACC 85.23).") in text
    # mean drop (1 + 3) / 2 = 2 points > 1.5: missed by 0.50, over 2 of the 8 settings
    assert "C&C 2x over 2 of 8 settings: mean ACC drop 2.00 points" in text
    assert "max ASR 4.00% (target <= 5%): **MISSED**; mean drop over target by 0.50 points." in text
    assert "C&C 4x: no row run yet" in text
    assert "Machines: test cpu, 2 cores, torch x, bf16; test cpu, 2 cores, torch x, fp32." in text
    assert re.search(r"\| cifar10-resnet18-w0\.25-wanet-cc-2x \| abc1234 \| fp32 \| sensitivity \| older \([a-z_, .]+\) \| "
                     r"whole test set \| `cleancompact bench run --recipe cifar10-resnet18 --attacks wanet --defenses cc "
                     r"--ratios 2` \|", text)
    # a row from before commit, config and precision were kept (it ran bf16 autocast)
    assert "| cifar10-resnet18-w0.25-badnet-cc-2x | - | bf16 | - |" in text
    assert "| cifar10-resnet18-w0.25-wanet-cc-2x | test cpu, fp32 | 3.0 | finetune 3.0 |" in text
    # the width section: the zoo's WaNet with its drop and the machine its seconds are from; the half-width model not run
    assert ("| cifar10-resnet18-w0.25-wanet | 1,000 | not run | 82.00 / 4.00 (3.00) | not run | 3 / - | "
            "test cpu, fp32 |") in text
    assert "| cifar10-resnet18-w0.5-wanet | - | not run | not run | not run | - / - | - |" in text


def test_distillation_column_says_what_the_distillation_check_kept():
    from benchmarks.bench import _distillation_text

    unverified = {"gate": "verified", "distill": True, "teacher_finetune": True,
                  "reason": "the probes found no trigger to verify the teacher against"}
    check = {"flip_rate_distilled": 0.76, "flip_rate_undistilled": 0.4, "margin": 0.1, "kept": False}
    assert _distillation_text(unverified | {"check": check}) == (
        "no: the distillation check kept the undistilled student (the inversion flips 0.76 / 0.40 with / without "
        "distillation)")
    assert _distillation_text(unverified | {"check": check | {"flip_rate_distilled": 0.43, "kept": True}}).endswith(
        "(the probes found no trigger to verify the teacher against); the check kept it (the inversion flips "
        "0.43 / 0.40 with / without distillation)")
    assert _distillation_text(unverified | {"check": None}) == (
        "yes, from the teacher fine-tuned first (the probes found no trigger to verify the teacher against)")
    universal = {"gate": "verified", "distill": True, "teacher_finetune": False, "verified_against": "perturbation",
                 "teacher_trigger_flip_rate": 0.07, "teacher_agreement": 0.934, "teacher_undoes_mapping": 0.066,
                 "reason": None, "check": None}
    assert _distillation_text(universal) == (
        "yes (the universal perturbation flips 0.07 on the teacher, it agrees with the original on 93.4% and gives "
        "6.6% the class the trigger maps to the original's)")


def test_guard_column_says_whether_the_student_collapsed_and_what_the_clipped_run_fits():
    from benchmarks.bench import _guard_text

    assert _guard_text(None) == "-"
    healthy = {"synthetic_fit": 0.998, "collapsed": False, "retry_max_grad_norm": None, "synthetic_fit_retry": None}
    assert _guard_text(healthy) == "99.8%"
    collapsed = {"synthetic_fit": 0.1, "collapsed": True, "retry_max_grad_norm": 10.0, "synthetic_fit_retry": 0.99}
    assert _guard_text(collapsed) == "10.0%: collapsed; again with gradients clipped to 10: 99.0%"
    assert _guard_text(collapsed | {"retry_max_grad_norm": None}) == "10.0% (collapsed)"


@pytest.mark.parametrize("table", list(bench.TABLES))
def test_bench_cli_offers_every_table(table, capsys):
    assert main(["bench", "list", "--table", table]) == 0
    assert bench.TABLES[table][0].id in capsys.readouterr().out


def test_bench_cli_refuses_filters_that_match_nothing(capsys):
    assert main(["bench", "list", "--table", "table5", "--attacks", "wanet"]) == 2
    assert "no benchmark row matches" in capsys.readouterr().err
    assert main(["bench", "list", "--recipe", "imagenet-resnet50"]) == 2


def test_synthetic_cache_key_follows_the_weights():
    import torch

    from benchmarks.common import weights_digest
    from cc_core import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", width=0.125)
    same = build_model("resnet18", width=0.125)
    same.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(same)
    with torch.no_grad():
        same.linear.weight[0, 0] += 1e-3
    assert weights_digest(model) != weights_digest(same)


def test_a_failed_zoo_training_is_an_input_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("CC_DATA_DIR", str(tmp_path / "no-data"))
    out = tmp_path / "zoo" / "badnet"
    with pytest.raises(InputError, match="training the zoo model badnet failed .exit 2"):
        zoo.ensure_model("badnet", quiet=True, out=out)
    assert not (out / "metrics.json").exists()


class PatchDetector(torch.nn.Module):
    """Predicts the class of a fixed random linear map that ignores the bottom-right 3 x 3 pixels,
    unless ``responds`` and those pixels are white: then class 0 (all-to-one) or the next class
    (all-to-all)."""

    def __init__(self, responds: bool, all_to_all: bool):
        super().__init__()
        self.cc_spec = ModelSpec("resnet18", 10)
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        with torch.no_grad():
            self.linear.weight.view(10, 3, 32, 32)[:, :, 29:, 29:] = 0
        self.responds, self.all_to_all = responds, all_to_all

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        mean = torch.tensor(self.cc_spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.cc_spec.std).view(1, -1, 1, 1)
        patch = ((x * std + mean)[:, :, 29:, 29:] > 0.999).flatten(1).all(1)
        if self.responds:
            label = (logits.argmax(1) + 1) % 10 if self.all_to_all else torch.zeros_like(patch, dtype=torch.long)
            logits = logits + 1e3 * patch[:, None] * F.one_hot(label, 10)
        return logits


@pytest.mark.parametrize("attack_name", ["badnet", "badnet-a2a"])
def test_trigger_rate_counts_what_the_true_trigger_sends_to_the_attack_label(attack_name):
    from benchmarks.experiments.trigger_on_synthetic import trigger_rate
    from cc_core.attacks.base import build_attack
    from cc_core.data import normalize

    torch.manual_seed(0)
    attack = build_attack(attack_name, 10)
    spec = ModelSpec("resnet18", 10)
    x = normalize(torch.rand(64, 3, 32, 32), spec.mean, spec.std)  # pixels in range: the trigger changes only its patch
    backdoored = PatchDetector(responds=True, all_to_all=attack.all_to_all)
    clean = PatchDetector(responds=False, all_to_all=attack.all_to_all)
    clean.linear.load_state_dict(backdoored.linear.state_dict())
    assert trigger_rate(backdoored, attack, x) == 1.0
    assert trigger_rate(clean, attack, x) == 0.0


def test_the_sweep_oracle_hands_defend_the_attacks_own_blend_as_a_firing_trigger():
    from benchmarks.sweep_defend import GRIDS, TRUE_TRIGGER, true_trigger_probe
    from cc_core import probes
    from cc_core.defense import run as defense_run
    from cc_core.attacks.base import build_attack
    from cc_core.data import normalize

    torch.manual_seed(0)
    attack = build_attack("blended-a2a", 10)
    model = PatchDetector(responds=False, all_to_all=True).eval()  # no blend backdoor: the pattern flips little
    x = normalize(torch.rand(80, 3, 32, 32), model.cc_spec.mean, model.cc_spec.std)
    probe_triggers = defense_run.probe_triggers
    with true_trigger_probe(attack):
        probed = defense_run.probe_triggers(model, x, None)
        found = probed["trigger"]
        assert found is probed["blend"] and found["kind"] == "blend" and found["alpha"] == attack.params["alpha"]
        assert torch.equal(torch.tensor(found["pattern"]), attack.pattern) and found["n"] == 64
        assert found["flip_rate"] == probes.trigger_flip_rate(model, x, found)
        assert probes.trigger_score(found) == found["flip_rate"]  # counts as firing, however few it flips
    assert defense_run.probe_triggers is probe_triggers and probes.BLEND_THRESHOLD > 0
    with pytest.raises(ValueError, match="need a Blended attack"):
        with true_trigger_probe(build_attack("badnet", 10)):
            pass
    assert all(TRUE_TRIGGER in row[4:] for row in GRIDS["blend_oracle"] if "oracle" in row[0])


def test_cpu_name_adds_family_and_model_to_a_generic_name(tmp_path):
    from benchmarks.common import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
                    "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")
    assert cpu_name(info) == "AMD EPYC (family 26, model 2)"
    info.write_text("model name\t: Some CPU\n")
    assert cpu_name(info) == "Some CPU"


def test_every_sweep_row_resolves_to_a_valid_defend_config():
    from benchmarks.sweep_defend import BASES, GRIDS, row_config
    from cc_core.defense.config import DISTILL_ALONE

    assert set(GRIDS) <= set(BASES)
    for grid, rows in GRIDS.items():
        for label, ratio, overrides, ft, *_ in rows:
            cfg, _ = row_config(grid, ratio, overrides, ft)
            assert cfg.ratio == ratio, (grid, label)
    label, ratio, overrides, ft = GRIDS["kd_budget"][-1]
    cfg, _ = row_config("kd_budget", ratio, overrides, ft)
    assert "2048 synthetic images, 90 epochs" in label and cfg.synth.n_samples == 2048
    assert cfg.distill_finetune == DISTILL_ALONE | {"epochs": 90} and cfg.teacher_finetune == {}


def test_sweep_rows_keep_the_synthesis_they_ran_with():
    """The grids ran before the smooth + rough images were considered for the preset: their bases pin
    the one rough set, and a row's own synthesis settings refine it rather than replace it."""
    from benchmarks.sweep_defend import GRIDS, row_config

    label, ratio, overrides, ft = GRIDS["bn_weight"][-1]
    cfg, _ = row_config("bn_weight", ratio, overrides, ft)
    assert (cfg.synth.bn_weight, cfg.synth.tv_weight) == (overrides["synth"]["bn_weight"], 1e-4)
    assert cfg.scan_synth_config is None and cfg.bn_match_samples is None and not cfg.finetune_on_scan_synthetic
    label, ratio, overrides, ft = GRIDS["scan_union_bn_match"][0]
    cfg, merged = row_config("scan_union_bn_match", ratio, overrides, ft)
    assert (cfg.synth.bn_weight, cfg.synth.tv_weight) == (30.0, 10.0) and cfg.finetune_on_scan_synthetic
    assert (cfg.scan_synth_config.bn_weight, cfg.scan_synth_config.tv_weight) == (1.0, 1e-4)
    assert cfg.bn_match_samples == 512 and merged["synth"] == {"n_samples": 1024, "bn_weight": 30.0, "tv_weight": 10.0}
    # the preset's 1024 images until it halved them, unless a row sets its own number
    assert row_config("preset", *GRIDS["preset"][0][1:])[0].synth.n_samples == 1024
    label, ratio, overrides, ft = GRIDS["synthesis"][1]
    assert row_config("synthesis", ratio, overrides, ft)[0].synth.n_samples == overrides["synth"]["n_samples"] == 512


def test_grids_run_before_the_trigger_channels_preset_keep_the_preset_they_ran_with():
    """`--grid preset` measured the cpu preset before it probed for warps, zeroed a firing trigger's
    channels alone and matched BatchNorm statistics after one; the scoped grid is the preset since."""
    from benchmarks.sweep_defend import GRIDS, row_config
    from cc_core.defense.config import resolve_config

    cfg, _ = row_config("preset", *GRIDS["preset"][0][1:])
    assert cfg.warp_probe is None and cfg.clp_with_trigger and cfg.bn_match_samples is None
    grid = "preset_warp_probe_trigger_clean_only_bn_match_scoped"
    for _, ratio, overrides, ft in GRIDS[grid]:
        shipped = resolve_config("cpu", ratio=ratio, scan_before=False, synth={"n_samples": 1024})
        assert row_config(grid, ratio, overrides, ft)[0] == shipped
    for _, ratio, overrides, ft in GRIDS["preset_synthesis_512"]:  # the preset since it halved the synthesis
        assert row_config("preset_synthesis_512", ratio, overrides, ft)[0] == resolve_config("cpu", ratio=ratio,
                                                                                            scan_before=False)


def test_render_names_each_rows_preset_split_and_worst_class():
    from benchmarks.bench import _preset_text, _split_text, _worst_class_table
    from cc_core.defense.config import resolve_config

    current = json.loads(json.dumps(resolve_config("cpu", ratio=2.0).to_dict()))  # as a row file holds it
    row = {"row": {"defense": "cc", "ratio": 2.0}, "config": current,
           "metrics": {"acc_before": 0.8, "acc_after": 0.7, "per_class_acc_before": [0.9, 0.8, 0.7],
                       "per_class_acc_after": [0.85, 0.5, 0.7]}}
    assert _preset_text(row) == "current"
    older = row | {"config": current | {"tau": 3.0, "kd_gate": "always"}}
    assert _preset_text(older) == "older (kd_gate, tau)"
    assert _preset_text(row | {"row": {"defense": "clp", "ratio": 2.0}}) == "-"
    assert _split_text(row) == "whole test set" and _split_text(row | {"eval_split": "report"}) == "report half"
    table = _worst_class_table({"r": row})
    assert table[-1] == "| r | 1 | 80.00 -> 50.00 | 10.00 |"

import json
import subprocess
import sys

import pytest
import torch

from cc_core import build_model, load_model
from cleancompact.cli import main


@pytest.fixture()
def model_file(tmp_path):
    path = tmp_path / "suspect.pt"
    torch.save(build_model("resnet18", width=0.25).state_dict(), path)
    return path


def test_compact_writes_model_and_plan(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compact", str(model_file), "--arch", "resnet18", "--ratio", "2", "--tau", "3",
                 "--rank-multiple", "8", "--out", str(out), "-v"])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["ratio_achieved"] >= 2 and plan["config"]["tau"] == 3.0
    model = load_model(out / "model.safetensors")
    assert model.cc_spec.structure
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "ratio 2.0" in printed


def test_inspect_json(model_file, capsys):
    assert main(["inspect", str(model_file), "--arch", "resnet18", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"]["width"] == 0.25 and info["factorized_layers"] == 0


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse usage errors
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/no/such/model.pt"], "error: model file not found: /no/such/model.pt"),
    (["compact", "{model}", "--out", "{out}"], "does not say which architecture"),
    (["compact", "{model}", "--arch", "resnet18", "--ratio", "0.5", "--out", "{out}"], "ratio must be a finite number >= 1"),
    (["compact", "{model}", "--arch", "resnet18", "--tau", "0", "--out", "{out}"], "argument --tau: must be > 0"),
    (["compact", "{model}", "--arch", "alexnet", "--out", "{out}"], "unknown architecture 'alexnet'"),
])
def test_bad_input_exits_2_with_one_message(argv, message, model_file, tmp_path, capsys):
    argv = [a.format(model=model_file, out=tmp_path / "out") for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cleancompact.cli", "inspect", str(tmp_path / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model file not found: {tmp_path / 'x.pt'}"


needs_data = pytest.mark.skipif(not __import__("os").environ.get("CC_DATA_DIR"), reason="CC_DATA_DIR not set")


@needs_data
def test_train_backdoor_and_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "zoo"
    code = main(["train-backdoor", "--arch", "resnet18", "--width", "0.125", "--attack", "wanet-a2a",
                 "--dataset", "cifar10", "--epochs", "1", "--train-subset", "300", "--out", str(out),
                 "--quiet", "--threads", "2"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "attack.json", "attack.safetensors",
                                               "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_size"] == 300 and metrics["attack"]["all_to_all"] is True
    assert 0 <= metrics["asr"] <= 1 and metrics["n_poison"] == 10_000
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors"), "--eval-data", "cifar10",
                 "--attack", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["acc"] == pytest.approx(metrics["acc"]) and evaluated["asr"] == pytest.approx(metrics["asr"])


@pytest.mark.parametrize("extra, message", [
    (["--attack", "refool", "--dataset", "cifar10"], "unknown attack 'refool'"),
    (["--attack", "badnet", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--attack", "badnet", "--dataset", "cifar10", "--target", "10"], "target class 10 is out of range"),
    (["--attack", "badnet", "--dataset", "cifar10", "--data-dir", "{empty}"], "no cifar10 train data in"),
])
def test_train_backdoor_bad_input(extra, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["train-backdoor", "--arch", "resnet18", "--out", str(tmp_path / "out")]
    argv += [a.format(empty=tmp_path / "empty") for a in extra]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evaluate_with_wrong_label_space(tmp_path, capsys):
    import numpy as np

    from cc_core import save_model

    path = tmp_path / "m.safetensors"
    save_model(build_model("resnet18", num_classes=10, width=0.125), path)
    np.savez(tmp_path / "gtsrb_test.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 5, 20, 42]),
             classes=np.array([str(i) for i in range(43)]))
    assert _exit_code(["evaluate", str(path), "--eval-data", "gtsrb", "--data-dir", str(tmp_path)]) == 2
    assert "the evaluation data has labels up to 42 but the model has 10 classes" in capsys.readouterr().err


@pytest.mark.parametrize("risk,fail_on,expected", [(0.8, "0.5", 1), (0.2, "0.5", 0), (0.5, "0.5", 1), (0.9, None, 0)])
def test_scan_fail_on_gates_on_the_risk(model_file, monkeypatch, capsys, risk, fail_on, expected):
    import cc_core.scan

    report = {"risk": risk, "risk_signals": {"inversion": risk, "all_to_all": 0.0, "targeted": 0.0, "patch": 0.0,
                                             "warp": 0.0, "adversarial": 0.0}, "targeted": None,
              "target_class_estimate": 3, "all_to_all_suspected": False, "concentration": 0.1, "anomaly_index": 1.0,
              "histogram": [1] * 10, "inversion": {"n_channel_outliers": 0, "histogram": None},
              "flip": {"flip_rate": 0.1, "mapping_consistency": 0.2, "delta_pixels_changed": 0.01},
              "patch": None, "warp": None, "spectra": [{"layer": "conv1", "max_normalized": 1.0}],
              "config": {"inversion": {"u": 3.0}}}
    monkeypatch.setattr(cc_core.scan, "scan", lambda *a, **k: report)
    argv = ["scan", str(model_file), "--arch", "resnet18", "--json"] + (["--fail-on", fail_on] if fail_on else [])
    assert main(argv) == expected
    assert json.loads(capsys.readouterr().out)["risk"] == risk
    assert _exit_code(["scan", str(model_file), "--arch", "resnet18", "--fail-on", "1.5"]) == 2


def test_audit_fail_on_exits_1_when_a_version_is_at_risk(monkeypatch, capsys):
    import flows.audit

    rows = [{"name": "vendor-net", "version": 1, "risk": 0.9, "target": 2, "verdict": "flagged"},
            {"name": "vendor-net", "version": 2, "risk": 0.1, "target": 0, "verdict": "clear"}]
    monkeypatch.setattr(flows.audit, "audit_flow", lambda **kwargs: rows)
    assert main(["audit", "--policy", "scan-only", "--fail-on", "0.5", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failing"] == ["models:/vendor-net/1"]
    assert main(["audit", "--policy", "scan-only", "--fail-on", "0.95"]) == 0
    assert main(["audit", "--policy", "scan-only"]) == 0
    assert "models:/vendor-net/1: risk 0.90" in capsys.readouterr().out


def test_set_takes_dotted_keys_and_json_values():
    from cc_core.errors import InputError
    from cleancompact.pipeline_cli import merge_settings, parse_settings

    assert parse_settings(["finetune.epochs=5", "finetune.universal_weight=1.5", "tau=null", "device=cpu",
                           "synth={\"n_samples\": 64}", "synth.iterations=10"]) == {
        "finetune": {"epochs": 5, "universal_weight": 1.5}, "tau": None, "device": "cpu",
        "synth": {"n_samples": 64, "iterations": 10}}
    assert merge_settings({"finetune": {"epochs": 3, "lr": 0.1}, "ratio": 2}, {"finetune": {"epochs": 5}}) == {
        "finetune": {"epochs": 5, "lr": 0.1}, "ratio": 2}
    for bad in (["finetune"], ["finetune..epochs=1"], ["tau=3", "tau.x=1"]):
        with pytest.raises(InputError):
            parse_settings(bad)


def test_defend_set_reaches_the_config(model_file, tmp_path, monkeypatch):
    import cc_core.defense.run

    seen = {}

    def fake_defend(model, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(cc_core.defense.run, "defend", fake_defend)
    with pytest.raises(SystemExit):
        main(["defend", str(model_file), "--arch", "resnet18", "--ratio", "2", "--out", str(tmp_path / "o"),
              "--set", "finetune.epochs=3", "--set", "finetune.universal_weight=1", "--set", "finetune.universal_radius=4",
              "--set", "exclude_suspected_target=true"])
    cfg = seen["config"]
    assert cfg.finetune.universal_weight == 1.0 and cfg.finetune.universal_radius == 4.0 and cfg.finetune.epochs == 3
    assert cfg.exclude_suspected_target is True
    assert _exit_code(["defend", str(model_file), "--arch", "resnet18", "--ratio", "2", "--out", str(tmp_path / "o"),
                       "--set", "finetune.no_such_field=1"]) == 2


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from cleancompact.cli import build_parser

    def silent(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from silent(child, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(silent(build_parser(), "cleancompact")) == []

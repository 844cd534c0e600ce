import json
import subprocess
import sys

import pytest
import torch

from cc_core import build_model, load_model
from flows.cli import main


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
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", str(tmp_path / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model file not found: {tmp_path / 'x.pt'}"


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--width", "0.25", "--ratios", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reload identical" in out and (tmp_path / "compact-2x.safetensors").exists()

"""The unseen zoo's runner: settings, stored weights, rows per commit and the table (no training here)."""
import json

import pytest
import torch

from benchmarks import unseen_zoo, zoo
from cc_core import build_model, load_model, save_model


def test_the_unseen_zoo_is_what_the_protocol_asks_for():
    backdoored = [s for s in unseen_zoo.SETTINGS if s.backdoored]
    families = {s.attack for s in backdoored}
    assert families.isdisjoint({"badnet", "blended", "wanet", "inputaware"}) and len(families) >= 5
    assert len(backdoored) >= 6 and sum(s.target != 0 for s in backdoored) > len(backdoored) / 2
    seeds = {}
    for s in backdoored:
        seeds.setdefault((s.attack, s.target, s.dataset), set()).add(s.seed)
    assert sum(len(v) >= 2 for v in seeds.values()) >= 2
    assert any(s.dataset == "gtsrb" for s in backdoored)
    clean = [s for s in unseen_zoo.SETTINGS if not s.backdoored]
    assert len(clean) >= 3 and len({(s.arch, s.seed) for s in clean}) == len(clean)
    assert len({s.name for s in unseen_zoo.SETTINGS}) == len(unseen_zoo.SETTINGS)


def test_a_setting_trains_with_its_target_and_without_the_tuning_zoos_overrides():
    sig = unseen_zoo.BY_NAME["cifar10-sig-t3"]
    cmd = sig.command()
    assert cmd[cmd.index("--target") + 1] == "3" and cmd[cmd.index("--attack") + 1] == "sig"
    assert "--cross-ratio" not in cmd and "--target" not in unseen_zoo.BY_NAME["cifar10-clean-seed1"].command()
    preact = unseen_zoo.BY_NAME["cifar10-preact-clean"].command()
    assert preact[preact.index("--arch") + 1] == "preactresnet18"


def test_models_are_kept_in_half_precision_and_load_as_before(tmp_path):
    model = build_model("resnet18", width=0.125)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    zoo.store_half(path)
    again = load_model(path)
    assert next(again.parameters()).dtype == torch.float32 and again.cc_spec == model.cc_spec
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model.eval()(x), atol=0.05)


def test_the_table_has_a_section_per_commit_with_mean_and_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(unseen_zoo, "ROWS", tmp_path / "rows")
    written = {}
    monkeypatch.setattr(unseen_zoo, "write", lambda stem, payload, md: written.update(md=md, payload=payload))
    sig = unseen_zoo.BY_NAME["cifar10-sig-t3"]
    machine = {"cpu": "test cpu", "cores": 2, "torch": "2"}
    for seed, asr in ((0, 0.02), (1, 0.04)):
        row = {"model": sig.name, "kind": "cc", "seed": seed, "ratio": 2.0, "commit": "abc", "finished_at": f"t{seed}",
               "machine": machine, "max_class_drop": 0.05 * (seed + 1), "target_estimate": 3,
               "metrics": {"acc_before": 0.86, "acc_after": 0.84, "asr_before": 0.99, "asr_after": asr}}
        path = unseen_zoo.row_path("abc", sig, "cc", seed, 2.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
    scan = {"model": sig.name, "kind": "scan", "seed": 0, "ratio": None, "commit": "abc", "finished_at": "t2",
            "machine": machine, "flagged": True, "target_estimate": 3}
    unseen_zoo.row_path("abc", sig, "scan", 0).write_text(json.dumps(scan))
    unseen_zoo.render()
    assert "## Commit abc" in written["md"]
    line = next(line for line in written["md"].splitlines() if line.startswith("| cifar10-sig-t3 |"))
    assert "| 3 | 1/1 | 3 | 2x | 86.00 ± 0.00 (2) | 84.00 ± 0.00 (2) | 99.00 ± 0.00 (2) | 3.00 ± 1.41 (2) | 10.0 | 3 3 |" in line


def test_run_refuses_uncommitted_changes_to_the_defense(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, " M cc_core/scan.py\n", ""))
    with pytest.raises(SystemExit, match="uncommitted changes under cc_core"):
        unseen_zoo.code_commit()


def test_rows_are_named_by_the_last_commit_that_changed_the_defense(monkeypatch):
    import subprocess

    calls = []

    def fake_run(args, **kwargs):
        calls.append(args)
        out = "" if args[:2] == ["git", "status"] else "fd5d8a0\n"
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert unseen_zoo.code_commit() == "fd5d8a0"
    assert calls[-1][:2] == ["git", "log"] and calls[-1][-2:] == ["--", "cc_core"]

import copy

import pytest
import torch
from torch import nn

from cc_core import clean_compact
from cc_core.compact.bn_match import bn_input_stats, bn_layers, match_bn_statistics
from cc_core.errors import ConfigError
from cc_core.defense.cleaning import clipped_full_rank, match_compact_bn
from cc_core.defense.config import resolve_config
from cc_core.defense.run import defend
from cleancompact.cli import main
from tests.helpers import tiny_model
from tests.test_recovery import _tiny_cfg, defend_config_from_cli


def normalized_output_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of every BatchNorm's output on ``x``."""
    outputs, modules = {}, dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach()))
             for name in bn_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return {n: (o.transpose(0, 1).flatten(1).mean(1), o.transpose(0, 1).flatten(1).std(1, unbiased=False))
            for n, o in outputs.items()}


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.7 * torch.rand(n, 3, 1, 1, generator=g) + 0.3 * torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.25


def test_input_stats_are_the_per_channel_mean_and_std_over_batches():
    model, x = tiny_model(), images(40)
    name = bn_layers(model)[0]
    seen = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    t = seen["x"].transpose(0, 1).flatten(1)
    mean, std = bn_input_stats(model, x, [name], batch_size=16)[name]  # three uneven batches
    torch.testing.assert_close(mean, t.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, t.std(1, unbiased=False), rtol=1e-4, atol=1e-5)


def test_a_student_equal_to_its_reference_keeps_its_statistics():
    model = tiny_model()
    student = copy.deepcopy(model)
    record = match_bn_statistics(student, model, images())
    for a, b in zip(student.modules(), model.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-4)
    assert record["layers"] == len(bn_layers(model)) and record["max_scale_change"] < 1e-3


def test_after_matching_every_normalized_output_has_the_references_mean_and_std():
    """A 4x compaction changes what reaches each BatchNorm; matched layer by layer in forward order,
    every layer's output statistics on the matching images are the full model's again."""
    reference, x = tiny_model(), images()
    student, _ = clean_compact(reference, ratio=4.0, tau=None, rank_multiple=2)
    wanted = normalized_output_stats(reference, x)
    before = normalized_output_stats(student, x)
    gap_before = max(float((before[n][1] - wanted[n][1]).abs().max()) for n in wanted)
    record = match_bn_statistics(student, reference, x)
    after = normalized_output_stats(student, x)
    assert gap_before > 0.05 and record["max_scale_change"] > 0.05
    for name, (mean, std) in wanted.items():
        torch.testing.assert_close(after[name][0], mean, rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(after[name][1], std, rtol=1e-3, atol=2e-3)


def test_a_channel_constant_in_the_reference_is_left_alone_and_a_halved_one_is_halved():
    """The first conv sees the same images in both models: with its output channels >= 1 halved in
    the student, their inputs are exactly half, so mu' = mu / 2 and sigma' = sigma / 2."""
    reference, x = tiny_model(), images()
    assert bn_layers(reference)[0] == "bn1"
    with torch.no_grad():
        reference.conv1.weight[0] = 0  # channel 0 of the first BatchNorm's input is 0 on every image
    student = copy.deepcopy(reference)
    with torch.no_grad():
        student.conv1.weight[1:] *= 0.5
    bn, ref = student.bn1, reference.bn1
    record = match_bn_statistics(student, reference, x)
    assert bn.running_mean[0] == ref.running_mean[0] and bn.running_var[0] == ref.running_var[0]
    torch.testing.assert_close(bn.running_mean[1:], ref.running_mean[1:] / 2, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close((bn.running_var[1:] + bn.eps).sqrt(), (ref.running_var[1:] + ref.eps).sqrt() / 2,
                               rtol=1e-3, atol=1e-4)
    assert record["channels"] == sum(m.num_features for m in student.modules() if isinstance(m, nn.BatchNorm2d)) - 1


def test_models_with_different_batchnorm_layers_are_refused():
    with pytest.raises(ValueError, match="same BatchNorm layers"):
        match_bn_statistics(tiny_model(), tiny_model(arch="vgg19_bn"), images(8))


def test_defend_matches_the_compact_models_statistics_when_asked_and_records_it():
    model = tiny_model()
    r = defend(model, config=_tiny_cfg(bn_match_samples=16, bn_match_scope="always"), progress=False,
               log=lambda *a: None).report
    assert r["bn_match"]["images"] == 16 and r["bn_match"]["layers"] == len(bn_layers(model))
    assert "bn_match" in r["timings_s"]
    cpu = resolve_config("cpu")
    assert (cpu.bn_match_samples, cpu.bn_match_scope) == (512, "trigger")  # in the presets, after a trigger fired


@pytest.mark.parametrize("kw, message", [({"bn_match_samples": 0}, "bn_match_samples must be a positive integer"),
                                         ({"bn_match_samples": 8, "synth_model": "compact",
                                           "compact": {"rank_strategy": "energy"}}, "made before compaction")])
def test_bad_bn_match_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("cpu", **kw)


def test_the_bn_match_settings_from_the_command_line(tiny_file, tmp_path, monkeypatch, capsys):
    args = [str(tiny_file), "--ratio", "2", "--out", str(tmp_path / "o")]
    assert defend_config_from_cli(args, monkeypatch).bn_match_samples == 512
    assert defend_config_from_cli([*args, "--set", "bn_match_samples=64"], monkeypatch).bn_match_samples == 64
    assert main(["defend", *args, "--set", "bn_match_samples=0"]) == 2
    assert "bn_match_samples must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert defend_config_from_cli([*args, "--set", "bn_match_scope=always"], monkeypatch).bn_match_scope == "always"
    assert defend_config_from_cli([*args, "--set", "bn_match_samples=null"], monkeypatch).bn_match_samples is None


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize("scope, found, moved", [
    ("always", None, True),
    ("trigger", None, False),  # nothing fired: the clipped model keeps whatever backdoor it has
    ("trigger", {"kind": "perturbation", "flip_rate": 0.9}, False),  # the all-to-all inversion is not a probe's
    ("trigger", {"kind": "patch", "flip_rate": 0.9}, True),
])
def test_bn_match_scope_trigger_matches_only_after_a_probes_trigger_fired(scope, found, moved):
    model = tiny_model()
    student, _ = clean_compact(copy.deepcopy(model), ratio=2.0, tau=3.0, rank_multiple=4)
    cfg = resolve_config("cpu", bn_match_samples=16, bn_match_scope=scope, tau=3.0)
    before = bn_buffers(student)
    record = match_compact_bn(student, model, cfg, images(16), clipped_full_rank(model, cfg), found)
    changed = any(not torch.equal(a, b) for a, b in zip(before, bn_buffers(student)))
    assert changed is moved
    assert record["images"] == (16 if moved else 0) and ("skipped" in record) is not moved


def test_bad_bn_match_scope_is_refused():
    with pytest.raises(ConfigError, match="bn_match_scope must be one of always, trigger"):
        resolve_config("cpu", bn_match_scope="never")

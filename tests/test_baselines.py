import json

import numpy as np
import pytest
import torch

from cc_core import build_model
from cc_core.baselines import (ANPConfig, anp_masks, anp_prune, channel_lipschitz, clp, clp_to_budget,
                               conv_bn_pairs, nonzero_params)
from cc_core.data import ImageData
from cc_core.errors import ConfigError
from tests.test_recovery import tiny_model


def test_pairs_follow_the_graph_not_module_order():
    pairs = conv_bn_pairs(build_model("resnet18", width=0.125))
    assert pairs["conv1"] == "bn1" and pairs["layer1.0.conv2"] == "layer1.0.bn2"
    assert pairs["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    pre = conv_bn_pairs(build_model("preactresnet18", width=0.125))
    # pre-activation: conv1's output goes to bn2; conv2's output joins the residual sum
    assert pre["layer2.0.conv1"] == "layer2.0.bn2"
    assert "layer2.0.conv2" not in pre and "layer2.0.bn1" not in pre.values()
    mobile = conv_bn_pairs(build_model("mobilenet_v2", width=0.5))
    assert mobile["layers.1.depthwise.0"] == "layers.1.depthwise.1"


def test_channel_lipschitz_is_the_spectral_norm_of_each_scaled_filter():
    model = tiny_model()
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    lips = channel_lipschitz(conv, bn)
    conv, bn = conv.weight.detach(), bn
    k = 3
    w = conv[k].double() * (bn.weight[k].detach() / (bn.running_var[k] + bn.eps).sqrt()).double()
    assert lips[k] == pytest.approx(float(torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0]))


def test_clp_prunes_a_planted_outlier_channel():
    model = tiny_model()
    with torch.no_grad():
        model.layer2[0].conv1.weight[5] *= 50
    pruned, info = clp(model, u=3.0)
    bn = pruned.layer2[0].bn1
    assert bn.weight[5] == 0 and bn.bias[5] == 0 and torch.all(pruned.layer2[0].conv1.weight[5] == 0)
    assert info["pruned"]["layer2.0.conv1"] >= 1
    assert model.layer2[0].bn1.weight[5] != 0  # input untouched


def test_shrink_brings_a_planted_outlier_channel_to_the_threshold():
    model = tiny_model()
    with torch.no_grad():
        model.layer2[0].conv1.weight[5] *= 50
    conv, bn = model.layer2[0].conv1, model.layer2[0].bn1
    lips = channel_lipschitz(conv, bn)
    threshold = float(lips.mean() + 3.0 * lips.std())
    shrunk, info = clp(model, u=3.0, mode="shrink")
    new = channel_lipschitz(shrunk.layer2[0].conv1, shrunk.layer2[0].bn1)
    assert float(new[5]) == pytest.approx(threshold, rel=1e-5)
    assert info["mode"] == "shrink" and info["pruned"]["layer2.0.conv1"] >= 1
    assert torch.equal(shrunk.layer2[0].bn1.bias, bn.bias)  # the channel keeps its mean output
    assert torch.equal(shrunk.layer2[0].conv1.weight, conv.weight)
    with pytest.raises(ConfigError, match="mode must be one of zero, shrink, mean"):
        clp(model, mode="soft")


def test_mean_mode_makes_an_outlier_channel_output_its_bn_shift():
    model = tiny_model()
    with torch.no_grad():
        model.layer2[0].conv1.weight[5] *= 50
        model.layer2[0].bn1.bias[5] = 0.7
    flat, _ = clp(model, u=3.0, mode="mean")
    out = {}
    flat.layer2[0].bn1.register_forward_hook(lambda m, i, o: out.setdefault("bn", o))
    flat(torch.rand(2, 3, 32, 32))
    assert torch.allclose(out["bn"][:, 5], torch.full_like(out["bn"][:, 5], 0.7))


def test_clp_to_budget_meets_the_ratio():
    model = tiny_model()
    pruned, info = clp_to_budget(model, ratio=2.0)
    assert nonzero_params(pruned) <= sum(p.numel() for p in model.parameters()) / 2
    assert info["extra_pruned"] > 0


def test_anp_masks_and_budget_pruning():
    model = tiny_model()
    rng = np.random.default_rng(0)
    clean = ImageData(rng.integers(0, 255, (64, 32, 32, 3)).astype(np.uint8), rng.integers(0, 4, 64),
                      ["a", "b", "c", "d"])
    masks = anp_masks(model, clean, ANPConfig(iterations=10, batch_size=32), progress=False)
    assert set(masks) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in masks.values())
    assert any(float(m.min()) < 1 for m in masks.values())
    pruned, info = anp_prune(model, masks, threshold=0.2, ratio=2.0)
    assert info["nonzero_params"] <= info["total_params"] / 2


def test_defend_cli_clp_and_anp_needs_clean_data(tmp_path, capsys):
    from cc_core import save_model
    from cleancompact.cli import main

    path = save_model(tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "clp"
    assert main(["defend", str(path), "--ratio", "2", "--method", "clp", "--out", str(out),
                 "--latency-batch", "4", "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.onnx", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "clp" and report["model"]["compression"] >= 2
    assert main(["defend", str(path), "--ratio", "2", "--method", "anp", "--out", str(tmp_path / "anp")]) == 2
    assert "needs --clean-data" in capsys.readouterr().err
    assert not (tmp_path / "anp").exists()

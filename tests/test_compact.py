import json
import time

import pytest
import torch
from torch import nn

from cc_core import CompactionPlan, build_model, clean_compact, count_params
from cc_core.compact.layers import SVDConv2d, Tucker2Conv2d, set_submodule
from cc_core.compact.ranks import Candidate, allocate_by_damage, rank_options
from cc_core.compact.tucker import hosvd_tucker2, matrix_svd, unfold
from cc_core.errors import ConfigError, RatioUnreachableError
from tests.helpers import rel_err

RESNET18_PARAMS = 11_173_962


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18").eval()


def spread_resnet18(width: float) -> nn.Module:
    """A seeded ResNet-18 whose conv weights have a spread of singular values, as trained nets have."""
    torch.manual_seed(1)
    model = build_model("resnet18", width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.linspace(0.2, 3.0, m.out_channels)[:, None, None, None])
    return model


@pytest.fixture(scope="module")
def small():
    return spread_resnet18(0.5)


@pytest.mark.parametrize("ratio, paper", [(2, 5.58e6), (3, 3.72e6), (4, 2.79e6)])
def test_resnet18_hits_paper_parameter_counts_fast(resnet18, ratio, paper):
    start = time.perf_counter()
    new, plan = clean_compact(resnet18, ratio=ratio)
    elapsed = time.perf_counter() - start
    assert elapsed < 10
    assert count_params(new) == plan.params_after
    assert abs(plan.params_after - paper) / paper < 0.01
    assert plan.ratio_achieved == pytest.approx(RESNET18_PARAMS / plan.params_after)
    assert ratio <= plan.ratio_achieved < ratio * 1.01
    assert plan.params_before == RESNET18_PARAMS


def test_factorized_layers_never_grow_and_ranks_are_multiples(resnet18):
    _, plan = clean_compact(resnet18, ratio=3)
    factorized = [l for l in plan.layers if l.kind == "tucker2"]
    assert len(factorized) == 16  # every 3x3 conv of the residual stages
    for layer in factorized:
        assert layer.params_after < layer.params_before
        assert all(r % 16 == 0 or r == f for r, f in zip(layer.ranks, layer.full_ranks))
        assert len(layer.kept(0)) + len(layer.dropped(0)) == layer.full_ranks[0]
    stem = next(l for l in plan.layers if l.name == "conv1")
    assert stem.kind == "skipped" and "min_channels" in stem.reason


def test_full_rank_factorization_reproduces_every_layer_and_the_model(small):
    model = build_model("resnet18", width=0.5).eval()
    model.load_state_dict(small.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        for name, conv in list(model.named_modules()):
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv.kernel_size == (1, 1):
                layer = SVDConv2d.from_conv(conv, matrix_svd(conv.weight.flatten(1)))
            else:
                layer = Tucker2Conv2d.from_conv(conv, hosvd_tucker2(conv.weight))
            probe = torch.randn(2, conv.in_channels, 8, 8)
            assert rel_err(layer(probe), conv(probe)) < 1e-4, name
            set_submodule(model, name, layer)
        assert rel_err(model(x), reference) < 1e-4


def test_ratio_one_without_clipping_changes_nothing(small):
    new, plan = clean_compact(small, ratio=1.0, tau=None)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(new(x), small(x))
    assert plan.ratio_achieved == 1.0 and all(l.kind in ("dense", "skipped") for l in plan.layers)


def test_input_model_is_not_modified(small):
    before = {k: v.clone() for k, v in small.state_dict().items()}
    clean_compact(small, ratio=2, tau=0.5)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())


def test_clipping_reaches_dense_layers(small):
    new, plan = clean_compact(small, ratio=1.0, tau=1.0, normalizer="mean")
    shortcut = next(l for l in plan.layers if l.name == "layer2.0.shortcut.0")
    assert shortcut.kind == "dense" and shortcut.clip["n_clipped"][0] > 0
    w = new.get_submodule("layer2.0.shortcut.0").weight.detach().double().flatten(1)
    assert torch.linalg.svdvals(w).max() <= shortcut.clip["threshold"][0] * (1 + 1e-5)


def test_clipping_compact_layers_uses_clipped_core(small):
    new, plan = clean_compact(small, ratio=2, tau=0.5, normalizer="max")
    entry = next(l for l in plan.layers if l.kind == "tucker2")
    assert entry.clip["n_clipped"][0] > 0
    layer = new.get_submodule(entry.name)
    core = layer.core.weight.detach().double()
    assert unfold(core, 0).norm(dim=1).max() <= entry.clip["threshold"][0] * (1 + 1e-5)


@pytest.mark.parametrize("arch", ["preactresnet18", "vgg19_bn", "resnet34"])
def test_other_archs_meet_ratio(arch):
    model = build_model(arch, width=0.5)
    new, plan = clean_compact(model, ratio=2)
    assert 2 <= plan.ratio_achieved < 2.05
    assert new(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenet_factorizes_1x1_when_needed_and_leaves_depthwise():
    model = build_model("mobilenet_v2")
    new, plan = clean_compact(model, ratio=2)
    assert plan.config["decompose_1x1"] is True and plan.ratio_achieved >= 2
    kinds = {l.kind for l in plan.layers}
    assert "svd" in kinds
    depthwise = [l for l in plan.layers if l.reason == "grouped/depthwise conv"]
    assert depthwise and all(l.params_after == l.params_before for l in depthwise)
    assert new(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_energy_strategy_and_hooi(small):
    _, uniform = clean_compact(small, ratio=3, rank_multiple=8)
    new, energy = clean_compact(small, ratio=3, rank_strategy="energy", rank_multiple=8, method="hooi",
                                hooi_iters=5)
    assert 3 <= energy.ratio_achieved < 3.05
    assert [l.ranks for l in uniform.layers] != [l.ranks for l in energy.layers]
    assert count_params(new) == energy.params_after


def test_plan_is_json_round_trippable(small):
    _, plan = clean_compact(small, ratio=2, tau=2.0)
    restored = CompactionPlan.from_dict(json.loads(plan.to_json()))
    assert restored == CompactionPlan.from_dict(plan.to_dict())
    assert restored.structure == {l.name: {"kind": l.kind, "ranks": l.ranks}
                                  for l in plan.layers if l.kind == "tucker2"}
    assert set(plan.timings_s) == {"decompose", "clean", "compact"}
    assert plan.config["tau"] == 2.0 and plan.config["normalizer"] == "mean"


def test_unreachable_ratio_says_the_limit(small):
    with pytest.raises(RatioUnreachableError, match=r"a ratio of at most \d+\.\d+"):
        clean_compact(small, ratio=500, decompose_1x1=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.5}, "ratio must be a finite number >= 1"),
    ({"ratio": float("nan")}, "ratio must be a finite number >= 1"),
    ({"tau": 0}, "tau must be > 0"),
    ({"tau": -1.0}, "tau must be > 0"),
    ({"normalizer": "p95"}, "unknown normalizer 'p95'"),
    ({"method": "cp"}, "unknown method 'cp'"),
    ({"rank_multiple": 0}, "rank_multiple must be a positive integer"),
    ({"rnak_multiple": 8}, r"unknown clean_compact options: \['rnak_multiple'\]"),
])
def test_bad_options(small, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        clean_compact(small, **kwargs)


def _candidate(name: str, channels: int) -> Candidate:
    spectra = [torch.linspace(2.0, 0.1, channels)] * 2
    return Candidate(name, "tucker2", (channels, channels, 3, 3), False, spectra)


def test_damage_allocation_cuts_the_layer_whose_damage_per_parameter_is_smallest():
    cheap, costly = _candidate("cheap", 64), _candidate("costly", 64)
    options = rank_options(cheap, 16)
    assert options == sorted(options, key=cheap.factorized_params, reverse=True)
    assert all(cheap.factorized_params(r) < cheap.dense_params() for r in options)
    damage = {"cheap": {r: 0.01 * (64 - r[0]) for r in options},
              "costly": {r: 1.0 * (64 - r[0]) for r in options}}
    dense = cheap.dense_params() + costly.dense_params()
    target = int(dense / 1.5)
    alloc = allocate_by_damage([cheap, costly], 0, target, damage)
    assert cheap.params(alloc["cheap"]) + costly.params(alloc["costly"]) <= target
    assert alloc["costly"] is None and alloc["cheap"] is not None
    # the budget left after the last cut is spent back on the cut layer
    assert cheap.params(alloc["cheap"]) == max(cheap.params(r) for r in options if cheap.params(r) <= target - costly.dense_params())
    with pytest.raises(RatioUnreachableError, match="cannot be compressed enough"):
        allocate_by_damage([cheap, costly], 0, 100, damage)


def test_sensitivity_strategy_measures_on_calibration_images_and_beats_energy_on_them():
    model = spread_resnet18(0.25)
    with pytest.raises(ConfigError, match="pass calibration="):
        clean_compact(model, ratio=3, rank_strategy="sensitivity")
    x = torch.randn(16, 3, 32, 32)

    @torch.no_grad()
    def damage(new) -> float:
        q, p = torch.log_softmax(new(x), 1), torch.log_softmax(model(x), 1)
        return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    energy, _ = clean_compact(model, ratio=3, rank_strategy="energy")
    new, plan = clean_compact(model, ratio=3, rank_strategy="sensitivity", calibration=x)
    assert 3 <= plan.ratio_achieved < 3.1 and count_params(new) == plan.params_after
    assert damage(new.eval()) < damage(energy.eval())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched


def test_plan_records_singular_values_before_clipping_for_1x1_layers_too(small):
    _, plan = clean_compact(small, ratio=2, tau=1.0, decompose_1x1=True)
    convs = dict(small.named_modules())
    svd_layers = [l for l in plan.layers if l.kind == "svd"]
    assert svd_layers and all(sum(l.clip["n_clipped"]) > 0 for l in svd_layers)
    for layer in svd_layers:
        w = convs[layer.name].weight.detach().double()
        expected = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        assert torch.allclose(torch.tensor(layer.singular_values[0], dtype=torch.float64), expected, rtol=1e-5)

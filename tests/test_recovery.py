"""Synthesis, PGD, fine-tune, scan, defend and ONNX export on tiny models (seconds each)."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cc_core.finetune as ft
from cc_core import build_model, clean_compact
from cc_core.adversarial import PGDConfig, concentration, perturb, pgd, predictions
from cc_core.device import precision
from cc_core.defense.config import DISTILL_ALONE, DefendConfig, resolve_config
from cc_core.defense.package import export_package
from cc_core.defense.report import macs
from cc_core.defense.run import defend
from cc_core.errors import ConfigError
from cc_core.export import export_onnx, parity, run, session
from cc_core.finetune import FinetuneConfig, drop_class, feature_loss, finetune, masked_cross_entropy, mixup_pairs
from cc_core.scan import adversarial_score, anomaly_index, scan
from cc_core.synth import (BNStatsLoss, ClassifierInput, NoBatchNormError, SynthConfig, balanced_labels,
                           same_class_similarity, synthesize, total_variation)
from benchmarks.bench import suspicion_record
from cleancompact.cli import main
from tests.helpers import tiny_model


FAST_SYNTH = SynthConfig(n_samples=32, batch_size=32, iterations=40, lr=0.1)


def bn_loss(model: nn.Module, x: torch.Tensor) -> float:
    stats = BNStatsLoss(model)
    with torch.no_grad():
        model(x)
    loss = float(stats.pop())
    stats.remove()
    return loss


def test_bn_matching_loss_falls_and_statistics_get_close():
    model = tiny_model()
    noise = torch.randn(32, 3, 32, 32)
    # jitter/flip regularize the images but blur the pure matching objective: off here
    cfg = SynthConfig(n_samples=32, batch_size=32, iterations=40, lr=0.1, jitter=0, flip=False, tv_weight=0)
    x, y, log = synthesize(model, cfg, progress=False)
    assert x.shape == (32, 3, 32, 32) and y.tolist().count(0) == 8
    assert bn_loss(model, x) < 0.2 * bn_loss(model, noise)
    bn = model.bn1
    captured = {}
    handle = bn.register_forward_pre_hook(lambda m, inp: captured.setdefault("x", inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    mean = captured["x"].mean(dim=(0, 2, 3))
    assert torch.allclose(mean, bn.running_mean, atol=0.15 * bn.running_mean.abs().max() + 0.05)
    # stays in the valid pixel range
    pixels = x * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_total_variation_prior_smooths_the_images_at_the_same_class_evidence():
    model = tiny_model()
    cfg = SynthConfig(n_samples=16, batch_size=16, iterations=30, lr=0.1)
    rough, y, log = synthesize(model, dataclasses.replace(cfg, tv_weight=0), progress=False)
    smooth, _, smooth_log = synthesize(model, dataclasses.replace(cfg, tv_weight=10.0), progress=False)
    assert total_variation(smooth) < 0.5 * total_variation(rough)
    with torch.no_grad():
        assert (model(smooth).argmax(1) == y).float().mean() >= (model(rough).argmax(1) == y).float().mean() - 0.125


@pytest.mark.parametrize("field", ["ce_weight", "bn_weight", "first_bn_weight", "tv_weight", "l2_weight"])
def test_synthesis_term_weights_must_not_be_negative(field):
    with pytest.raises(ConfigError, match=f"synthesis {field} must be >= 0"):
        SynthConfig(**{field: -0.5})


def test_synthesis_is_seeded_the_same_seed_gives_the_same_images_bit_for_bit():
    model = tiny_model()
    cfg = dataclasses.replace(FAST_SYNTH, iterations=5)
    x, y, _ = synthesize(model, cfg, progress=False)
    again, y_again, _ = synthesize(model, cfg, progress=False)
    other, _, _ = synthesize(model, dataclasses.replace(cfg, seed=1), progress=False)
    assert torch.equal(x, again) and torch.equal(y, y_again)
    assert not torch.equal(x, other)


class _LateFirst(nn.Module):
    """Registers the BN the forward pass reaches second before the one it reaches first."""

    def __init__(self):
        super().__init__()
        self.late = nn.BatchNorm2d(4)
        self.early = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        for bn in (self.late, self.early):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.late(self.conv(self.early(x)))


def test_first_bn_weight_multiplies_the_first_layer_the_forward_pass_reaches():
    model, x = _LateFirst().eval(), torch.randn(8, 3, 6, 6)
    stats = BNStatsLoss(model)
    losses = {}
    for w in (1.0, 4.0):
        with torch.no_grad():
            model(x)
        losses[w] = float(stats.pop(w))
    stats.remove()
    bn = model.early
    first = (F.mse_loss(x.mean(dim=(0, 2, 3)), bn.running_mean)
             + F.mse_loss((x.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt(), (bn.running_var + bn.eps).sqrt()))
    assert losses[4.0] - losses[1.0] == pytest.approx(3 * float(first), rel=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_moments_are_the_per_channel_mean_and_biased_variance_with_their_gradients(layout):
    from cc_core.synth import channel_moments

    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(8, 5, 6, 7, generator=g)).contiguous(memory_format=layout)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    mean, var = channel_moments(a)
    torch.testing.assert_close(mean, b.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, b.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    w = torch.randn(2, 5, generator=g)
    (w[0] @ mean + w[1] @ var).backward()
    (w[0] @ b.mean(dim=(0, 2, 3)) + w[1] @ b.var(dim=(0, 2, 3), unbiased=False)).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert channel_moments(torch.full((4, 2, 3, 3), 1e3))[1].min() >= 0  # no negative variance from rounding


def test_synthesis_needs_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(NoBatchNormError, match="no BatchNorm layers"):
        BNStatsLoss(model)


def test_eval_mode_restores_every_modules_flag_and_every_parameters_grad_even_on_error():
    from cc_core.evalmode import eval_mode

    model = tiny_model().train()
    model.bn1.eval()  # a fine-tune's frozen BatchNorm inside a training model
    model.linear.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model, freeze=True):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    with eval_mode(model):
        assert all(p.requires_grad == grads[name] for name, p in model.named_parameters())
    assert not model.bn1.training and model.layer1.training


def test_pgd_stays_inside_eps_and_raises_the_loss():
    model = tiny_model()
    x = (torch.rand(16, 3, 32, 32) - 0.5) / 0.25
    y = model(x).argmax(1).detach()
    cfg = PGDConfig(eps=4 / 255, step=1 / 255, steps=5)
    adv = pgd(model, x, y, cfg)
    delta = (adv - x) * 0.25
    assert delta.abs().max() <= cfg.eps + 1e-6
    pixels = adv * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    with torch.no_grad():
        ce = nn.functional.cross_entropy
        assert ce(model(adv), y) > ce(model(x), y)


def test_targeted_pgd_stays_inside_eps_and_moves_the_images_towards_its_class():
    model = tiny_model()
    x = (torch.rand(16, 3, 32, 32) - 0.5) / 0.25
    y = model(x).argmax(1).detach()
    target = int((y.bincount(minlength=4)).argmin())  # the class the clean images are furthest from
    cfg = PGDConfig(eps=8 / 255, step=2 / 255, steps=8)
    adv = perturb(model, x, y, cfg, model.cc_spec.mean, model.cc_spec.std, torch.Generator().manual_seed(0), target)
    delta = (adv - x) * 0.25
    assert delta.abs().max() <= cfg.eps + 1e-6
    assert adv.grad_fn is None and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        towards = torch.full_like(y, target)
        ce = nn.functional.cross_entropy
        assert ce(model(adv), towards) < ce(model(x), towards)


def test_online_adversarial_term_trains_on_pgd_against_the_student_and_is_validated():
    x, y = (torch.rand(32, 3, 32, 32) - 0.5) / 0.25, torch.arange(32) % 3 + 1  # class 0 left out
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, synth_weight=0.0, adv_weight=0.0, augment=False,
                         mixed_precision=False, online_adv_weight=1.0, online_adv_eps=4 / 255, online_adv_steps=3)
    assert cfg.active
    runs = {}
    for targeted in (True, False):
        model = tiny_model()
        start = copy.deepcopy(model.state_dict())
        history = finetune(model, x, y, cfg=dataclasses.replace(cfg, online_adv_targeted=targeted), progress=False,
                           left_out_class=0)
        assert [h["syn"] for h in history] == [0.0, 0.0] and all(h["online_adv"] > 0 for h in history)
        assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
        runs[targeted] = model.state_dict()
    assert any(not torch.equal(runs[True][k], v) for k, v in runs[False].items())  # targeted is another attack
    assert ft.online_pgd(dataclasses.replace(cfg, online_adv_weight=0.0)) is None
    assert ft.online_pgd(cfg).step == pytest.approx(2.5 * cfg.online_adv_eps / 3)
    for bad in ({"online_adv_eps": 0.0}, {"online_adv_steps": 0}, {"online_adv_weight": -1.0}):
        with pytest.raises(ConfigError, match="online_adv|weights must be >= 0"):
            FinetuneConfig(**bad)


def test_histogram_statistics():
    assert concentration(torch.tensor([10, 10, 10, 10])) == 0
    assert concentration(torch.tensor([0, 40, 0, 0])) == 1
    assert anomaly_index(torch.tensor([5, 6, 5, 60, 4])) > 10


def test_finetune_with_all_terms_off_changes_nothing():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 32, 32)
    history = finetune(model, x, torch.zeros(16, dtype=torch.long), x, model,
                       FinetuneConfig(epochs=3, synth_weight=0, adv_weight=0, kd_weight=0), progress=False)
    assert history == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_lowers_its_loss_and_keeps_bn_statistics():
    model = tiny_model()
    x, y, _ = synthesize(model, FAST_SYNTH, progress=False)
    running = model.bn1.running_mean.clone()
    history = finetune(model, x, y, x, None, FinetuneConfig(epochs=4, batch_size=16, lr=0.05, kd_weight=0),
                       progress=False)
    assert history[-1]["syn"] < history[0]["syn"] + 1e-3
    assert torch.equal(model.bn1.running_mean, running)
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(model, x, y, x, None, FinetuneConfig(kd_weight=1.0), progress=False)


def _step_change(max_grad_norm: float | None) -> float:
    """The L2 norm of the weight change one fine-tune step makes on a tiny model (no weight decay)."""
    torch.manual_seed(0)
    model = tiny_model()
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % model.cc_spec.num_classes
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    finetune(model, x, y, None, None, FinetuneConfig(epochs=1, batch_size=16, lr=0.1, adv_weight=0, weight_decay=0.0,
                                                     augment=False, mixed_precision=False,
                                                     max_grad_norm=max_grad_norm), progress=False)
    return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())


def test_gradient_clipping_bounds_the_step_by_the_norm():
    free = _step_change(None)
    # SGD with Nesterov momentum 0.9 moves the first step by lr * (1 + 0.9) * the clipped gradient.
    assert _step_change(1e-3) == pytest.approx(0.1 * 1.9 * 1e-3, rel=1e-3)
    assert free > 10 * 0.1 * 1.9 * 1e-3
    assert _step_change(1e6) == pytest.approx(free)  # a norm above the gradient's changes nothing
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="max_grad_norm must be > 0"):
            FinetuneConfig(max_grad_norm=bad)


def _guard_run(monkeypatch, collapse_acc: float, cfg: FinetuneConfig):
    from cc_core import finetune as ft

    monkeypatch.setattr(ft, "COLLAPSE_ACC", collapse_acc)
    torch.manual_seed(0)
    model = tiny_model()
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % model.cc_spec.num_classes
    history, record = ft.guarded_finetune(model, x, y, None, None, cfg, progress=False)
    return model, history, record, (x, y)


def test_a_fine_tune_that_fits_its_images_is_not_touched_by_the_collapse_guard(monkeypatch):
    from cc_core.finetune import synthetic_fit

    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.05, adv_weight=0)
    guarded, history, record, (x, y) = _guard_run(monkeypatch, 0.0, cfg)
    torch.manual_seed(0)
    plain = tiny_model()
    assert finetune(plain, x, y, None, None, cfg, progress=False) == history
    assert all(torch.equal(a, b) for a, b in zip(guarded.state_dict().values(), plain.state_dict().values()))
    assert record == {"synthetic_fit": synthetic_fit(plain, x, y), "collapsed": False, "retry_max_grad_norm": None,
                      "synthetic_fit_retry": None}


def test_a_collapsed_fine_tune_runs_again_from_the_same_start_with_clipped_gradients(monkeypatch):
    from cc_core.finetune import COLLAPSE_GRAD_NORM, guard_text, synthetic_fit

    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, adv_weight=0)
    # A bar no student reaches makes every run a collapse: the second run is the clipped one.
    guarded, history, record, (x, y) = _guard_run(monkeypatch, 1.01, cfg)
    torch.manual_seed(0)
    clipped = tiny_model()
    clipped_history = finetune(clipped, x, y, None, None, dataclasses.replace(cfg, max_grad_norm=COLLAPSE_GRAD_NORM),
                               progress=False)
    assert record["collapsed"] and record["retry_max_grad_norm"] == COLLAPSE_GRAD_NORM
    assert record["synthetic_fit_retry"] == synthetic_fit(clipped, x, y)
    if record["synthetic_fit_retry"] >= record["synthetic_fit"]:
        assert history == clipped_history
        assert all(torch.equal(a, b) for a, b in zip(guarded.state_dict().values(), clipped.state_dict().values()))
        assert "the clipped run is kept" in guard_text(record)
    else:
        assert synthetic_fit(guarded, x, y) == record["synthetic_fit"] and "the first run is kept" in guard_text(record)
    # A fine-tune that clips already is not run again; nor is one with nothing to train.
    _, _, record, _ = _guard_run(monkeypatch, 1.01, dataclasses.replace(cfg, max_grad_norm=1.0))
    assert record["collapsed"] and record["retry_max_grad_norm"] is None and "collapsed" in guard_text(record)
    _, history, record, _ = _guard_run(monkeypatch, 1.01, dataclasses.replace(cfg, epochs=0))
    assert history == [] and not record["collapsed"] and guard_text(record) == ""


def test_masked_cross_entropy_is_cross_entropy_over_the_other_classes_and_leaves_that_logit_alone():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 3, 3, 1, 0])
    others = [0, 1, 3]
    expected = nn.functional.cross_entropy(logits[:, others], torch.tensor([others.index(int(v)) for v in labels]))
    loss = masked_cross_entropy(logits, labels, 2)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0) and torch.all(logits.grad[:, others].abs().sum(1) > 0)
    assert float(masked_cross_entropy(logits, labels, None)) == pytest.approx(
        float(nn.functional.cross_entropy(logits, labels)))


@pytest.mark.parametrize("masked", [None, 2])
def test_smoothed_cross_entropy_targets_every_ranked_class(masked):
    logits, labels, s = torch.randn(6, 4), torch.tensor([0, 1, 3, 3, 1, 0]), 0.3
    ranked = [c for c in range(4) if c != masked]
    target = torch.full((6, len(ranked)), s / len(ranked))
    target[torch.arange(6), torch.tensor([ranked.index(int(v)) for v in labels])] += 1 - s
    expected = -(target * logits[:, ranked].log_softmax(1)).sum(1).mean()
    assert float(masked_cross_entropy(logits, labels, masked, s)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing"):
        FinetuneConfig(label_smoothing=1.0)


@pytest.mark.parametrize("mask", [True, False])
def test_a_masked_left_out_class_keeps_its_classifier_row(mask):
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("linear"))
    row = model.linear.weight[2].detach().clone(), model.linear.bias[2].detach().clone()
    x = torch.randn(32, 3, 32, 32)
    y = torch.tensor([0, 1, 3, 3] * 8)
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=0.0, adv_weight=0.0,
                         mask_left_out_class=mask, mixed_precision=False)
    finetune(model, x, y, None, None, cfg, progress=False, left_out_class=2)
    kept = torch.equal(model.linear.weight[2], row[0]) and torch.equal(model.linear.bias[2], row[1])
    assert kept == mask  # unmasked, CE pushes the absent class's logit down on every image
    with pytest.raises(ConfigError, match="class 1 is said to be left out"):
        finetune(model, x, y, None, None, cfg, progress=False, left_out_class=1)


@pytest.mark.parametrize("mask", [True, False])
def test_distillation_without_the_left_out_class_leaves_its_classifier_row(mask):
    model = tiny_model()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.linear.bias[2] += 5.0  # a teacher that holds the left-out class up, as a backdoor would
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("linear"))
    row = model.linear.weight[2].detach().clone(), model.linear.bias[2].detach().clone()
    others = model.linear.weight[[0, 1, 3]].detach().clone()
    x = torch.randn(32, 3, 32, 32)
    y = torch.tensor([0, 1, 3, 3] * 8)
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=0.0, synth_weight=0.0, adv_weight=0.0,
                         kd_weight=1.0, kd_mask_left_out_class=mask, mixed_precision=False)
    finetune(model, x, y, None, teacher, cfg, progress=False, left_out_class=2)
    kept = torch.equal(model.linear.weight[2], row[0]) and torch.equal(model.linear.bias[2], row[1])
    assert kept == mask
    assert not torch.equal(model.linear.weight[[0, 1, 3]], others)  # the present classes still learn


def test_drop_class_removes_one_column():
    logits = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(drop_class(logits, 1), logits[:, [0, 2, 3]])
    assert drop_class(logits, None) is logits


def test_feature_loss_is_relative_error_over_shared_bn_layers():
    t = {"a": torch.ones(2, 3), "b": 2 * torch.ones(2, 3)}
    s = {"a": torch.ones(2, 3), "b": torch.zeros(2, 3), "extra": torch.ones(1)}
    assert float(feature_loss(s, t)) == pytest.approx(0.5)  # layer a exact (0), layer b all wrong (1)
    with pytest.raises(ConfigError, match="no BatchNorm layer shared"):
        feature_loss({"x": torch.ones(1)}, t)


@pytest.mark.parametrize("arch", ["resnet18", "vgg19_bn"])
def test_feature_distillation_pulls_the_student_towards_the_teacher(arch):
    teacher = tiny_model(arch=arch)
    x, y, _ = synthesize(teacher, FAST_SYNTH, progress=False)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    cfg = FinetuneConfig(epochs=6, batch_size=16, lr=0.02, synth_weight=0, adv_weight=0, feature_weight=1.0,
                         augment=False, mixed_precision=False)
    history = finetune(student, x, y, None, teacher, cfg, progress=False)
    assert history[-1]["feat"] < 0.7 * history[0]["feat"]
    assert not any(m._forward_hooks for model in (student, teacher) for m in model.modules())


class _InputRecorder(nn.Module):
    """A teacher that records every batch it is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mixup_asks_the_teacher_about_mixed_images_and_the_mixing_is_convex(alpha):
    model = tiny_model()
    x, y = torch.rand(32, 3, 32, 32), torch.arange(32) % 4
    teacher = _InputRecorder(copy.deepcopy(model))
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.001, adv_weight=0.0, kd_weight=1.0, mixup_alpha=alpha, augment=False,
                         mixed_precision=False)
    history = finetune(model, x, y, None, teacher, cfg, progress=False)
    assert len(history) == 2 and len(teacher.seen) == 4
    seen = torch.cat(teacher.seen)
    is_synthetic = (seen[:, None] - x[None]).flatten(2).abs().amax(2).amin(1) < 1e-6
    assert bool(is_synthetic.all()) == (alpha == 0)
    assert float(seen.min()) >= 0 and float(seen.max()) <= 1  # convex combinations stay in the image range


def test_weight_averaging_after_one_step_is_the_warmed_up_lerp_of_the_start_and_the_stepped_weights():
    start, x, y = tiny_model(), torch.rand(16, 3, 32, 32), torch.arange(16) % 4
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=0.05, adv_weight=0.0, mixed_precision=False)
    stepped, averaged = copy.deepcopy(start), copy.deepcopy(start)
    finetune(stepped, x, y, cfg=cfg, progress=False)
    finetune(averaged, x, y, cfg=dataclasses.replace(cfg, ema_decay=0.99), progress=False)
    moved = 0
    for p0, p1, pa in zip(start.parameters(), stepped.parameters(), averaged.parameters()):
        torch.testing.assert_close(pa, 0.1 * p0 + 0.9 * p1)  # the first step's decay: min(0.99, 1 / 10)
        moved += int(not torch.equal(p0, p1))
    assert moved > 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="ema_decay"):
            FinetuneConfig(ema_decay=bad)


def test_mixup_pairs_is_a_permutation_with_a_weight_in_the_unit_interval():
    import random
    lam, partner = mixup_pairs(64, 0.4, random.Random(0), torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1 and sorted(partner.tolist()) == list(range(64))
    with pytest.raises(ConfigError, match="mixup_alpha"):
        FinetuneConfig(mixup_alpha=-1.0)


def test_macs_of_resnet18():
    model = build_model("resnet18")
    assert macs(model, (3, 32, 32)) == pytest.approx(556.65e6, rel=0.01)


def _tiny_cfg(**kw) -> DefendConfig:
    return resolve_config("cpu", ratio=2.0, tau=3.0, compact={"rank_multiple": 4},
                          synth={"n_samples": 32, "batch_size": 32, "iterations": 20},
                          pgd={"steps": 3}, finetune={"epochs": 2, "batch_size": 16},
                          patch_probe={"sizes": (3,), "stride": 8, "screen": 4, "finalists": 2, "n": 16},
                          warp_probe={"steps": 5, "n": 16, "batch_size": 8},
                          blend_probe={"steps": 5, "n": 16, "batch_size": 8},
                          # the suspected class's exclusion and the all-to-all-only perturbation stay
                          # under test here, though the cpu preset has them off / "any"
                          **({"inversion": {"steps": 10, "restarts": 1}, "exclude_suspected_target": True,
                              "perturbation_scope": "all-to-all"} | kw))


def test_defend_tiny_model_end_to_end(tmp_path):
    model = tiny_model()
    result = defend(model, config=_tiny_cfg(), progress=False, log=lambda *a: None)
    r = result.report
    assert r["format"] == "cleancompact.report/1"
    assert set(suspicion_record(r)) >= {"suspected_target", "trigger"}  # what a bench row keeps of it
    assert r["model"]["compression"] >= 2 and r["model"]["macs_after"] < r["model"]["macs_before"]
    assert set(r["timings_s"]) >= {"decompose", "clean", "compact", "synthesize", "adversarial",
                                   "finetune", "evaluate", "total"}
    assert r["metrics"]["acc_after"] is None  # no eval data given
    assert r["distillation"]["check"] is None and "distill_check" not in r["timings_s"]  # not asked for
    assert r["environment"]["mixed_precision_dtype"] == precision(torch.device("cpu"))
    assert 0 <= r["scan"]["concentration_before"] <= 1
    out = export_package(result, model, tmp_path / "out", latency_batch=8, log=lambda *a: None)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.onnx", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["max_abs_diff"] < 1e-3 and report["onnx"]["speedup"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_onnx_dynamic_batch_and_parity(tmp_path):
    model = tiny_model()
    path = export_onnx(model, tmp_path / "m.onnx")
    assert parity(model, path) < 1e-4
    sess = session(path)
    for n in (1, 5):
        assert run(sess, torch.rand(n, 3, 32, 32).numpy()).shape == (n, 4)


def test_defend_config_validation():
    with pytest.raises(ConfigError, match="ratio must be > 1"):
        DefendConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        resolve_config("fast")
    with pytest.raises(ConfigError, match="channel_mode must be one of zero, shrink, mean"):
        DefendConfig(channel_mode="soft")
    with pytest.raises(ConfigError, match="inversion steps must be >= 1"):
        resolve_config("cpu", inversion={"steps": 0})
    with pytest.raises(ConfigError, match="bn_match_samples needs synthetic images made before compaction"):
        resolve_config("cpu", synth_model="compact")
    with pytest.raises(ConfigError, match="need synth_model='original'"):
        resolve_config("cpu", compact={"rank_strategy": "sensitivity"}, synth_model="compact", bn_match_samples=None)
    with pytest.raises(ConfigError, match="need synth_model='original'"):
        resolve_config("cpu", compact={"rank_strategy": "energy", "method": "activation"}, synth_model="compact",
                       bn_match_samples=None)
    with pytest.raises(ConfigError, match="calibration_samples must be a positive integer"):
        resolve_config("cpu", calibration_samples=0)
    with pytest.raises(ConfigError, match="trigger_channel_u needs a trigger probe"):
        resolve_config("cpu", patch_probe=None, warp_probe=None, blend_probe=None)
    assert resolve_config("cpu", patch_probe=None, warp_probe={}).warp_probe.grid == 4  # the warp probe alone guides it
    assert resolve_config("cpu", patch_probe=None, blend_probe={}).blend_probe.grid == 8  # so does the blend probe
    with pytest.raises(ConfigError, match="warp probe max_shift must be > 0"):
        resolve_config("cpu", warp_probe={"max_shift": 0})
    with pytest.raises(ConfigError, match="trigger_channel_u must be > 0"):
        resolve_config("cpu", trigger_channel_u=0.0)
    with pytest.raises(ConfigError, match="perturbation_channel_u must be > 0"):
        resolve_config("cpu", perturbation_channel_u=-1.0)
    with pytest.raises(ConfigError, match="perturbation_channel_u needs synthetic images made before compaction"):
        resolve_config("cpu", perturbation_channel_u=4.0, trigger_channel_u=None, compact={"rank_strategy": "energy"},
                       synth_model="compact", bn_match_samples=None)
    with pytest.raises(ConfigError, match="patch_unlearn must be one of residual, always, never"):
        resolve_config("cpu", patch_unlearn="sometimes")
    assert resolve_config("cpu", trigger_channel_u=None, patch_probe=None).patch_probe is None
    assert resolve_config("cpu", patch_probe={"sizes": [3]}).patch_probe.sizes == (3,)


def test_defend_sensitivity_ranks_are_measured_on_the_synthetic_images(monkeypatch):
    from cc_core.defense import run as defense_run
    seen = {}

    def spy(model, **kw):
        if kw["ratio"] > 1:  # the compaction, not the full-rank teacher
            seen["calibration"] = kw.get("calibration")
        return clean_compact(model, **kw)

    monkeypatch.setattr(defense_run, "clean_compact", spy)
    cfg = _tiny_cfg(calibration_samples=8).replace(compact={"rank_strategy": "sensitivity"})
    x, y = torch.rand(32, 3, 32, 32), torch.arange(32) % 4
    result = defend(tiny_model(), config=cfg, synthetic=(x, y), progress=False, log=lambda *a: None)
    assert torch.equal(seen["calibration"], x[:8])
    assert result.report["model"]["compression"] >= 2


def test_overrides_merge_into_the_preset():
    cpu = resolve_config("cpu")
    cfg = resolve_config("cpu", compact={"rank_multiple": 4}, finetune={"epochs": 3})
    assert cfg.compact == cpu.compact | {"rank_multiple": 4}
    assert cfg.finetune.epochs == 3 and cfg.finetune.lr == cpu.finetune.lr
    inverted = resolve_config("cpu", inversion={"steps": 7})
    assert inverted.inversion.steps == 7 and inverted.inversion.l1 == cpu.inversion.l1
    assert resolve_config("cpu").compact == cpu.compact  # the preset itself is untouched


def test_scan_reports_histogram_and_spectra():
    from cc_core.probes import PatchProbeConfig

    report = scan(tiny_model(), SynthConfig(n_samples=16, batch_size=16, iterations=10),
                  PGDConfig(steps=2), progress=False, patch_cfg=PatchProbeConfig(sizes=(3,), stride=4, n=16))
    assert sum(report["histogram"]) == 16 and 0 <= report["target_class_estimate"] < 4
    assert report["patch"]["size"] == 3 and report["patch"]["n_stamps"] == 2 * 9 ** 2  # offsets 0, 4, ..., 28 and 29
    assert report["spectra"] and report["spectra"][0]["max_normalized"] >= 1
    assert report["risk"] == max(report["risk_signals"].values())
    assert report["risk_signals"]["adversarial"] == adversarial_score(report["anomaly_index"])


NO_WARP = (0.0, 0.1, 0.2)


@pytest.mark.parametrize("inversion, flip, anomaly, risk, target, a2a, patch, warp", [
    # a warp-like trigger: PGD's pull, neither inversion finds it -> PGD's class
    (0.1, (0.4, 0.5, 0.2), 24.0, 1 - 2 / 24, 1, False, (0.1, 0.1, 0.2), NO_WARP),
    # a patch-like trigger through outlier channels: the channel inversion's class
    (0.9, (0.8, 1.0, 0.9), 1.0, 0.9, 5, False, (0.1, 0.1, 0.2), NO_WARP),
    # a solid patch the inversions miss: the probe's stamp sends everything to its class
    (0.1, (0.2, 0.5, 0.2), 1.0, 0.8, 7, False, (0.8, 0.9, 1.0), NO_WARP),
    # ...or each class to its own next class: all-to-all, no target from it
    (0.1, (0.2, 0.5, 0.2), 1.0, 0.7, 1, True, (0.7, 0.1, 1.0), NO_WARP),
    # a universal perturbation into one class: no all-to-all signal, names nothing
    (0.1, (0.9, 1.0, 0.9), 1.0, 0.1, 1, False, (0.1, 0.1, 0.2), NO_WARP),
    # all-to-all: the universal inversion flips each class consistently, to many classes; it names
    # no target and leaves PGD's standing
    (0.0, (0.95, 0.9, 0.02), 5.0, 0.95 * 0.9, 1, True, (0.1, 0.1, 0.2), NO_WARP),
    (0.0, (0.95, 0.9, 0.02), 1.5, 0.95 * 0.9, 1, True, (0.1, 0.1, 0.2), NO_WARP),
    # a warp trigger the additive inversions and the stamps miss: the warp probe's field names its class
    (0.1, (0.2, 0.5, 0.2), 1.0, 0.6, 4, False, (0.1, 0.1, 0.2), (0.6, 1.0, 1.0)),
    # nothing: low risk (a stamp below PATCH_THRESHOLD counts for nothing, a warp below WARP_THRESHOLD too)
    (0.2, (0.3, 0.5, 0.1), 1.5, 0.2, 1, False, (0.45, 0.9, 1.0), (0.2, 1.0, 1.0)),
])
def test_risk_is_the_largest_signal_and_the_target_follows_the_inversion_only_when_it_fires(
        monkeypatch, inversion, flip, anomaly, risk, target, a2a, patch, warp):
    import cc_core.scan as scan_module

    flip_rate, consistency, flip_concentration = flip
    monkeypatch.setattr(scan_module, "histogram_report", lambda *a: {
        "histogram": [0, 9, 1, 0], "concentration": 0.5, "anomaly_index": anomaly, "target_class_estimate": 1})
    monkeypatch.setattr(scan_module, "inversion_report", lambda *a: {
        "concentration": inversion, "target_class_estimate": 5, "n_channel_outliers": 1})
    monkeypatch.setattr(scan_module, "flip_report", lambda *a: ({
        "flip_rate": flip_rate, "mapping_consistency": consistency, "concentration": flip_concentration,
        "target_class_estimate": 3}, None))
    patch_rate, patch_concentration, patch_consistency = patch
    monkeypatch.setattr(scan_module, "patch_probe", lambda *a: {
        "flip_rate": patch_rate, "concentration": patch_concentration, "mapping_consistency": patch_consistency,
        "target_class_estimate": 7})
    warp_rate, warp_concentration, warp_consistency = warp
    monkeypatch.setattr(scan_module, "warp_probe", lambda *a: {
        "kind": "warp", "flip_rate": warp_rate, "concentration": warp_concentration,
        "mapping_consistency": warp_consistency, "target_class_estimate": 4})
    report = scan(tiny_model(), SynthConfig(n_samples=8, batch_size=8, iterations=2), progress=False)
    assert report["risk"] == pytest.approx(risk) and report["target_class_estimate"] == target
    assert report["all_to_all_suspected"] is a2a


def test_adversarial_score_is_zero_up_to_the_anomaly_threshold_and_rises_towards_one():
    assert adversarial_score(0.0) == adversarial_score(1.5) == adversarial_score(2.0) == 0.0
    assert adversarial_score(4.0) == pytest.approx(0.5)
    assert adversarial_score(8.0) < adversarial_score(24.0) < 1.0


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1"], "ratio must be > 1"),
    (["--ratio", "0.5"], "ratio must be > 1"),
    (["--ratio", "2", "--set", "tau=0"], "tau must be > 0"),
    (["--ratio", "2", "--set", "finetune.online_adv_eps=0"], "online_adv_eps > 0"),
    (["--ratio", "2", "--set", "finetune.mixup_alpha=-1"], "mixup_alpha must be >= 0"),
    (["--ratio", "2", "--set", "finetune_on_scan_synthetic=true"], "it needs scan_synth"),
    (["--ratio", "2", "--set", "patch_probe=null", "--set", "warp_probe=null", "--set", "blend_probe=null"],
     "trigger_channel_u needs a trigger probe"),
    (["--ratio", "2", "--set", "distill_finetune={\"epoch\": 1}"], "distill_finetune takes fine-tune settings"),
    (["--ratio", "2", "--set", "finetune.no_such_setting=1"], "invalid setting"),
    (["--ratio", "2", "--config", "missing.toml"], "cannot read settings file"),
])
def test_defend_bad_input_exit_2_and_nothing_written(extra, message, tiny_file, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main(["defend", str(tiny_file), "--out", str(out), *extra])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def defend_config_from_cli(args: list[str], monkeypatch) -> DefendConfig:
    """The DefendConfig `cleancompact defend ARGS` hands to cc_core.defend (which is not run)."""
    from cc_core.defense import run as defense_run

    class Stop(Exception):
        pass

    seen = {}

    def recording_defend(model, config, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(defense_run, "defend", recording_defend)
    with pytest.raises(Stop):
        main(["defend", *args])
    return seen["config"]


def config_or_refusal(args: list[str], monkeypatch, capsys) -> "DefendConfig | str":
    """defend_config_from_cli's DefendConfig, or the CLI's error message when it refuses the settings (exit 2)."""
    from cc_core.defense import run as defense_run

    seen = {}
    monkeypatch.setattr(defense_run, "defend", lambda model, config, **kwargs: seen.setdefault("config", config) and 0)
    try:
        code = main(["defend", *args])
    except Exception:
        code = None
    if "config" in seen:
        return seen["config"]
    assert code == 2
    return capsys.readouterr().err


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _candidates(path: str, value) -> list:
    """Values to try for one setting: other choices of a string, the other boolean, nearby numbers."""
    from cc_core.baselines.clp import CHANNEL_MODES
    from cc_core.finetune import UNLEARN_TARGETS
    from cc_core.defense.config import BN_MATCH_SCOPES, KD_GATES, PATCH_UNLEARN, PERTURBATION_SCOPES, UNLEARN_SCOPES

    choices = {"normalizer": ["max", "median"], "channel_mode": list(CHANNEL_MODES), "adversarial_model": ["original"],
               "synth_model": ["compact"], "unlearn_scope": list(UNLEARN_SCOPES), "patch_unlearn": list(PATCH_UNLEARN),
               "kd_gate": list(KD_GATES), "perturbation_scope": list(PERTURBATION_SCOPES), "bn_match_scope": list(BN_MATCH_SCOPES), "device": ["cpu"],
               "compact.rank_strategy": ["energy"],
               "finetune.unlearn_target": list(UNLEARN_TARGETS)}
    if path in choices:
        return [c for c in choices[path] if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (list, tuple)) and value:
        return [list(value[:1]), list(value[-1:])]
    if isinstance(value, int):
        return [value + 1, value * 2, 1]
    if isinstance(value, float):
        return [value * 2 if value else 0.5, value / 2, 0.25]
    return {"threads": [2], "tau": [3.0], "channel_u": [2.5], "trigger_channel_u": [2.5], "perturbation_channel_u": [3.5],
            "bn_match_samples": [64], "distill_check": [True], "teacher_finetune": [{"lr": 0.0001}],
            "distill_finetune": [{"epochs": 3}], "undistilled_finetune": [{"noise_weight": 1.0}],
            "scan_synth": [{"tv_weight": 1.0}], "finetune.max_grad_norm": [5.0], "mask_probe": [{"area": 0.02}]}.get(path, [])


# Settings that cannot change alone: each needs another one beside it (DefendConfig refuses it alone).
NEEDS_ANOTHER = {"synth_model": "compact synthesis has no images before compaction for the probes' channel clean",
                 "finetune_on_scan_synthetic": "needs scan_synth"}


@pytest.mark.parametrize("how", ["set", "config"])
def test_every_setting_reaches_the_config_through_set_and_config(how, tiny_file, tmp_path, monkeypatch, capsys):
    """Each leaf of the resolved cpu preset, given a new value through --set or a --config file, comes
    out of the CLI in the DefendConfig it hands to cc_core.defend (which the report writes as is)."""
    import yaml

    preset = _leaves(resolve_config("cpu").to_dict())
    args = [str(tiny_file), "--ratio", "2", "--out", str(tmp_path / "o")]
    reached, refused = [], {}
    for path, value in preset.items():
        if path == "ratio":
            continue
        for candidate in _candidates(path, value):
            nested: dict = {}
            node = nested
            for part in path.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[path.split(".")[-1]] = candidate
            if how == "set":
                extra = ["--set", f"{path}={json.dumps(candidate)}"]
            else:
                file = tmp_path / "settings.yaml"
                file.write_text(yaml.safe_dump(nested))
                extra = ["--config", str(file)]
            cfg = config_or_refusal([*args, *extra], monkeypatch, capsys)
            if isinstance(cfg, str):
                refused[path] = cfg
                continue
            got = _leaves(json.loads(json.dumps(cfg.to_dict())))
            if path in got:
                assert got[path] == candidate, path
            elif isinstance(candidate, dict):  # a dict setting expands into a section
                assert all(got[f"{path}.{k}"] == v for k, v in _leaves(candidate).items()), path
            else:  # distill_check=true: a section of the default settings
                assert any(key.startswith(f"{path}.") for key in got), path
            reached.append(path)
            refused.pop(path, None)
            break
        else:
            assert path in refused or path in NEEDS_ANOTHER, f"no value to try for {path}"
    assert set(refused) <= set(NEEDS_ANOTHER), refused
    assert len(reached) >= len(preset) - 1 - len(NEEDS_ANOTHER)
    assert not (tmp_path / "o").exists()


def test_a_settings_file_and_set_layer_over_the_preset_in_order(tiny_file, tmp_path, monkeypatch):
    (tmp_path / "s.toml").write_text("tau = 3.0\n[finetune]\nepochs = 4\nlr = 0.002\n")
    args = [str(tiny_file), "--ratio", "3", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "s.toml")]
    cfg = defend_config_from_cli([*args, "--set", "finetune.epochs=6", "--seed", "5"], monkeypatch)
    assert (cfg.ratio, cfg.tau, cfg.finetune.epochs, cfg.finetune.lr) == (3.0, 3.0, 6, 0.002)
    assert cfg.finetune.kd_weight == resolve_config("cpu").finetune.kd_weight  # the rest of the section stays
    assert cfg.synth.seed == cfg.pgd.seed == cfg.finetune.seed == cfg.warp_probe.seed == 5
    assert defend_config_from_cli(args, monkeypatch).synth.seed == 0



def test_a_student_distilling_alone_takes_that_recipe_and_its_teacher_the_undistilled_one():
    from cc_core.defense.teacher import finetune_config, teacher_finetune_config

    cfg = resolve_config("cpu", teacher_finetune={}, distill_finetune=DISTILL_ALONE)
    plain, teacher = cfg.finetune, nn.Linear(1, 1)
    student = finetune_config(cfg, teacher)
    assert student == dataclasses.replace(plain, synth_weight=0.0, mixup_alpha=1.0, epochs=30, max_grad_norm=1.0)
    undistilled = finetune_config(cfg, None)
    assert undistilled == dataclasses.replace(plain, kd_weight=0.0, feature_weight=0.0)
    assert teacher_finetune_config(cfg) == undistilled  # teacher_finetune {}: the student's undistilled recipe
    assert finetune_config(resolve_config("cpu"), teacher) == plain  # the presets: distillation added to the CE
    no_kd = cfg.replace(finetune={"kd_weight": 0.0})
    assert finetune_config(no_kd, teacher) == no_kd.finetune  # a student that does not distill keeps its CE
    with pytest.raises(ConfigError, match="distill_finetune takes fine-tune settings"):
        cfg.replace(distill_finetune={"epoch": 1})


def test_defend_missing_model(tmp_path, capsys):
    assert main(["defend", str(tmp_path / "none.pt"), "--ratio", "2", "--out", str(tmp_path / "o")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_measure_before_and_after_on_real_style_data():
    import numpy as np

    from cc_core.attacks import build_attack
    from cc_core.data import ImageData
    from cc_core.defense.report import measure

    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8), np.arange(40) % 4,
                     ["a", "b", "c", "d"])
    m = measure(tiny_model(0), tiny_model(1), data, build_attack("badnet", 4))
    assert set(m) == {f"{k}_{w}" for k in ("acc", "asr", "ra", "per_class_acc") for w in ("before", "after")}
    assert all(0 <= m[f"{k}_{w}"] <= 1 for k in ("acc", "asr", "ra") for w in ("before", "after"))
    for when in ("before", "after"):  # 10 images per class: the per-class mean is the accuracy
        assert len(m[f"per_class_acc_{when}"]) == 4
        assert sum(m[f"per_class_acc_{when}"]) / 4 == pytest.approx(m[f"acc_{when}"])
    assert measure(tiny_model(0), tiny_model(1)) == dict.fromkeys(m)


@pytest.mark.parametrize("arch", ["resnet18", "vgg19_bn"])  # VGG: an in-place ReLU follows the BN
def test_channel_outliers_and_inversion_find_a_planted_backdoor_channel(arch):
    """A channel made to outlie (scaled filter) and wired to class 2 only: the scan flags it and
    the inverted trigger lands every synthetic image in class 2."""
    from cc_core.scan import InversionConfig, channel_outliers, inversion_report

    model = tiny_model(arch=arch).eval()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels >= 8]
    name, conv = convs[-1]
    with torch.no_grad():
        conv.weight[0] *= 20
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight[:, 0] = 0
        head.weight[2, 0] = 50
    flagged = channel_outliers(model, u=3.0)
    assert flagged[0]["layer"] == name and flagged[0]["channel"] == 0 and flagged[0]["z"] > 3
    x = torch.randn(32, *model.cc_spec.input_shape) * 0.5
    report = inversion_report(model, x, InversionConfig(steps=30, lr=0.1, l1=0.0))
    assert report["target_class_estimate"] == 2 and report["concentration"] > 0.9


@pytest.mark.parametrize("inversion, anomaly, target", [
    (0.9, 5.0, 5),   # the inversion fires: its class, whatever the histogram says
    (0.1, 5.0, 1),   # only the histogram flags a class
    (0.1, 1.5, None),  # neither signal flags: nothing is suspected
])
def test_flagged_target_needs_a_signal_that_fires(inversion, anomaly, target):
    from cc_core.scan import flagged_target

    adversarial = {"anomaly_index": anomaly, "target_class_estimate": 1}
    assert flagged_target(adversarial, {"concentration": inversion, "target_class_estimate": 5}) == target
    fired = {"flip_rate": 0.8, "mapping_consistency": 1.0, "inverted_into": 7}
    assert flagged_target(adversarial, {"concentration": inversion, "target_class_estimate": 5}, None, fired) == 7
    missed = fired | {"flip_rate": 0.2}
    assert flagged_target(adversarial, {"concentration": inversion, "target_class_estimate": 5}, None, missed) == target


@pytest.mark.parametrize("found, inverted", [
    ({"kind": "patch", "flip_rate": 0.9, "concentration": 1.0, "target_class_estimate": 3}, False),  # names class 3
    ({"kind": "patch", "flip_rate": 0.9, "concentration": 0.3, "target_class_estimate": 3,
      "mapping_consistency": 0.2}, True),  # fires, spread out
    ({"kind": "patch", "flip_rate": 0.05, "concentration": 1.0, "target_class_estimate": 3}, True),  # does not fire
    (None, True)])
def test_suspected_target_inverts_through_channels_only_when_no_probe_names_the_target(monkeypatch, found, inverted):
    import cc_core.scan as scan_module

    calls = []
    monkeypatch.setattr(scan_module, "inversion_report", lambda *a: calls.append(a) or {
        "concentration": 0.9, "target_class_estimate": 5})
    model = build_model("resnet18", num_classes=10, width=0.125).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    universal = ({"flip_rate": 0.0, "mapping_consistency": 0.0, "concentration": 0.0}, torch.zeros(1, 3, 32, 32))
    s = scan_module.suspected_target(model, x, y, PGDConfig(steps=1), found=found, universal=universal)
    assert bool(calls) == inverted
    assert (s["inversion"] is None) == (not inverted)
    assert s["target"] == (5 if inverted else 3)


def test_exclude_class_leaves_out_exactly_that_label():
    from cc_core.defense.images import exclude_class

    x, y = torch.arange(6.0).view(6, 1), torch.tensor([0, 1, 0, 2, 1, 0])
    kept_x, kept_y, n = exclude_class(x, y, 0)
    assert n == 3 and kept_y.tolist() == [1, 2, 1] and kept_x.flatten().tolist() == [1.0, 3.0, 4.0]
    assert exclude_class(x, y, None)[2] == 0


@pytest.mark.parametrize("target", [2, None])
def test_defend_fine_tunes_without_the_suspected_targets_synthetic_images(monkeypatch, target):
    import cc_core.scan as scan_module

    seen = {}
    real_finetune = ft.finetune

    def recording_finetune(model, x, y, *args, **kwargs):
        seen["labels"] = y.tolist()
        seen.setdefault("left_out", []).append(kwargs.get("left_out_class"))
        return real_finetune(model, x, y, *args, **kwargs)

    monkeypatch.setattr(scan_module, "flagged_target", lambda *a: target)
    monkeypatch.setattr(ft, "finetune", recording_finetune)  # the student's, through guarded_finetune
    monkeypatch.setattr(ft, "COLLAPSE_ACC", 0.0)  # one run a fine-tune, whatever the tiny model fits
    synthetic = (torch.randn(12, 3, 32, 32), torch.arange(12) % 4)
    # No teacher fine-tune: only the student's fine-tune is recorded (test_teacher_finetune_... checks that
    # the teacher's leaves the same class out).
    r = defend(tiny_model(), config=_tiny_cfg(teacher_finetune=None, exclude_suspected_target=True), progress=False, log=lambda *a: None,
               synthetic=synthetic).report
    assert r["scan"]["suspected_target"] == target
    assert r["scan"]["synthetic_excluded"] == (3 if target is not None else 0)
    assert len(seen["labels"]) == 12 - r["scan"]["synthetic_excluded"]
    assert sorted(set(seen["labels"])) == [c for c in range(4) if c != target]
    assert seen["left_out"] == [target]  # the fine-tune is told which class has no images


def test_balanced_labels_stay_balanced():
    assert torch.bincount(balanced_labels(10, 4, torch.Generator().manual_seed(0))).tolist() == [3, 3, 2, 2]
    assert torch.bincount(balanced_labels(8, 4, torch.Generator().manual_seed(0))).tolist() == [2, 2, 2, 2]


def test_same_class_similarity_averages_cosines_over_same_label_pairs_only():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -2.0]]) + 5.0  # centered: the +5 goes
    assert float(same_class_similarity(features, torch.tensor([0, 1, 0, 1]))) == pytest.approx(-1.0)  # opposite
    assert float(same_class_similarity(features, torch.tensor([0, 0, 1, 1]))) == pytest.approx(0.0)  # orthogonal
    assert float(same_class_similarity(features, torch.arange(4))) == 0.0  # no pair


def test_diversity_term_pushes_images_of_a_class_apart_in_feature_space():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        model.linear.weight.mul_(30)
    cfg = dataclasses.replace(FAST_SYNTH, iterations=30, mixed_precision=False)

    def similarity(diversity: float) -> float:
        x, y, _ = synthesize(model, dataclasses.replace(cfg, diversity_weight=diversity), progress=False)
        hook = ClassifierInput(model)
        try:
            with torch.no_grad():
                model.eval()(x)
            return float(same_class_similarity(hook.pop(), y))
        finally:
            hook.remove()

    plain, diverse = similarity(0.0), similarity(10.0)
    assert diverse < plain - 0.1
    assert not any(module._forward_pre_hooks for module in model.modules())  # hooks removed
    with pytest.raises(ConfigError, match="diversity_weight must be >= 0"):
        SynthConfig(diversity_weight=-1.0)
    model.linear = nn.Identity()
    with pytest.raises(ConfigError, match="classifier to be an nn.Linear"):
        synthesize(model, dataclasses.replace(cfg, diversity_weight=1.0), progress=False)
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_scan_synth_gives_the_scan_its_own_images_and_the_fine_tune_keeps_the_others(monkeypatch):
    from cc_core.defense import run as defense_run

    seen = {}
    real_probe, real_scan = defense_run.probe_triggers, defense_run.scan_and_suspect

    def recording_probe(model, x, cfg):
        seen["probed"] = x.clone()
        return real_probe(model, x, cfg)

    def recording_scan(original, compact, x, y, *args, **kwargs):
        seen["scanned"] = x.clone()
        return real_scan(original, compact, x, y, *args, **kwargs)

    def recording_finetune(model, x, *args, **kwargs):
        seen["fine_tuned"] = x.clone()
        return []

    monkeypatch.setattr(defense_run, "probe_triggers", recording_probe)
    monkeypatch.setattr(defense_run, "scan_and_suspect", recording_scan)
    monkeypatch.setattr(ft, "finetune", recording_finetune)
    cfg = _tiny_cfg(teacher_finetune=None, scan_synth={"tv_weight": 0.0, "n_samples": 16})
    assert cfg.scan_synth_config == dataclasses.replace(cfg.synth, tv_weight=0.0, n_samples=16)
    fine_tune_images = (torch.randn(12, 3, 32, 32), torch.arange(12) % 4)
    r = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None, synthetic=fine_tune_images).report
    scan_images, _, _ = synthesize(tiny_model(), cfg.scan_synth_config, progress=False)
    assert torch.equal(seen["probed"], scan_images) and torch.equal(seen["scanned"], scan_images)
    assert r["timings_s"]["synthesize_scan"] > 0
    suspected = r["scan"]["suspected_target"]
    kept = fine_tune_images[1] != (-1 if suspected is None else suspected)
    assert torch.equal(seen["fine_tuned"], fine_tune_images[0][kept])
    assert r["scan"]["synthetic_excluded"] == int((~kept).sum())  # counted on the fine-tune's images

    seen.clear()
    given = (torch.randn(10, 3, 32, 32), torch.arange(10) % 4)
    defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None, synthetic=fine_tune_images,
           scan_synthetic=given)
    assert torch.equal(seen["probed"], given[0])


def test_finetune_on_scan_synthetic_fine_tunes_on_both_sets_less_the_suspected_class(monkeypatch):
    from cc_core.defense import run as defense_run

    seen = {}

    def recording_finetune(model, x, y, *args, **kwargs):
        seen["fine_tuned"] = (x.clone(), y.clone())
        return []

    real_exclude = defense_run.exclude_class
    monkeypatch.setattr(ft, "finetune", recording_finetune)
    monkeypatch.setattr(defense_run, "exclude_class", lambda x, y, target: real_exclude(x, y, 1))  # class 1 suspected
    cfg = _tiny_cfg(teacher_finetune=None, scan_synth={"tv_weight": 0.0}, finetune_on_scan_synthetic=True)
    fine_tune_images = (torch.randn(12, 3, 32, 32), torch.arange(12) % 4)
    scan_images = (torch.randn(8, 3, 32, 32), torch.arange(8) % 4)
    r = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None, synthetic=fine_tune_images,
               scan_synthetic=scan_images).report
    x, y = seen["fine_tuned"]
    both = torch.cat([fine_tune_images[0][fine_tune_images[1] != 1], scan_images[0][scan_images[1] != 1]])
    assert torch.equal(x, both) and not (y == 1).any()
    assert r["scan"]["synthetic_excluded"] == 3 + 2


def test_scan_synth_is_checked_at_the_edge():
    cpu = resolve_config("cpu")
    same = {"bn_weight": cpu.synth.bn_weight, "tv_weight": cpu.synth.tv_weight}
    assert resolve_config("cpu", scan_synth=None).scan_synth_config is None
    assert resolve_config("cpu", scan_synth=same).scan_synth_config is None  # one set of images, made once
    with pytest.raises(ConfigError, match="scan_synth takes synthesis settings"):
        resolve_config("cpu", scan_synth={"images": 10})
    with pytest.raises(ConfigError, match="synthesis tv_weight must be >= 0"):
        resolve_config("cpu", scan_synth={"tv_weight": -1.0})
    with pytest.raises(ConfigError, match="finetune_on_scan_synthetic adds the scan's own images to the fine-tune"):
        resolve_config("cpu", finetune_on_scan_synthetic=True)
    with pytest.raises(ConfigError, match="scan_synth makes the scan's images before compaction"):
        resolve_config("cpu", scan_synth={"tv_weight": 0.0}, synth_model="compact", compact={"rank_strategy": "energy"},
                       trigger_channel_u=None, perturbation_channel_u=None)


class PlantedAllToAll(nn.Module):
    """A classifier with a planted all-to-all trigger. Clean logits: 10 x one-hot of the image's
    brightest colour channel plus its darkness (a class only a large change can move; no gradient
    reaches it). When the top-left 3x3 patch is bright, a push of each image's logits towards the
    NEXT class (y -> y + 1 mod C). The push is smooth in the patch's brightness, so a gradient
    reaches it from any image."""

    def __init__(self, trigger: bool = True) -> None:
        from cc_core.models.registry import ModelSpec

        super().__init__()
        self.trigger = trigger
        self.cc_spec = ModelSpec(arch="planted", num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * 0.25 + 0.5
        colour = pixels.detach().mean(dim=(2, 3))
        clean_class = torch.where(colour.mean(1) < 0.15, 3, colour.argmax(1))
        logits = 10 * nn.functional.one_hot(clean_class, 4).float()
        if not self.trigger:
            return logits + 0 * pixels.sum(dim=(1, 2, 3))[:, None]  # differentiable, constant
        strength = torch.sigmoid((pixels[:, :, :3, :3].mean(dim=(1, 2, 3)) - 0.6) * 20) * 40
        return logits + strength[:, None] * torch.roll(logits.softmax(1), 1, dims=1)


def _dim_images(n: int) -> torch.Tensor:
    """(n, 3, 32, 32) pixels in [0.1, 0.5]: far from the planted trigger's brightness."""
    g = torch.Generator().manual_seed(1)
    return 0.1 + 0.4 * torch.rand(n, 3, 32, 32, generator=g) * torch.rand(n, 3, 1, 1, generator=g)


def test_universal_inversion_finds_a_planted_all_to_all_patch_and_calls_it_all_to_all():
    from cc_core.scan import InversionConfig, all_to_all_score, all_to_all_suspected, flip_report

    model = PlantedAllToAll().eval()
    x = (_dim_images(64) - 0.5) / 0.25
    report, delta = flip_report(model, x, InversionConfig(steps=60, lr=0.1, l1=0.05, restarts=2))
    assert report["flip_rate"] > 0.9 and report["mapping_consistency"] > 0.9 and len(report["restart_scores"]) == 2
    assert max(report["restart_scores"]) == pytest.approx(all_to_all_score(report), abs=1e-4)
    assert all_to_all_suspected(report)
    corner = delta[..., :3, :3].abs().sum()
    assert corner > 0.9 * delta.abs().sum()  # the L1 penalty keeps the perturbation on the patch


def test_universal_inversion_does_not_fire_on_a_model_without_trigger():
    from cc_core.scan import FLIP_THRESHOLD, InversionConfig, flip_report, flip_score

    model = PlantedAllToAll(trigger=False).eval()
    x = (_dim_images(64) - 0.5) / 0.25
    report, _ = flip_report(model, x, InversionConfig(steps=60, lr=0.1, l1=0.05, restarts=2))
    assert flip_score(report) < FLIP_THRESHOLD


class PlantedAllToOne(PlantedAllToAll):
    """PlantedAllToAll's clean classes; when the top-left 3x3 patch is bright, a push of every
    image's logits into class 2 (all-to-one)."""

    def __init__(self, trigger: bool = True) -> None:
        super().__init__(trigger=False)
        self.all_to_one = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not self.all_to_one:
            return logits
        pixels = x * 0.25 + 0.5
        strength = torch.sigmoid((pixels[:, :, :3, :3].mean(dim=(1, 2, 3)) - 0.6) * 20) * 40
        return logits + strength[:, None] * nn.functional.one_hot(torch.tensor(2), 4).float()


def test_targeted_inversion_sends_images_into_a_planted_target_and_not_where_there_is_no_trigger():
    from cc_core.scan import FLIP_THRESHOLD, InversionConfig, flip_score, targeted_flip_report

    x = (_dim_images(64) - 0.5) / 0.25
    cfg = InversionConfig(steps=60, lr=0.1, l1=0.05, restarts=2)
    model = PlantedAllToOne().eval()
    outside = float((predictions(model, x) != 2).float().mean())
    report, delta = targeted_flip_report(model, x, 2, cfg)
    assert report["inverted_into"] == 2 and report["target_class_estimate"] == 2 and len(report["restart_scores"]) == 2
    assert report["flip_rate"] == pytest.approx(outside, abs=0.05) and report["concentration"] > 0.95
    assert delta[..., :3, :3].abs().sum() > 0.9 * delta.abs().sum()  # on the patch
    clean, _ = targeted_flip_report(PlantedAllToOne(trigger=False).eval(), x, 2, cfg)
    assert flip_score(clean) < FLIP_THRESHOLD


def test_the_targeted_scope_inverts_into_the_adversarially_flagged_class_only_where_the_untargeted_one_misses(monkeypatch):
    from cc_core.defense import suspect as defense_suspect
    from cc_core.defense.config import resolve_config
    from cc_core.defense.suspect import untargeted_or_targeted

    x = (_dim_images(64) - 0.5) / 0.25
    missed = {"flip_rate": 0.1, "mapping_consistency": 0.5, "concentration": 0.3, "target_class_estimate": 0,
              "histogram": [1, 1, 1, 1]}
    monkeypatch.setattr(defense_suspect, "flip_report", lambda model, images, inversion: (missed, torch.zeros(1, 3, 32, 32)))
    anomaly = {"value": 5.0}
    monkeypatch.setattr(defense_suspect, "histogram_report", lambda model, images, labels, pgd: {
        "anomaly_index": anomaly["value"], "target_class_estimate": 2})
    inversion = {"steps": 60, "lr": 0.1, "l1": 0.05, "restarts": 2}
    cfg = resolve_config("cpu", perturbation_scope="targeted", inversion=inversion)
    flip, delta, record = untargeted_or_targeted(PlantedAllToOne().eval(), x, cfg)
    assert record["taken"] and record["into"] == 2 and flip["inverted_into"] == 2 and flip["flip_rate"] >= 0.5
    assert defense_suspect.perturbation_fires(flip, "targeted") and delta.abs().sum() > 0
    flip, _, record = untargeted_or_targeted(PlantedAllToOne(trigger=False).eval(), x, cfg)
    assert flip is missed and not record["taken"] and record["flip_rate"] < 0.5
    anomaly["value"] = 1.5  # nothing flagged: no targeted inversion
    flip, _, record = untargeted_or_targeted(PlantedAllToOne().eval(), x, cfg)
    assert flip is missed and record == {"anomaly_index": 1.5, "into": None, "flip_rate": None, "taken": False}
    assert untargeted_or_targeted(PlantedAllToOne().eval(), x, cfg.replace(perturbation_scope="any"))[2] is None


def test_stamp_masks_and_deltas_paint_exactly_the_stamped_square():
    from cc_core.adversarial import _to_pixels
    from cc_core.probes import PatchProbeConfig, patch_positions, patch_stamps, stamp_delta, stamp_masks
    from cc_core.scan import add_pixel_delta

    assert patch_positions(32, 4, 2) == list(range(0, 29, 2)) and patch_positions(32, 3, 2)[-1] == 29
    cfg = PatchProbeConfig(sizes=(2, 5), stride=3)
    stamps = patch_stamps(32, 32, cfg)
    per_size = len(patch_positions(32, 2, 3)) ** 2 + len(patch_positions(32, 5, 3)) ** 2
    assert len(stamps) == 2 * per_size
    masks = stamp_masks(stamps, 32, 32)
    spec = PlantedAllToAll().cc_spec
    x = (_dim_images(4) - 0.5) / 0.25
    for i in torch.randperm(len(stamps), generator=torch.Generator().manual_seed(0))[:20].tolist():
        value, size, row, col = (int(v) for v in stamps[i].tolist())
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[row:row + size, col:col + size] = True
        assert torch.equal(masks[i, 0], expected)
        painted = add_pixel_delta(x, stamp_delta({"row": row, "col": col, "size": size, "value": value}, (3, 32, 32)), spec)
        pix, _, _ = _to_pixels(painted, spec.mean, spec.std)
        assert torch.allclose(pix[:, :, expected], torch.full_like(pix[:, :, expected], float(value)), atol=1e-6)
        assert torch.allclose(pix[:, :, ~expected], _dim_images(4)[:, :, ~expected], atol=1e-6)


def test_patch_probe_finds_a_planted_patch_where_it_is_and_nothing_on_a_clean_model():
    from cc_core.probes import PatchProbeConfig, patch_probe, patch_score, trigger_flip_rate
    from cc_core.scan import all_to_all_suspected

    x = (_dim_images(64) - 0.5) / 0.25
    cfg = PatchProbeConfig(sizes=(2, 3, 4))
    found = patch_probe(PlantedAllToAll().eval(), x, cfg)
    assert found["flip_rate"] > 0.9 and (found["row"], found["col"], found["value"]) == (0, 0, 1.0)
    assert found["median_screen_rate"] < 0.1 and found["n"] == 64 and sum(found["histogram"]) == 64
    assert set(found["best_screen_rate_by_size"]) == {"2", "3", "4"} and found["n_stamps"] == 2 * (31 ** 2 + 30 ** 2 + 29 ** 2)
    assert all_to_all_suspected(found) and found["mapping_consistency"] == 1.0  # each class to the next
    assert found["kind"] == "patch" and trigger_flip_rate(PlantedAllToAll().eval(), x, found) == found["flip_rate"]
    clean = patch_probe(PlantedAllToAll(trigger=False).eval(), x, cfg)
    assert clean["flip_rate"] < 0.3 and patch_score(clean) == 0.0 and patch_score(found) == found["flip_rate"]


def test_patch_probe_config_refuses_what_it_cannot_unlearn():
    from cc_core.probes import PatchProbeConfig

    for bad in ({"values": (0.5,)}, {"sizes": ()}, {"sizes": (0, 3)}, {"stride": 0}, {"screen": 0}):
        with pytest.raises(ConfigError):
            PatchProbeConfig(**bad)


def test_patch_trigger_is_unlearned_only_while_it_still_flips_the_compacted_model():
    from cc_core.defense.suspect import scan_and_suspect
    from cc_core.probes import patch_probe, stamp_delta
    from cc_core.scan import add_pixel_delta

    x = (_dim_images(64) - 0.5) / 0.25
    original = PlantedAllToAll().eval()
    y = original(x).argmax(1)
    cfg = resolve_config("cpu", pgd={"steps": 2}, inversion={"steps": 5, "restarts": 1},
                         patch_probe={"sizes": (3,), "stride": 2})
    patch = patch_probe(original, x, cfg.patch_probe)

    def stamped(fired: dict) -> torch.Tensor:
        return add_pixel_delta(x, stamp_delta(fired, (3, 32, 32)), original.cc_spec)

    _, summary, unlearn, gate_trigger = scan_and_suspect(original, PlantedAllToAll().eval(), x, y, cfg, patch)
    assert gate_trigger is patch  # a firing probe's trigger is what the distillation gate verifies against
    fired = summary["trigger"]
    assert fired["unlearned"] and fired["flip_rate_compact"] > 0.9 and (fired["kind"], fired["row"], fired["col"]) == ("patch", 0, 0)
    assert torch.equal(unlearn(x), stamped(fired))
    assert summary["all_to_all_suspected"] and summary["suspected_target"] is None  # no class to leave out

    _, summary, unlearn, _ = scan_and_suspect(original, PlantedAllToAll(trigger=False).eval(), x, y, cfg, patch)
    assert not summary["trigger"]["unlearned"] and summary["trigger"]["flip_rate_compact"] < 0.1
    assert unlearn is None or not torch.equal(unlearn(x), stamped(summary["trigger"]))
    _, summary, unlearn, _ = scan_and_suspect(original, PlantedAllToAll(trigger=False).eval(), x, y,
                                              cfg.replace(patch_unlearn="always"), patch)
    assert summary["trigger"]["unlearned"] and torch.equal(unlearn(x), stamped(summary["trigger"]))
    _, summary, _, _ = scan_and_suspect(original, original, x, y, cfg, None)
    assert summary["trigger"] is None


class StampNet(nn.Module):
    """conv 3 -> 64 (3x3) -> BN -> ReLU -> spatial mean -> linear. Channel 3 detects a white 3x3
    square (each weight 1/3, bias -6: output 3 on white, 0 below 2/3 mean brightness); the other
    channels are random and small."""

    def __init__(self) -> None:
        from cc_core.models.registry import ModelSpec

        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.Linear(64, 2)
        with torch.no_grad():
            self.conv.weight.mul_(0.05)
            self.conv.weight[3], self.conv.bias[3] = 1 / 3, -6.0
        self.cc_spec = ModelSpec(arch="stampnet", num_classes=2, mean=(0.0,) * 3, std=(1.0,) * 3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_trigger_clean_zeroes_the_channel_the_stamp_excites_and_nothing_else():
    from cc_core.probes import stamp_delta
    from cc_core.scan import add_pixel_delta
    from cc_core.trigger_clean import prune_trigger_channels, trigger_channel_scores

    model = StampNet()
    x = _dim_images(64)
    x_triggered = add_pixel_delta(x, stamp_delta({"row": 10, "col": 20, "size": 3, "value": 1.0}, (3, 32, 32)),
                                  model.cc_spec)
    scores = trigger_channel_scores(model, x, x_triggered)
    assert len(scores) == 64 and scores[0][1:] == ("conv", 3) and scores[0][0] > 3 > scores[1][0]
    pruned, info = prune_trigger_channels(model, x, x_triggered, u=3.0)
    assert info["n_pruned"] == 1 and info["pruned"] == {"conv": 1} and info["channels"][0]["channel"] == 3
    assert pruned.conv.weight[3].abs().sum() == 0 and pruned.bn.weight[3] == 0 and pruned.bn.bias[3] == 0
    keep = torch.arange(64) != 3
    assert torch.equal(pruned.conv.weight[keep], model.conv.weight[keep]) and model.conv.weight[3].abs().sum() > 0
    with pytest.raises(ConfigError):
        prune_trigger_channels(model, x, x_triggered, u=0.0)


def test_prune_until_quiet_lowers_the_threshold_only_until_the_trigger_stops_firing(monkeypatch):
    from cc_core.probes import stamp_delta
    from cc_core.scan import add_pixel_delta
    from cc_core.trigger_clean import prune_until_quiet, thresholds, trigger_channel_scores

    assert thresholds(4.0, 2.0) == [4.0, 3.5, 3.0, 2.5, 2.0] and thresholds(3.0, 2.2) == [3.0, 2.5, 2.2]
    assert thresholds(3.0, 3.0) == [3.0]
    for bad in (5.0, 0.0):  # above the clean's start, or not a threshold
        with pytest.raises(ConfigError):
            resolve_config("cpu", perturbation_channel_floor=bad)
    assert resolve_config("cpu", perturbation_channel_u=None).perturbation_channel_floor == 2.0  # moot, not refused
    with pytest.raises(ConfigError):
        thresholds(2.0, 3.0)
    model = StampNet()
    x = _dim_images(64)
    x_triggered = add_pixel_delta(x, stamp_delta({"row": 10, "col": 20, "size": 3, "value": 1.0}, (3, 32, 32)),
                                  model.cc_spec)
    z = sorted(score for score, _, _ in trigger_channel_scores(model, x, x_triggered))[::-1]

    def zeroed(m) -> int:
        return int((m.conv.weight.flatten(1).abs().sum(1) == 0).sum())

    # "fires" until three channels are gone (the stamp's channel stands out, the rest are near 0):
    # the first threshold with three channels above it is taken
    pruned, info = prune_until_quiet(model, x, x_triggered, lambda m: 1.0 if zeroed(m) < 3 else 0.0, 8.0, 0.1, 0.1)
    levels = [level for level, _ in info["flip_rates"]]
    chosen = next(level for level in thresholds(8.0, 0.1) if sum(v > level for v in z) >= 3)
    assert z[0] > 3 > 1 > z[1] and chosen < 1 and levels[0] == 8.0
    assert levels[-1] == info["u"] == chosen and info["flip_rates"][-1][1] == 0.0
    assert all(rate == 1.0 for _, rate in info["flip_rates"][:-1]) and zeroed(pruned) == info["n_pruned"] >= 3
    # a class that loses its images stops the descent at the threshold before: here every image
    # goes to class 0 once three channels are zeroed, and the trigger never stops firing
    from cc_core import trigger_clean
    assert trigger_clean.class_keep(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])) == 0.5
    assert trigger_clean.class_keep(torch.tensor([0, 1]), torch.tensor([0, 1])) == 1.0
    classes = torch.arange(len(x)) % 2
    monkeypatch.setattr(trigger_clean, "predicted", lambda m, images: classes * int(zeroed(m) < 3))
    pruned, info = prune_until_quiet(model, x, x_triggered, lambda m: 1.0, 8.0, 0.1, 0.1, min_keep=0.9)
    assert info["stopped_by"] == "keep" and info["n_pruned"] == zeroed(pruned) < 3 and info["refused"] == chosen
    assert [level for level, _ in info["flip_rates"]][-1] == info["u"] > chosen
    monkeypatch.undo()
    # never quiet: down to the floor
    _, info = prune_until_quiet(model, x, x_triggered, lambda m: 1.0, 3.0, 2.0, 0.1)
    assert [level for level, _ in info["flip_rates"]] == [3.0, 2.5, 2.0] and info["u"] == 2.0
    assert info["n_pruned"] == sum(v > 2.0 for v in z)


def test_clp_with_trigger_off_zeroes_only_a_firing_stamps_channels_and_keeps_clp_where_none_fires():
    from cc_core.defense.cleaning import channel_clean, channel_clean_text

    model = StampNet()
    with torch.no_grad():  # channel 7: CLP's outlier (large weights) that never fires (bias far below zero)
        model.conv.weight[7], model.conv.bias[7] = 2.0, -1000.0
    x = _dim_images(64)
    stamp = {"kind": "patch", "row": 10, "col": 20, "size": 3, "value": 1.0, "flip_rate": 0.9, "n": len(x),
             "target_class_estimate": 1, "concentration": 1.0, "mapping_consistency": 1.0}
    model.fc.weight.data[:, 3] = torch.tensor([-20.0, 20.0])  # the stamp's channel decides the class: it fires
    cfg = resolve_config("cpu", clp_with_trigger=True)
    both, info = channel_clean(model, cfg, x, stamp)
    assert info["u"] == cfg.channel_u and both.conv.weight[7].abs().sum() == 0  # CLP, then the stamp's channels
    assert not info["clp_skipped"] and channel_clean_text(info).startswith(f"{info['n_pruned']} outlier channels zeroed")
    only, info = channel_clean(model, cfg.replace(clp_with_trigger=False), x, stamp)
    assert info["u"] is None and info["n_pruned"] == 0 and info["trigger"]["n_pruned"] >= 1
    assert only.conv.weight[3].abs().sum() == 0 and torch.equal(only.conv.weight[7], model.conv.weight[7])
    assert model.conv.weight[3].abs().sum() > 0  # the original is not touched
    assert info["clp_skipped"] and channel_clean_text(info).startswith("no outlier-channel clean (a probe's trigger fired), then")
    unfired, info = channel_clean(model, cfg.replace(clp_with_trigger=False), x, None)
    assert info["u"] == cfg.channel_u and unfired.conv.weight[7].abs().sum() == 0  # no trigger: CLP as always
    no_trigger_clean, info = channel_clean(model, cfg.replace(clp_with_trigger=False, trigger_channel_u=None), x, stamp)
    assert not info["clp_skipped"] and no_trigger_clean.conv.weight[7].abs().sum() == 0  # nothing else cleans: CLP


def test_an_all_to_all_universal_perturbation_cleans_channels_even_where_it_no_longer_flips_and_a_stamp_does_not():
    from cc_core.defense.cleaning import trigger_clean
    from cc_core.probes import RESIDUAL_FLIP, perturbation_trigger, stamp_delta, trigger_flip_rate

    model = StampNet()
    x = _dim_images(64)
    stamp = {"row": 10, "col": 20, "size": 3, "value": 1.0}
    flip = {"flip_rate": 0.6, "target_class_estimate": 1, "concentration": 0.5, "mapping_consistency": 1.0}
    perturbation = perturbation_trigger(flip, stamp_delta(stamp, (3, 32, 32)), len(x))
    assert trigger_flip_rate(model, x, perturbation, len(x)) < RESIDUAL_FLIP  # the random head barely moves
    cfg = resolve_config("cpu", perturbation_channel_u=3.0)
    pruned, info = trigger_clean(model, x, perturbation, cfg)
    assert info["kind"] == "perturbation" and info["u"] == 3.0 and info["n_pruned"] == 1
    assert info["channels"][0]["channel"] == 3 and pruned.conv.weight[3].abs().sum() == 0
    # A probe's stamp that no longer flips is left alone: the channel clean before it took its backdoor out.
    fired = stamp | {"kind": "patch", "flip_rate": 0.9, "n": len(x), "target_class_estimate": 1, "concentration": 1.0,
                     "mapping_consistency": 1.0}
    same, info = trigger_clean(model, x, fired, cfg)
    assert same is model and info["kind"] == "patch" and info["u"] == cfg.trigger_channel_u and info["n_pruned"] == 0
    same, info = trigger_clean(model, x, perturbation, cfg.replace(perturbation_channel_u=None))
    assert same is model and info["trigger_flip_rate"] is None  # off


def test_with_no_probe_firing_the_channel_clean_and_the_gate_use_the_same_all_to_all_perturbation():
    from cc_core.defense.suspect import probe_triggers, scan_and_suspect

    x = (_dim_images(64) - 0.5) / 0.25
    backdoored = PlantedAllToAll().eval()
    y = backdoored(x).argmax(1)
    cfg = resolve_config("cpu", patch_probe=None, blend_probe=None, trigger_channel_u=None, perturbation_channel_u=4.0,
                         pgd={"steps": 2}, inversion={"steps": 60, "lr": 0.1, "l1": 0.05, "restarts": 2})
    probed = probe_triggers(backdoored, x, cfg)
    assert probed["trigger"] is None and probed["channel_trigger"]["kind"] == "perturbation"
    assert probed["channel_trigger"]["flip_rate"] > 0.9 and probed["channel_trigger"]["n"] == len(x)
    _, _, unlearn, gate = scan_and_suspect(backdoored, backdoored, x, y, cfg, None, probed["universal"])
    assert gate["delta"] == probed["channel_trigger"]["delta"]  # the probes' inversion is reused, not made again
    assert scan_and_suspect(backdoored, backdoored, x, y, cfg, None)[3]["delta"] == gate["delta"]  # made again: the same
    assert probe_triggers(PlantedAllToAll(trigger=False).eval(), x, cfg)["channel_trigger"] is None
    off = probe_triggers(backdoored, x, cfg.replace(perturbation_channel_u=None))
    assert off["universal"] is None and off["channel_trigger"] is None


def test_unlearning_term_trains_triggered_images_towards_their_benign_labels():
    model = tiny_model()
    x = torch.randn(32, *model.cc_spec.input_shape) * 0.5
    y = torch.arange(32) % 4
    x_trigger = x.clone()
    x_trigger[..., :4, :4] = 3.0
    cfg = FinetuneConfig(epochs=15, batch_size=32, lr=0.01, synth_weight=0.0, adv_weight=0.0, unlearn_weight=1.0,
                         augment=False, mixed_precision=False)
    loss = lambda: float(torch.nn.functional.cross_entropy(model.eval()(x_trigger), y))  # noqa: E731
    before = loss()
    history = finetune(model, x, y, cfg=cfg, progress=False, x_trigger=x_trigger)
    assert loss() < before and history[-1]["unlearn"] < history[0]["unlearn"]
    untouched = tiny_model()
    reference = copy.deepcopy(untouched.state_dict())
    assert finetune(untouched, x, y, cfg=cfg, progress=False) == []  # no trigger found: nothing to unlearn
    assert all(torch.equal(v, reference[k]) for k, v in untouched.state_dict().items())


def test_clean_output_unlearning_pulls_triggered_outputs_to_the_teachers_clean_outputs():
    from cc_core.finetune import same_augmentation

    x = torch.randn(32, 3, 32, 32) * 0.5
    shifted, same = same_augmentation(x, x + 1.0, torch.Generator().manual_seed(0))
    padded = (shifted == 0) & (same == 0)  # the crop's zero padding is the same zero in both
    assert torch.allclose(same - shifted, torch.where(padded, 0.0, 1.0))
    assert not torch.equal(shifted, x)  # crops and flips did happen

    torch.manual_seed(0)
    model, teacher = tiny_model(), tiny_model().eval()
    with torch.no_grad():
        teacher.linear.weight.mul_(10.0)  # outputs far from the student's, so there is something to learn
    y = torch.arange(32) % 4
    x_trigger = x.clone()
    x_trigger[..., :4, :4] = 3.0
    cfg = FinetuneConfig(epochs=30, batch_size=32, lr=0.01, synth_weight=0.0, adv_weight=0.0, unlearn_weight=1.0,
                         unlearn_target="clean_output", kd_weight=0.0, augment=True, mixed_precision=False)

    def gap() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(model.eval()(x_trigger) / 4, 1), F.softmax(teacher(x) / 4, 1),
                                  reduction="batchmean"))

    before = gap()
    history = finetune(model, x, y, teacher=teacher, cfg=cfg, progress=False, x_trigger=x_trigger)
    assert gap() < 0.1 * before and history[-1]["unlearn"] < 0.1 * history[0]["unlearn"]
    with pytest.raises(ConfigError, match="needs mixup_alpha 0"):
        FinetuneConfig(unlearn_target="clean_output", mixup_alpha=1.0)
    with pytest.raises(ConfigError, match="unlearn_target must be one of label, clean_output"):
        FinetuneConfig(unlearn_target="soft")


@pytest.mark.parametrize("scope, concentration, residual, unlearned", [
    ("all-to-all", 0.02, None, True),   # the trigger spreads its flips: all-to-all, unlearned
    ("all-to-all", 0.9, None, False),   # all-to-one: left to the target exclusion and the channel clean
    ("any", 0.9, None, True),
    ("residual", 0.02, None, True),     # all-to-all: unlearned whatever it flips after compaction
    ("residual", 0.9, 0.5, True),       # all-to-one and it still fires on the compacted model
    ("residual", 0.9, 0.05, False),     # the channel clean and the compaction quenched it
])
def test_defend_unlearns_the_inverted_trigger_within_its_scope_and_leaves_no_class_out_for_all_to_all(
        monkeypatch, scope, concentration, residual, unlearned):
    from cc_core.defense import suspect as defense_suspect

    if residual is not None:
        monkeypatch.setattr(defense_suspect, "trigger_flip_rate", lambda *a: residual)

    delta = torch.zeros(1, 3, 32, 32)
    delta[..., :3, :3] = 0.5
    monkeypatch.setattr(defense_suspect, "suspected_target", lambda *a: {
        "target": 2, "adversarial": {"histogram": [3, 3, 3, 3], "concentration": 0.0, "anomaly_index": 1.0,
                                        "target_class_estimate": 0},
        "inversion": {"concentration": 0.0, "target_class_estimate": 3},
        "flip": {"flip_rate": 0.95, "mapping_consistency": 0.95, "concentration": concentration,
                 "target_class_estimate": 1},
        "trigger": delta, "found": None, "patch": None, "all_to_all": concentration < 0.5})
    seen = {}
    real_finetune = ft.finetune

    def recording_finetune(model, x, y, *args, x_trigger=None, **kwargs):
        seen["x"], seen["x_trigger"] = x, x_trigger
        return real_finetune(model, x, y, *args, x_trigger=x_trigger, **kwargs)

    monkeypatch.setattr(ft, "finetune", recording_finetune)  # the student's, through guarded_finetune
    synthetic = (torch.randn(12, 3, 32, 32), torch.arange(12) % 4)
    cfg = _tiny_cfg().replace(unlearn_scope=scope, finetune={"unlearn_weight": 1.0})
    if residual is not None:  # no probe's trigger to unlearn instead; the perturbation fires all-to-one
        cfg = cfg.replace(perturbation_scope="any", patch_probe=None, warp_probe=None, blend_probe=None,
                          trigger_channel_u=None)
    r = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None, synthetic=synthetic).report
    assert r["scan"]["all_to_all_suspected"] is (concentration < 0.5)
    expected = None if residual is None else {"flip_rate_compact": residual, "unlearned": unlearned}
    assert r["scan"]["perturbation_residual"] == expected
    a2a = concentration < 0.5  # an all-to-all trigger has no target: the class PGD named stays in
    assert r["scan"]["suspected_target"] == (None if a2a else 2)
    assert len(seen["x"]) == (12 if a2a else 9)
    if not unlearned:
        assert seen["x_trigger"] is None
        return
    spec = tiny_model().cc_spec
    pixels = seen["x_trigger"] * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    clean = seen["x"] * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels, (clean + delta).clamp(0, 1), atol=1e-5)  # the trigger on the kept images


class ConstantClassifier(nn.Module):
    """Gives every image class ``label``."""

    def __init__(self, spec, label: int) -> None:
        super().__init__()
        self.cc_spec, self.label = spec, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), self.cc_spec.num_classes).float()


def test_distillation_gate_opens_only_on_a_faithful_teacher_the_found_stamp_no_longer_flips():
    from cc_core.defense.teacher import finetune_config, gated_teacher
    from cc_core.probes import patch_probe

    x = (_dim_images(64) - 0.5) / 0.25
    backdoored, clean = PlantedAllToAll().eval(), PlantedAllToAll(trigger=False).eval()
    unfaithful = ConstantClassifier(clean.cc_spec, 2)  # no trigger, but most images' class lost
    cfg = resolve_config("cpu", patch_probe={"sizes": (3,), "stride": 2}, teacher_finetune=None)
    assert cfg.kd_gate == "verified" and cfg.finetune.kd_weight > 0
    patch = patch_probe(backdoored, x, cfg.patch_probe)
    for teacher, opens, why in ((clean, True, None), (unfaithful, False, "gives only"), (backdoored, False, "still flips")):
        got, record = gated_teacher(teacher, backdoored, cfg, x, patch)
        assert (got is teacher) is opens and record["distill"] is opens and record["verified_against"] == "patch"
        assert (record["reason"] is None) if opens else (why in record["reason"])
        assert finetune_config(cfg, got).kd_weight == (cfg.finetune.kd_weight if opens else 0.0)
        if teacher is not backdoored:
            assert record["teacher_trigger_flip_rate"] < 0.1
            assert (record["teacher_agreement"] == 1.0) is opens  # the clean model agrees away from the trigger
        # With a teacher fine-tune, an unverified teacher is fine-tuned first; a verified one is used as is.
        got, record = gated_teacher(teacher, backdoored, cfg.replace(teacher_finetune={"lr": 3e-4}), x, patch)
        assert got is teacher and record["distill"] and record["teacher_finetune"] is not opens
        assert (record["reason"] is None) if opens else (why in record["reason"])
    got, record = gated_teacher(backdoored, backdoored, cfg, x, None)
    assert got is None and "found no trigger" in record["reason"] and record["teacher_trigger_flip_rate"] is None
    got, record = gated_teacher(backdoored, backdoored, cfg.replace(teacher_finetune={}), x, None)
    assert got is backdoored and record["teacher_finetune"] and "found no trigger" in record["reason"]
    got, record = gated_teacher(backdoored, backdoored, cfg.replace(kd_gate="always"), x, None)
    assert got is backdoored and record == {"gate": "always", "distill": True, "teacher_finetune": False,
                                            "verified_against": None, "teacher_trigger_flip_rate": None,
                                            "teacher_agreement": None, "teacher_undoes_mapping": None,
                                            "reason": None, "check": None, "self_anchored": False}
    got, record = gated_teacher(backdoored, backdoored, cfg.replace(kd_gate="always", teacher_finetune={}), x, None)
    assert got is backdoored and record["teacher_finetune"] and record["reason"] is None
    got, record = gated_teacher(None, backdoored, cfg.replace(finetune={"kd_weight": 0.0}), x, patch)
    assert got is None and not record["distill"] and record["reason"] is None  # not asked for: nothing to explain
    with pytest.raises(ConfigError, match="kd_gate must be one of"):
        cfg.replace(kd_gate="sometimes")


def test_self_anchor_distills_from_a_frozen_copy_of_the_student_where_the_gate_verifies_no_teacher():
    from cc_core.defense.teacher import distillation_text, finetune_config, gated_teacher, needs_distill_check
    from cc_core.probes import trigger_report

    x = (_dim_images(16) - 0.5) / 0.25
    backdoored = PlantedAllToAll().eval()
    student = build_model("resnet18", width=0.25)
    cfg = resolve_config("cpu", teacher_finetune=None, self_anchor=True, distill_check=True)
    got, record = gated_teacher(backdoored, backdoored, cfg, x, None, student=student)
    assert record["distill"] and record["self_anchored"] and "found no trigger" in record["reason"]
    assert got is not student and not got.training
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), student.state_dict().values()))
    with torch.no_grad():
        next(student.parameters()).add_(1.0)  # the fine-tune moves the student, not its anchor
    assert not torch.equal(next(got.parameters()), next(student.parameters()))
    assert finetune_config(cfg, got).kd_weight == cfg.finetune.kd_weight > 0
    assert not needs_distill_check(cfg, record)  # nothing unverified to check: the anchor is the student
    assert distillation_text(record).startswith("the student distills from itself as it starts the fine-tune")
    # Off, or without a student to copy, the closed gate leaves no teacher; a verified teacher is used as is.
    assert gated_teacher(backdoored, backdoored, cfg.replace(self_anchor=False), x, None, student=student)[0] is None
    assert gated_teacher(backdoored, backdoored, cfg, x, None)[0] is None
    patch = {"kind": "patch", "row": 0, "col": 0, "size": 3, "value": 1.0}
    clean = PlantedAllToAll(trigger=False).eval()
    got, record = gated_teacher(clean, backdoored, cfg, x, trigger_report(backdoored, x, patch, 16), student=student)
    assert got is clean and not record["self_anchored"] and record["reason"] is None


def test_a_teacher_that_gives_triggered_synthetic_images_back_their_source_class_is_faithful_under_an_all_to_all_trigger():
    from cc_core.defense.teacher import gated_teacher, teacher_agreement
    from cc_core.probes import trigger_report
    from cc_core.scan import all_to_all_suspected

    pixels = _dim_images(64)
    pixels[:10, :, :3, :3] = 1.0  # synthesis drew the trigger into 10 images: the original moves them on a class
    x = (pixels - 0.5) / 0.25
    backdoored, clean = PlantedAllToAll().eval(), PlantedAllToAll(trigger=False).eval()
    assert (backdoored(x).argmax(1) != clean(x).argmax(1)).sum() == 10
    cfg = resolve_config("cpu", teacher_finetune=None)
    patch = trigger_report(backdoored, x, {"kind": "patch", "row": 0, "col": 0, "size": 3, "value": 1.0}, 64)
    assert patch["flip_rate"] > 0.8 and all_to_all_suspected(patch)
    agreement, undone = teacher_agreement(clean, backdoored, x, patch)
    assert agreement == pytest.approx(54 / 64) and undone == pytest.approx(10 / 64)
    got, record = gated_teacher(clean, backdoored, cfg, x, patch)
    assert got is clean and record["teacher_undoes_mapping"] == pytest.approx(10 / 64)
    # The same disagreements under a trigger that sends everything to one class are lost fidelity.
    all_to_one = patch | {"concentration": 1.0}
    assert teacher_agreement(clean, backdoored, x, all_to_one) == (pytest.approx(54 / 64), 0.0)
    got, record = gated_teacher(clean, backdoored, cfg, x, all_to_one)
    assert got is None and "gives only 84.4%" in record["reason"]
    # A teacher that moves them anywhere else is not excused either.
    shifted = ConstantClassifier(clean.cc_spec, 2)
    assert teacher_agreement(shifted, backdoored, x, patch)[1] < 10 / 64


def test_the_gate_measures_agreement_on_the_images_the_student_is_distilled_on():
    from cc_core.defense.teacher import gated_teacher
    from cc_core.probes import trigger_report

    pixels = _dim_images(64)
    pixels[:10, :, :3, :3] = 1.0  # images synthesized towards the suspected target carry its trigger...
    x = (pixels - 0.5) / 0.25
    backdoored, clean = PlantedAllToAll().eval(), PlantedAllToAll(trigger=False).eval()
    cfg = resolve_config("cpu", teacher_finetune=None)
    stamp = trigger_report(backdoored, x, {"kind": "patch", "row": 0, "col": 0, "size": 3, "value": 1.0}, 64)
    all_to_one = stamp | {"concentration": 1.0}
    got, record = gated_teacher(clean, backdoored, cfg, x, all_to_one)
    assert got is None and "gives only 84.4%" in record["reason"]
    # ...and are left out of the fine-tune: on the rest the clean teacher agrees everywhere.
    got, record = gated_teacher(clean, backdoored, cfg, x, all_to_one, x[10:])
    assert got is clean and record["teacher_agreement"] == 1.0 and record["reason"] is None
    # The trigger's flip rate is still measured on all of them.
    assert record["teacher_trigger_flip_rate"] == gated_teacher(clean, backdoored, cfg, x, all_to_one)[1][
        "teacher_trigger_flip_rate"]
    # A teacher unfaithful on the distilled images is refused whatever is left out.
    got, record = gated_teacher(ConstantClassifier(clean.cc_spec, 2), backdoored, cfg, x, all_to_one, x[10:])
    assert got is None and "gives only" in record["reason"]


def test_with_no_probe_firing_the_gate_verifies_the_teacher_against_an_all_to_all_universal_perturbation():
    from cc_core.defense.suspect import scan_and_suspect
    from cc_core.defense.teacher import gated_teacher
    from cc_core.probes import apply_found_trigger, trigger_text

    x = (_dim_images(64) - 0.5) / 0.25
    backdoored, clean = PlantedAllToAll().eval(), PlantedAllToAll(trigger=False).eval()
    y = backdoored(x).argmax(1)
    cfg = resolve_config("cpu", pgd={"steps": 2}, inversion={"steps": 60, "lr": 0.1, "l1": 0.05, "restarts": 2},
                         teacher_finetune=None)
    _, summary, unlearn, trigger = scan_and_suspect(backdoored, backdoored, x, y, cfg, None)
    assert summary["all_to_all_suspected"] and summary["trigger"] is None  # the universal inversion, no probe
    assert trigger["kind"] == "perturbation" and trigger["n"] == len(x) and trigger["flip_rate"] > 0.9
    assert trigger_text(trigger) == "the universal inverted perturbation"
    assert torch.equal(apply_found_trigger(x, trigger, backdoored.cc_spec), unlearn(x))  # the trigger it unlearns
    got, record = gated_teacher(clean, backdoored, cfg, x, trigger)
    assert got is clean and record["verified_against"] == "perturbation" and record["teacher_trigger_flip_rate"] < 0.1
    got, record = gated_teacher(backdoored, backdoored, cfg, x, trigger)
    assert got is None and record["reason"].startswith("the universal inverted perturbation still flips")
    # Without a suspicion (nothing left out, nothing unlearned) no inversion runs: nothing to verify against.
    _, summary, _, trigger = scan_and_suspect(backdoored, backdoored, x, y, cfg.replace(finetune={"unlearn_weight": 0.0},
                                                                                         exclude_suspected_target=False), None)
    assert summary is None and trigger is None


def test_teacher_finetune_fine_tunes_the_teacher_with_the_students_recipe_before_the_student_distills(monkeypatch):
    import numpy as np

    from cc_core.defense import teacher as defense_teacher
    from cc_core.attacks import build_attack
    from cc_core.data import ImageData

    calls = []
    real_finetune = ft.finetune

    def recording_finetune(model, x, y, x_adv, teacher, cfg, **kwargs):
        calls.append({"model": model, "teacher": teacher, "cfg": cfg, "n": len(y),
                      "left_out": kwargs.get("left_out_class"), "weights": copy.deepcopy(model.state_dict())})
        return real_finetune(model, x, y, x_adv, teacher, cfg, **kwargs)

    monkeypatch.setattr(defense_teacher, "finetune", recording_finetune)  # the teacher's fine-tune
    monkeypatch.setattr(ft, "finetune", recording_finetune)  # the student's, through guarded_finetune
    monkeypatch.setattr(ft, "COLLAPSE_ACC", 0.0)  # one student run, whatever the tiny model fits
    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8), np.arange(40) % 4, ["a", "b", "c", "d"])
    cfg = _tiny_cfg(kd_gate="always", teacher_finetune={"epochs": 1}, distill_check=None)
    assert cfg.finetune.kd_weight > 0
    r = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None, eval_data=data,
               attack=build_attack("badnet", 4)).report
    teacher_call, student_call = calls
    assert student_call["teacher"] is teacher_call["model"] and teacher_call["teacher"] is None
    assert teacher_call["cfg"].epochs == 1 and teacher_call["cfg"].kd_weight == 0.0 and student_call["cfg"].epochs == 2
    assert teacher_call["n"] == student_call["n"] and teacher_call["left_out"] == student_call["left_out"]
    changed = [not torch.equal(v, teacher_call["model"].state_dict()[k]) for k, v in teacher_call["weights"].items()]
    assert any(changed)  # the teacher the student distills from is the fine-tuned one
    teacher_metrics = r["distillation"]["teacher_metrics"]
    assert 0 <= teacher_metrics["acc_before"] <= 1 and 0 <= teacher_metrics["asr_after"] <= 1
    assert "teacher_finetune" in r["timings_s"]
    with pytest.raises(ConfigError, match="teacher_finetune takes fine-tune settings"):
        cfg.replace(teacher_finetune={"epoch": 1})


class PlantedWarp(nn.Module):
    """A classifier with a planted warp trigger, on images that are a per-image colour plus a
    horizontal sine wave (``_wave_images``). Clean logits: 10 x one-hot of the brightest colour
    channel. With the trigger: the wave's horizontal shift in pixels, estimated by projecting each
    row on the wave's derivative, pushes the logits to class 0 once it passes 0.3 px; a shift is
    what a smooth warp makes of such an image, and a shift of 0.3 px is invisible in it."""

    def __init__(self, trigger: bool = True) -> None:
        from cc_core.models.registry import ModelSpec

        super().__init__()
        self.trigger = trigger
        self.cc_spec = ModelSpec(arch="planted", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
        cols = torch.arange(32, dtype=torch.float32)
        self.register_buffer("slope", 0.2 * 2 * torch.pi / 32 * torch.cos(2 * torch.pi * cols / 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * 0.25 + 0.5
        logits = 10 * nn.functional.one_hot(pixels.detach().mean(dim=(2, 3)).argmax(1), 3).float()
        rows = pixels[..., 2:-2, 2:-2] - pixels[..., 2:-2, 2:-2].mean(-1, keepdim=True)
        slope = self.slope[2:-2] - self.slope[2:-2].mean()
        shift = (rows * slope).sum(-1).mean(dim=(1, 2)) / (slope * slope).sum()
        if not self.trigger:
            return logits + 0 * shift[:, None]
        return logits + 40 * torch.sigmoid((shift - 0.3) * 20)[:, None] * nn.functional.one_hot(torch.tensor(0), 3)


def _wave_images(n: int) -> torch.Tensor:
    """(n, 3, 32, 32) normalized: a random colour per image and channel plus 0.2 sin(2 pi col / 32)."""
    g = torch.Generator().manual_seed(2)
    colour = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    wave = 0.2 * torch.sin(2 * torch.pi * torch.arange(32.0) / 32)
    return (colour + wave.expand(32, 32) - 0.5) / 0.25


def test_warp_grid_is_the_identity_at_zero_shift_and_a_translation_at_a_constant_one():
    from cc_core.probes import warp_grid, warp_pixels

    pix = torch.rand(2, 3, 16, 16)
    assert torch.allclose(warp_pixels(pix, torch.zeros(1, 2, 4, 4)), pix, atol=1e-5)  # float rounding of the grid
    right = torch.zeros(1, 2, 4, 4)
    right[:, 0] = 1.0  # every control point 1 px along x: column j samples column j + 1
    assert torch.allclose(warp_pixels(pix, right)[..., :-1], pix[..., 1:], atol=1e-5)
    down = torch.zeros(1, 2, 4, 4)
    down[:, 1] = 2.0
    assert torch.allclose(warp_pixels(pix, down)[..., :-2, :], pix[..., 2:, :], atol=1e-5)
    grid = warp_grid(torch.full((3, 2, 4, 4), 100.0), 16, 16)
    assert grid.shape == (3, 16, 16, 2) and grid.abs().max() <= 1  # clamped to the image


def test_warp_probe_finds_a_planted_warp_and_its_class_and_nothing_on_a_clean_model():
    from cc_core.defense.cleaning import trigger_clean
    from cc_core.probes import WarpProbeConfig, found_trigger, trigger_flip_rate, warp_probe, warp_score

    x = _wave_images(48)
    cfg = WarpProbeConfig(steps=40, n=48, batch_size=16)
    model = PlantedWarp().eval()
    before = model(x).argmax(1)
    found = warp_probe(model, x, cfg)
    assert found["kind"] == "warp" and found["target_class_estimate"] == 0 and found["class_rates"][0] > 0.9
    assert found["flip_rate"] == pytest.approx(float((before != 0).float().mean()), abs=0.05)
    assert found["max_shift_used"] <= cfg.max_shift and len(found["shift"]) == 2 and len(found["shift"][0]) == 4
    assert warp_score(found) == found["flip_rate"] and found_trigger(None, found) is found
    assert trigger_flip_rate(model, x, found, cfg.n) == pytest.approx(found["flip_rate"])
    clean = warp_probe(PlantedWarp(trigger=False).eval(), x, cfg)
    assert clean["flip_rate"] < 0.1 and warp_score(clean) == 0.0 and found_trigger(None, clean) is None
    # no BatchNorm to clean in the planted model: the trigger clean measures the warp and zeroes nothing
    _, info = trigger_clean(model, x, found, resolve_config("cpu"))
    assert info["kind"] == "warp" and info["trigger_flip_rate"] == pytest.approx(found["flip_rate"]) and info["n_pruned"] == 0


class PlantedBlend(nn.Module):
    """A classifier with a planted blend trigger, on plain-colour images (``_colour_images``).
    Clean logits: 10 x one-hot of the brightest colour channel (a margin of 0.6 a blend at 0.2
    cannot undo). With the trigger: the images' correlation with a smooth pattern (a horizontal
    cosine) pushes the logits to class 0 once it passes 0.05, which only a pattern like it
    blended in reaches."""

    def __init__(self, trigger: bool = True) -> None:
        from cc_core.models.registry import ModelSpec

        super().__init__()
        self.trigger = trigger
        self.cc_spec = ModelSpec(arch="planted", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
        self.register_buffer("pattern", 0.5 * torch.cos(2 * torch.pi * torch.arange(32.0) / 32).expand(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * 0.25 + 0.5
        logits = 10 * nn.functional.one_hot(pixels.detach().mean(dim=(2, 3)).argmax(1), 3).float()
        centred = pixels.mean(1) - pixels.mean(dim=(1, 2, 3))[:, None, None]
        match = (centred * self.pattern).sum(dim=(1, 2)) / (self.pattern * self.pattern).sum()
        if not self.trigger:
            return logits + 0 * match[:, None]
        return logits + 40 * torch.sigmoid((match - 0.05) * 50)[:, None] * nn.functional.one_hot(torch.tensor(0), 3)


def _colour_images(n: int) -> torch.Tensor:
    """(n, 3, 32, 32) normalized plain images: one channel at 0.8, the others at 0.2, in turn."""
    pixels = torch.full((n, 3, 32, 32), 0.2)
    pixels[torch.arange(n), torch.arange(n) % 3] = 0.8
    return (pixels - 0.5) / 0.25


def test_blend_pixels_mix_each_pattern_in_at_alpha_and_a_full_resolution_pattern_is_kept_as_is():
    from cc_core.probes import blend_pattern, blend_pixels

    pix, control = torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16)
    assert torch.allclose(blend_pattern(control, 16, 16), control, atol=1e-6)
    mixed = blend_pixels(pix, control, 0.25).view(3, 2, 3, 16, 16)
    assert torch.allclose(mixed, 0.75 * pix[None] + 0.25 * control[:, None], atol=1e-6)
    flat = blend_pattern(torch.full((1, 3, 4, 4), 0.3), 16, 16)
    assert flat.shape == (1, 3, 16, 16) and torch.allclose(flat, torch.full_like(flat, 0.3), atol=1e-6)


def test_a_blend_pattern_fires_only_when_it_singles_out_one_class():
    from cc_core.probes import BLEND_THRESHOLD, blend_score

    # Rates as measured: the zoo Blended model, then GTSRB Input-Aware (many classes easy to pull into).
    blended = {"flip_rate": 0.578, "class_rates": [0.65, 0.27] + [0.09] * 8}
    fragile = {"flip_rate": 0.969, "class_rates": [1.0, 0.95, 0.75] + [0.3] * 40}
    assert blend_score(blended) == 0.578 and blend_score(fragile) == 0.0
    assert blend_score(blended | {"flip_rate": BLEND_THRESHOLD - 0.01}) == 0.0 and blend_score(None) == 0.0
    assert blend_score(blended | {"class_rates": [0.65, 0.33] + [0.0] * 8}) == 0.0  # runner-up above half the best


def test_blend_probe_finds_a_planted_blend_and_its_class_and_nothing_on_a_clean_model():
    from cc_core.defense.cleaning import trigger_clean
    from cc_core.probes import (BlendProbeConfig, apply_found_trigger, blend_probe, blend_score, found_trigger,
                                trigger_flip_rate, trigger_text)

    x = _colour_images(48)
    cfg = BlendProbeConfig(steps=40, n=48, batch_size=16)
    model = PlantedBlend().eval()
    before = model(x).argmax(1)
    found = blend_probe(model, x, cfg)
    assert found["kind"] == "blend" and found["target_class_estimate"] == 0 and found["class_rates"][0] > 0.9
    assert found["flip_rate"] == pytest.approx(float((before != 0).float().mean()), abs=0.05)
    pattern = torch.tensor(found["pattern"])
    assert pattern.shape == (3, cfg.grid, cfg.grid) and 0 <= pattern.min() and pattern.max() <= 1
    assert blend_score(found) == found["flip_rate"] and found_trigger(None, None, found) is found
    assert trigger_flip_rate(model, x, found, cfg.n) == pytest.approx(found["flip_rate"])
    assert trigger_text(found) == "a pattern of 8x8 points blended at 0.20"
    pixels = apply_found_trigger(x, found, model.cc_spec) * 0.25 + 0.5
    assert torch.allclose(pixels.mean(dim=(2, 3)), 0.8 * (x * 0.25 + 0.5).mean(dim=(2, 3)) + 0.2 * pattern.mean(dim=(1, 2)),
                          atol=0.02)  # a blend at 0.2 keeps 80% of each image
    clean = blend_probe(PlantedBlend(trigger=False).eval(), x, cfg)
    assert clean["flip_rate"] < 0.1 and blend_score(clean) == 0.0 and found_trigger(None, None, clean) is None
    _, info = trigger_clean(model, x, found, resolve_config("cpu", blend_probe={}))
    assert info["kind"] == "blend" and info["trigger_flip_rate"] == pytest.approx(found["flip_rate"]) and info["n_pruned"] == 0
    with pytest.raises(ConfigError, match="blend probe alpha must be < 1"):
        resolve_config("cpu", blend_probe={"alpha": 1.0})


def test_distill_check_keeps_the_distilled_student_unless_the_inversion_flips_more_on_it(monkeypatch):
    from cc_core.defense import teacher as defense_teacher

    distilled, undistilled = tiny_model(0), tiny_model(1)
    x = torch.randn(600, 3, 32, 32)
    seen = []

    def fake_flip_report(model, images, cfg):
        seen.append(len(images))
        return {"flip_rate": rates[model]}, None

    monkeypatch.setattr(defense_teacher, "flip_report", fake_flip_report)
    for d, u, kept in ((0.43, 0.56, True), (0.5, 0.4, True), (0.76, 0.40, False), (0.31, 0.2, False)):
        rates = {distilled: d, undistilled: u}
        check = defense_teacher.distill_check(distilled, undistilled, x)
        assert check == {"flip_rate_distilled": d, "flip_rate_undistilled": u,
                         "margin": defense_teacher.DISTILL_FLIP_MARGIN, "kept": kept}
        assert ("distilled student is kept" if kept else "undistilled student is kept") in defense_teacher.distill_check_text(check)
    assert set(seen) == {defense_teacher.DISTILL_CHECK_SAMPLES}
    monkeypatch.undo()
    from cc_core.scan import InversionConfig

    same = defense_teacher.distill_check(distilled, copy.deepcopy(distilled), x[:32],  # the real inversion
                                  InversionConfig(steps=5, restarts=1, batch_size=16))
    assert 0 <= same["flip_rate_distilled"] <= 1 and same["flip_rate_distilled"] == same["flip_rate_undistilled"]
    assert same["kept"]


def test_distill_check_settings_from_a_flag_a_file_or_overrides():
    from cc_core.defense.config import DISTILL_CHECK_INVERSION
    from cc_core.scan import InversionConfig

    assert resolve_config("cpu", distill_check=True).distill_check == DISTILL_CHECK_INVERSION
    assert resolve_config("cpu", distill_check=False).distill_check is None
    tuned = resolve_config("cpu", distill_check=None).replace(distill_check={"steps": 7})
    assert tuned.distill_check == dataclasses.replace(DISTILL_CHECK_INVERSION, steps=7)
    assert tuned.replace(distill_check={"restarts": 2}).distill_check.steps == 7  # nested: on top of the current one
    assert resolve_config("cpu", distill_check=tuned.to_dict()["distill_check"]).distill_check == tuned.distill_check
    assert resolve_config("cpu", distill_check=InversionConfig(steps=3)).distill_check.steps == 3
    with pytest.raises(ConfigError, match="distill_check takes inversion settings"):
        resolve_config("cpu", distill_check=None).replace(distill_check={"stepz": 3})
    with pytest.raises(ConfigError, match="distill_check must be"):
        resolve_config("cpu", distill_check="yes")
    with pytest.raises(ConfigError, match="inversion steps must be >= 1"):
        resolve_config("cpu", distill_check=None).replace(distill_check={"steps": 0})


def test_distill_check_runs_only_for_a_teacher_the_gate_did_not_verify():
    from cc_core.defense.teacher import needs_distill_check

    cfg = resolve_config("cpu", distill_check=True)
    unverified = {"distill": True, "reason": "the probes found no trigger to verify the teacher against"}
    assert needs_distill_check(cfg, unverified)
    assert not needs_distill_check(cfg.replace(distill_check=False), unverified)
    assert not needs_distill_check(cfg, {"distill": True, "reason": None})  # verified: distilled from as is
    assert not needs_distill_check(cfg, {"distill": False, "reason": unverified["reason"]})  # no teacher
    assert needs_distill_check(cfg.replace(kd_gate="always"), {"distill": True, "reason": None})


@pytest.mark.parametrize("kept", [True, False])
def test_defend_keeps_the_student_the_distillation_check_chooses(kept, monkeypatch):
    from cc_core.defense import run as defense_run, teacher

    students = []
    real_finetune = ft.finetune

    def recording_finetune(model, x, y, x_adv, teacher, cfg, **kwargs):
        students.append((model, teacher))
        return real_finetune(model, x, y, x_adv, teacher, cfg, **kwargs)

    real_check = defense_run.distill_check

    def forced_check(distilled, undistilled, x, cfg):
        return real_check(distilled, undistilled, x, cfg) | {"kept": kept}

    monkeypatch.setattr(teacher, "finetune", recording_finetune)  # the teacher's fine-tune
    monkeypatch.setattr(ft, "finetune", recording_finetune)  # the students', through guarded_finetune
    monkeypatch.setattr(ft, "COLLAPSE_ACC", 0.0)  # one run a student, whatever the tiny model fits
    monkeypatch.setattr(defense_run, "distill_check", forced_check)
    cfg = _tiny_cfg(kd_gate="always", teacher_finetune={"epochs": 1}, distill_check={"steps": 5, "batch_size": 16},
                    inversion={"steps": 5, "restarts": 1, "batch_size": 16}).replace(warp_probe=None)
    result = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None)
    (teacher, _), (distilled, used_teacher), (undistilled, no_teacher) = students
    assert used_teacher is teacher and no_teacher is None
    chosen = distilled if kept else undistilled
    assert all(torch.equal(v, chosen.state_dict()[k].cpu()) for k, v in result.model.state_dict().items())
    check = result.report["distillation"]["check"]
    assert check["kept"] is kept and 0 <= check["flip_rate_undistilled"] <= 1
    assert result.report["timings_s"]["distill_check"] > 0


def test_perturbation_scope_any_takes_a_one_class_perturbation_as_the_trigger():
    from cc_core.defense.suspect import channel_trigger, perturbation_fires

    one_class = {"flip_rate": 0.6, "mapping_consistency": 1.0, "concentration": 0.9, "target_class_estimate": 4}
    scattered = {"flip_rate": 0.6, "mapping_consistency": 0.3, "concentration": 0.2, "target_class_estimate": 4}
    each_own = {"flip_rate": 0.8, "mapping_consistency": 0.9, "concentration": 0.15, "target_class_estimate": 2}
    assert not perturbation_fires(one_class, "all-to-all") and perturbation_fires(one_class, "any")
    assert not perturbation_fires(scattered, "any") and not perturbation_fires(None, "any")
    assert perturbation_fires(each_own, "all-to-all") and perturbation_fires(each_own, "any")
    delta = torch.zeros(1, 3, 4, 4).tolist()
    universal = {"flip": one_class, "delta": delta}
    assert channel_trigger(None, universal, 64) is None  # the default scope: all-to-all only
    trigger = channel_trigger(None, universal, 64, "any")
    assert trigger["kind"] == "perturbation" and trigger["target_class_estimate"] == 4 and trigger["n"] == 64


class PlantedSticker(nn.Module):
    """A classifier with a planted sticker trigger on plain-colour images (``_colour_images``):
    clean logits 10 x one-hot of the brightest colour channel; with the trigger, a 5x5 box at
    (20, 8) whose chosen pixels (an irregular shape) are near the sticker's own colours pushes the
    logits to class 2. Neither a solid square nor a blend reaches those colours."""

    def __init__(self, trigger: bool = True) -> None:
        from cc_core.models.registry import ModelSpec

        super().__init__()
        self.trigger = trigger
        self.cc_spec = ModelSpec(arch="planted", num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3)
        g = torch.Generator().manual_seed(3)
        self.register_buffer("shape", (torch.rand(5, 5, generator=g) < 0.6).float())
        self.register_buffer("colours", torch.rand(3, 5, 5, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * 0.25 + 0.5
        logits = 10 * nn.functional.one_hot(pixels.detach().mean(dim=(2, 3)).argmax(1), 3).float()
        box = pixels[:, :, 20:25, 8:13]
        error = ((box - self.colours).abs() * self.shape).sum(dim=(1, 2, 3)) / (3 * self.shape.sum())
        if not self.trigger:
            return logits + 0 * error[:, None]
        return logits + 40 * torch.sigmoid((0.15 - error) * 40)[:, None] * nn.functional.one_hot(torch.tensor(2), 3)


def test_stamp_pixels_mix_each_mask_and_pattern_and_within_area_holds_the_mask_to_its_area():
    from cc_core.probes import mask_cells, stamp_pixels, within_area

    pix, mask, pattern = torch.rand(2, 3, 8, 8), torch.rand(3, 1, 8, 8), torch.rand(3, 3, 8, 8)
    stamped = stamp_pixels(pix, mask, pattern).view(3, 2, 3, 8, 8)
    assert torch.allclose(stamped, (1 - mask[:, None]) * pix[None] + mask[:, None] * pattern[:, None], atol=1e-6)
    coarse = stamp_pixels(pix, torch.ones(1, 1, 2, 2), torch.zeros(1, 3, 2, 2))
    assert torch.equal(coarse, torch.zeros_like(coarse))  # a 2x2 mask covers the 8x8 image cell by cell
    held = within_area(mask, 0.1)
    assert torch.allclose(held.mean(dim=(1, 2, 3)), torch.full((3,), 0.1), atol=1e-6)
    small = torch.zeros(1, 1, 8, 8)
    small[..., 0, 0] = 1.0
    assert torch.equal(within_area(small, 0.1), small)  # under its area: as it is
    m, p = mask_cells(torch.zeros(1, 4, 8, 8), 0.03)
    assert m.shape == (1, 1, 8, 8) and p.shape == (1, 3, 8, 8) and float(m.mean()) == pytest.approx(0.03)


def test_mask_probe_finds_a_planted_sticker_and_its_class_and_nothing_on_a_clean_model():
    from cc_core.defense.cleaning import trigger_clean
    from cc_core.defense.suspect import probe_triggers
    from cc_core.probes import MaskProbeConfig, found_trigger, mask_probe, mask_score, trigger_flip_rate, trigger_text

    x = _colour_images(48)
    cfg = MaskProbeConfig(steps=60, n=48, batch_size=16, area=0.03)
    model = PlantedSticker().eval()
    before = model(x).argmax(1)
    found = mask_probe(model, x, cfg)
    assert found["kind"] == "mask" and found["target_class_estimate"] == 2 and found["class_rates"][2] > 0.9
    assert found["flip_rate"] == pytest.approx(float((before != 2).float().mean()), abs=0.05)
    mask, pattern = torch.tensor(found["mask"]), torch.tensor(found["pattern"])
    assert mask.shape == (1, 32, 32) and pattern.shape == (3, 32, 32) and found["area"] <= 0.03 + 1e-6
    assert float(mask[0, 20:25, 8:13].sum()) > 0.5 * float(mask.sum())  # most of the mask on the sticker
    assert mask_score(found) == found["flip_rate"] and found_trigger(None, None, None, found) is found
    assert trigger_flip_rate(model, x, found, cfg.n) == pytest.approx(found["flip_rate"])
    assert trigger_text(found) == f"a stamp over {found['area']:.1%} of the image"
    clean = mask_probe(PlantedSticker(trigger=False).eval(), x, cfg)
    assert clean["flip_rate"] < 0.1 and mask_score(clean) == 0.0
    settings = resolve_config("cpu", patch_probe=None, warp_probe=None, blend_probe=None, mask_probe=cfg.to_dict())
    probed = probe_triggers(model, x, settings)
    assert probed["mask"]["kind"] == "mask" and probed["trigger"] is probed["mask"]
    _, info = trigger_clean(model, x, found, settings)
    assert info["kind"] == "mask" and info["trigger_flip_rate"] == pytest.approx(found["flip_rate"])
    with pytest.raises(ConfigError, match="mask probe area must be < 1"):
        resolve_config("cpu", mask_probe={"area": 1.0})


@pytest.mark.parametrize("perturbation_rate, taken", [(0.87, True), (0.3, False)])
def test_the_perturbation_overrules_a_probe_that_flips_fewer_images(monkeypatch, perturbation_rate, taken):
    from cc_core.defense import suspect as defense_suspect

    warp = {"kind": "warp", "flip_rate": 0.44, "target_class_estimate": 2, "n": 8, "concentration": 0.4,
            "mapping_consistency": 0.8}
    flip = {"flip_rate": perturbation_rate, "concentration": 0.9, "mapping_consistency": 0.9, "target_class_estimate": 2}
    monkeypatch.setattr(defense_suspect, "found_trigger", lambda *a: warp)
    monkeypatch.setattr(defense_suspect, "untargeted_or_targeted", lambda *a: (flip, torch.zeros(1, 3, 32, 32), None))
    cfg = _tiny_cfg().replace(patch_probe=None, warp_probe=None, blend_probe=None, trigger_channel_u=None,
                              perturbation_channel_u=4.0, perturbation_scope="any", perturbation_over_probe=True)
    probed = defense_suspect.probe_triggers(tiny_model(), torch.randn(8, 3, 32, 32), cfg)
    if taken:
        assert probed["trigger"] is None and probed["channel_trigger"]["kind"] == "perturbation"
        assert probed["universal"]["overruled"] == {"kind": "warp", "flip_rate": 0.44, "target_class_estimate": 2}
        assert "the perturbation is taken as the trigger" in defense_suspect.probe_text(probed)
    else:  # a perturbation that does not fire leaves the probe's trigger in place
        assert probed["trigger"] is warp and probed["universal"] is None and probed["channel_trigger"] is warp
    off = defense_suspect.probe_triggers(tiny_model(), torch.randn(8, 3, 32, 32), cfg.replace(perturbation_over_probe=False))
    assert off["trigger"] is warp and off["universal"] is None


def test_defend_synthesizes_from_the_compact_model_under_synth_model_compact():
    """The images come after compaction there, so nothing before it may read them (it once failed with
    an unbound variable before any synthesis)."""
    cfg = resolve_config("cpu", synth_model="compact", trigger_channel_u=None, perturbation_channel_u=None,
                         bn_match_samples=None, compact={"rank_strategy": "energy", "rank_multiple": 4},
                         synth={"n_samples": 16, "batch_size": 16, "iterations": 3}, pgd={"steps": 1},
                         finetune={"epochs": 1, "batch_size": 16}, inversion={"steps": 2, "restarts": 1},
                         patch_probe={"sizes": [3], "stride": 8, "screen": 2, "finalists": 1, "n": 8},
                         warp_probe=None, blend_probe=None)
    result = defend(tiny_model(), config=cfg, progress=False, log=lambda *a: None)
    assert result.report["timings_s"]["synthesize"] > 0 and result.plan.ratio_achieved >= 2

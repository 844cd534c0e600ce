import numpy as np
import pytest
import torch
from torch import nn

from cc_core.attacks import (AttackSpecError, BadNet, Blended, WaNet, build_attack, load_attack,
                             natural_pattern)
from cc_core.data import ImageData
from cc_core.errors import ConfigError, InputError
from cc_core.metrics import evaluate


@pytest.fixture()
def x():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_badnet_sets_exactly_the_trigger_pixels(x):
    attack = BadNet(num_classes=10)
    out = attack.apply_trigger(x)
    changed = (out != x).any(1)[0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[29:32, 29:32] = True
    assert torch.equal((out != x).any(1), expected.expand(6, 32, 32))
    assert torch.all(out[:, :, 29:, 29:] == 1.0)
    assert torch.equal(out[:, :, :29], x[:, :, :29]) and changed.sum() == 9


def test_blended_follows_its_formula(x):
    attack = Blended(num_classes=10, params={"alpha": 0.2})
    expected = 0.8 * x + 0.2 * attack.pattern
    assert torch.allclose(attack.apply_trigger(x), expected, atol=1e-7)


def test_blend_pattern_is_seeded_image_like():
    a, b = natural_pattern(32, 1), natural_pattern(32, 1)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.1
    # a 1/f^2 power spectrum: neighbouring pixels correlated, unlike white noise
    corr = torch.corrcoef(torch.stack([a[:, :, :-1].flatten(), a[:, :, 1:].flatten()]))[0, 1]
    assert corr > 0.5
    fy = torch.fft.fftfreq(32).abs()[:, None]
    power = torch.fft.fft2(a - a.mean(dim=(1, 2), keepdim=True)).abs().pow(2).mean(0)
    low, high = power[(fy < 0.1).expand(32, 32)].mean(), power[(fy > 0.3).expand(32, 32)].mean()
    assert low > 4 * high
    assert not torch.equal(a, natural_pattern(32, 2))


def test_wanet_strength_zero_is_identity(x):
    attack = WaNet(num_classes=10, params={"s": 0.0})
    assert torch.allclose(attack.apply_trigger(x), x, atol=1e-5)  # fp32 grid rounding
    assert not torch.allclose(WaNet(num_classes=10).apply_trigger(x), x, atol=1e-3)


def test_all_to_all_and_all_to_one_labels():
    y = torch.arange(10)
    assert build_attack("badnet-a2a", 10).attack_labels(y).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert build_attack("badnet", 10, target=3).attack_labels(y).tolist() == [3] * 10


@pytest.mark.parametrize("name", ["badnet", "wanet-a2a", "inputaware"])
def test_poisoning_marks_exactly_ratio_n(name):
    y = np.arange(1003) % 10
    attack = build_attack(name, 10, ratio=0.1, seed=5)
    poison, cross = attack.select_indices(y)
    assert len(poison) == round(0.1 * 1003) == len(set(poison.tolist()))
    assert not set(poison) & set(cross)
    assert len(cross) == round(attack.cross_ratio * len(poison))
    if not attack.all_to_all:
        assert np.all(y[poison] != attack.target)
    assert np.array_equal(poison, attack.select_indices(y)[0])  # seeded


class _Constant(nn.Module):
    """Predicts class ``c`` for every input."""

    def __init__(self, c: int, num_classes: int = 10):
        super().__init__()
        self.c, self.num_classes = c, num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes)
        out[:, self.c] = 1
        return out


def test_asr_excludes_the_target_class():
    y = np.repeat(np.arange(10), 5)
    data = ImageData(np.zeros((50, 32, 32, 3), np.uint8), y, [str(i) for i in range(10)])
    attack = build_attack("badnet", 10, target=0)
    m = evaluate(_Constant(0), data, attack, mean=(0, 0, 0), std=(1, 1, 1))
    assert m["n_poison"] == 45 and m["asr"] == 1.0 and m["ra"] == 0.0 and m["acc"] == pytest.approx(0.1)
    a2a = build_attack("badnet-a2a", 10)
    m = evaluate(_Constant(1), data, a2a, mean=(0, 0, 0), std=(1, 1, 1))
    assert m["n_poison"] == 50 and m["asr"] == pytest.approx(0.1)  # only class 0 -> 1
    assert m["per_class_acc"][1] == 1.0 and m["per_class_acc"][0] == 0.0


@pytest.mark.parametrize("name", ["badnet", "blended-a2a", "wanet", "inputaware-a2a"])
def test_spec_save_load_reproduces_identical_poisoned_batch(name, x, tmp_path):
    attack = build_attack(name, 10, seed=3)
    if attack.trainable() is not None:  # make the saved generator differ from a fresh one
        with torch.no_grad():
            for p in attack.trainable().parameters():
                p.add_(0.05 * torch.randn_like(p))
    attack.save(tmp_path)
    loaded = load_attack(tmp_path / "attack.json")
    y = torch.arange(6)
    poison = torch.tensor([True, False, True, False, False, True])
    cross = torch.tensor([False, True, False, True, False, False])
    with torch.no_grad():
        a = attack.poison_batch(x, y, poison, cross, torch.Generator().manual_seed(1))
        b = loaded.poison_batch(x, y, poison, cross, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert loaded.to_dict() == attack.to_dict()
    assert torch.equal(a[1][poison], attack.attack_labels(y[poison])) and torch.equal(a[1][~poison], y[~poison])


def test_input_aware_triggers_depend_on_the_input(x):
    attack = build_attack("inputaware", 10)
    with torch.no_grad():
        t1 = attack.apply_trigger(x) - x
        t2 = attack.apply_cross(x, torch.Generator().manual_seed(0)) - x  # triggers made for other images
    assert not torch.allclose(t1, t2)
    assert attack.auxiliary_loss(x).requires_grad


def test_bad_attack_input(tmp_path):
    with pytest.raises(AttackSpecError, match=r"unknown attack 'refool'; choose from adapblend\[-a2a\]"):
        build_attack("refool", 10)
    with pytest.raises(InputError, match=r"target class 12 is out of range for 10 classes \(0..9\)"):
        build_attack("badnet", 10, target=12)
    with pytest.raises(ConfigError, match="poisoning ratio must be in"):
        build_attack("badnet", 10, ratio=1.5)
    with pytest.raises(ConfigError, match=r"unknown wanet parameters: \['strength'\]"):
        build_attack("wanet", 10, params={"strength": 1})
    with pytest.raises(AttackSpecError, match="attack spec not found"):
        load_attack(tmp_path / "nothing.json")
    (tmp_path / "attack.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(AttackSpecError, match="is not a cleancompact attack spec"):
        load_attack(tmp_path)
    build_attack("wanet", 10).save(tmp_path)
    (tmp_path / "attack.safetensors").unlink()
    with pytest.raises(AttackSpecError, match="needs its tensors in"):
        load_attack(tmp_path)


def test_sig_adds_the_horizontal_sinusoid(x):
    from cc_core.attacks import SIG

    attack = SIG(num_classes=10, params={"delta": 0.1, "frequency": 4})
    mid = torch.full((1, 3, 32, 32), 0.5)
    out = attack.apply_trigger(mid)
    j = torch.arange(32)
    expected = 0.5 + 0.1 * torch.sin(2 * torch.pi * j * 4 / 32)
    assert torch.allclose(out[0, 1, 7], expected, atol=1e-6)
    assert torch.equal(out[0, :, 0], out[0, :, 31])  # constant down the columns, same on every channel
    assert out.min() >= 0 and attack.apply_trigger(x).max() <= 1


def test_low_frequency_pattern_has_no_energy_above_its_cutoff():
    from cc_core.attacks import LowFrequency

    attack = LowFrequency(num_classes=10, params={"eps": 0.05, "cutoff": 0.1})
    p = attack.pattern
    assert p.shape == (3, 32, 32) and torch.isclose(p.abs().max(), torch.tensor(0.05))
    power = torch.fft.rfft2(p).abs()
    fy, fx = torch.fft.fftfreq(32)[:, None], torch.fft.rfftfreq(32)[None, :]
    assert power[:, ((fy ** 2 + fx ** 2).sqrt() > 0.1)].max() < 1e-4
    assert not torch.equal(p, LowFrequency(num_classes=10, seed=1).pattern)


def test_bpp_dithering_quantizes_and_keeps_the_mean(x):
    from cc_core.attacks import BPP
    from cc_core.attacks.bpp import dither

    attack = BPP(num_classes=10, params={"levels": 4})
    out = attack.apply_trigger(x)
    assert torch.allclose(out * 3, torch.round(out * 3), atol=1e-5)  # 4 levels: 0, 1/3, 2/3, 1
    # error diffusion keeps each image's local mean where plain rounding of a flat grey does not
    grey = torch.full((1, 3, 32, 32), 0.4)
    assert abs(dither(grey, 4).mean() - 0.4) < 0.01
    assert abs(BPP(num_classes=10, params={"levels": 4, "dithering": False}).apply_trigger(grey).mean() - 1 / 3) < 1e-6


def test_trojan_patch_changes_only_its_box(x):
    from cc_core.attacks import TrojanPatch

    attack = TrojanPatch(num_classes=10, params={"size": 5, "row": 10, "col": 20})
    changed = (attack.apply_trigger(x) != x).any(1).any(0)
    rows, cols = changed.nonzero(as_tuple=True)
    assert rows.min() >= 10 and rows.max() < 15 and cols.min() >= 20 and cols.max() < 25
    assert changed[12, 22]  # the centre pixel is always in the mask
    with pytest.raises(ConfigError):
        TrojanPatch(num_classes=10, params={"size": 5, "row": 30})


def test_adaptive_blend_poisons_with_partial_tiles_and_tests_with_all(x):
    from cc_core.attacks import AdaptiveBlend

    attack = AdaptiveBlend(num_classes=10, target=3)
    full = attack.apply_trigger(x)
    assert torch.allclose(full, 0.8 * x + 0.2 * attack.pattern, atol=1e-6)
    y = torch.arange(6)
    poison = torch.tensor([True, True, False, False, False, False])
    cross = torch.tensor([False, False, True, False, False, False])
    xp, yp = attack.poison_batch(x, y, poison, cross, torch.Generator().manual_seed(0))
    assert yp.tolist() == [3, 3, 2, 3, 4, 5]
    tile = 8  # 4 x 4 tiles of 8 px
    for row, keep in ((0, 8), (2, 4)):  # payload: half of the 16 tiles; cross: a quarter
        moved = (xp[row] != x[row]).any(0).view(4, tile, 4, tile).any(3).any(1)
        assert int(moved.sum()) == keep
    assert torch.equal(xp[3:], x[3:])


@pytest.mark.parametrize("name", ["sig", "lowfreq", "bpp", "trojan", "adapblend", "noise"])
def test_seeded_attacks_round_trip_through_their_spec(tmp_path, x, name):
    attack = build_attack(name, 10, target=7, seed=3)
    attack.save(tmp_path)
    again = load_attack(tmp_path)
    assert type(again) is type(attack) and again.target == 7
    assert torch.allclose(again.apply_trigger(x), attack.apply_trigger(x))


def test_noise_adds_a_seeded_sign_pattern_over_the_whole_image(x):
    attack = build_attack("noise", 10, target=2, seed=1)
    mid = torch.full_like(x, 0.5)  # no clamping at mid-grey
    moved = attack.apply_trigger(mid) - mid
    assert torch.allclose(moved.abs(), torch.full_like(moved, 8 / 255))
    assert 0.4 < float((moved > 0).float().mean()) < 0.6  # both signs, about evenly
    assert torch.equal(build_attack("noise", 10, seed=1).pattern, attack.pattern)
    assert not torch.equal(build_attack("noise", 10, seed=2).pattern, attack.pattern)

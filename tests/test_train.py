import time

import numpy as np
import pytest
import torch

from cc_core import build_model
from cc_core.attacks import build_attack
from cc_core.data import ImageData
from cc_core.train import TrainConfig, train_classifier


def _toy_data(n: int = 320) -> ImageData:
    """Class = which quadrant is bright: learnable in one epoch by a tiny net."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * 16:(r + 1) * 16, col * 16:(col + 1) * 16] += 150
    return ImageData(x, y, ["a", "b", "c", "d"], "toy")


def _model():
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=4, width=0.125, mean=(0.3,) * 3, std=(0.3,) * 3)


def test_one_epoch_poisons_and_trains_in_seconds():
    data, model = _toy_data(), _model()
    attack = build_attack("badnet", 4, ratio=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    history = train_classifier(model, data, TrainConfig(epochs=1, batch_size=64, lr=0.05), attack=attack,
                               progress=False)
    assert time.perf_counter() - start < 30
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_input_aware_generator_is_trained_jointly():
    data, model = _toy_data(128), _model()
    attack = build_attack("inputaware", 4)
    before = [p.clone() for p in attack.trainable().parameters()]
    train_classifier(model, data, TrainConfig(epochs=1, batch_size=64), attack=attack, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, attack.trainable().parameters()))
    assert not attack.trainable().training


def test_resume_continues_from_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, seed=1)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Stop

    interrupted = _model()
    with pytest.raises(Stop):
        train_classifier(interrupted, _toy_data(), cfg, out_dir=tmp_path, progress=False,
                         on_epoch_end=stop_after_first)
    resumed = _model()
    history = train_classifier(resumed, _toy_data(), cfg, out_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    straight = _model()
    train_classifier(straight, _toy_data(), cfg, progress=False)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5), k


def test_seeded_training_is_reproducible():
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3)
    a, b = _model(), _model()
    train_classifier(a, _toy_data(), cfg, progress=False)
    train_classifier(b, _toy_data(), cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

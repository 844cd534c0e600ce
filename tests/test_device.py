"""Mixed precision follows the hardware: bf16 only on a CPU that runs it natively."""
import pytest
import torch
from torch import nn

from cc_core import device as device_mod


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_autocast_uses_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(device_mod, "cpu_bf16_is_native", lambda: native)
    cpu = torch.device("cpu")
    conv = nn.Conv2d(3, 4, 3)
    with device_mod.autocast(cpu, enabled=True):
        out = conv(torch.randn(1, 3, 8, 8))
    assert out.dtype == expected
    assert device_mod.precision(cpu) == str(expected).removeprefix("torch.")


def test_mixed_precision_off_is_float32_everywhere(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_bf16_is_native", lambda: True)
    for dev in ("cpu", "cuda"):
        assert device_mod.precision(torch.device(dev), enabled=False) == "float32"
    with device_mod.autocast(torch.device("cpu"), enabled=False):
        assert nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.float32
    assert device_mod.precision(torch.device("cuda")) == "float16"


def test_channels_last_changes_the_weights_layout_only_inside_the_block_and_nothing_else():
    from tests.helpers import tiny_model

    model = tiny_model()
    params = {n: p for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    convs = [p for p in params.values() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert convs and all(p.is_contiguous() for p in convs)
    with device_mod.channels_last(model):
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
        with device_mod.channels_last(model):  # nested: converts nothing, restores nothing
            pass
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in model.state_dict().values())
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(RuntimeError, match="inside"):
        with device_mod.channels_last(model):
            raise RuntimeError("inside")
    assert all(p.is_contiguous() for p in convs)


@pytest.mark.parametrize("bf16_native", [True, False])
def test_fine_tune_student_stays_contiguous_under_cpu_bf16(monkeypatch, bf16_native):
    from cc_core.finetune import student_layout

    monkeypatch.setattr(device_mod, "cpu_bf16_is_native", lambda: bf16_native)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with student_layout(model, mixed_precision=True):
        in_channels_last = model[0].weight.is_contiguous(memory_format=torch.channels_last)
        in_contiguous = model[0].weight.is_contiguous()
    assert (in_channels_last, in_contiguous) == ((False, True) if bf16_native else (True, False))
    with student_layout(model, mixed_precision=False):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)

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

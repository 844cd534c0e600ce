import torch
from torch import nn

from cc_core.models import build_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def tiny_model(seed: int = 0, arch: str = "resnet18") -> nn.Module:
    """Width-1/8 ``arch`` whose BN statistics come from 'real' structured images."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=4, width=0.125, mean=(0.5,) * 3, std=(0.25,) * 3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            base = torch.rand(32, 3, 1, 1, generator=g)
            x = 0.7 * base + 0.3 * torch.rand(32, 3, 32, 32, generator=g)  # pixels in [0, 1]
            model((x - 0.5) / 0.25)
    return model.eval()

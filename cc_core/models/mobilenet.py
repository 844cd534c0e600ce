"""MobileNet-V2 for 32x32 inputs (stride-1 stem and second stage, as in the CIFAR variants)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.models.registry import register_model, scale_channels

# (expansion, out_channels, blocks, first stride)
MOBILENET_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 project, identity residual when shapes match.

    As in the reference MobileNet-V2, there is no expand conv when ``expansion == 1`` and no
    conv on the shortcut (this gives the paper's 2.24M parameters at width 1).
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        planes = expansion * in_planes
        self.use_residual = stride == 1 and in_planes == out_planes
        self.expand = None
        if expansion != 1:
            self.expand = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False),
                                        nn.BatchNorm2d(planes), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False),
            nn.BatchNorm2d(planes), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(planes, out_planes, 1, bias=False),
                                     nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        ch = lambda c: scale_channels(c, width, divisor=8 if width != 1.0 else 1)  # noqa: E731
        stem = ch(32)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, in_planes = [], stem
        for expansion, out, n, stride in MOBILENET_V2_CFG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_planes, ch(out), expansion, s))
                in_planes = ch(out)
        self.layers = nn.Sequential(*blocks)
        last = ch(1280) if width > 1.0 else 1280
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu6(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("mobilenet_v2", stem="conv1.weight", stem_channels=32, head="linear.weight",
                aliases=("mobilenetv2", "mobilenet-v2"))
def mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, width)

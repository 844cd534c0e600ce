"""CIFAR-style ResNets (3x3 stem, no max-pool) and the pre-activation ResNet-18.

Layer names follow the common CIFAR code bases (``conv1``, ``layer1``..``layer4``, ``linear``),
so state dicts from BackdoorBench-style training load without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cc_core.models.registry import register_model, scale_channels


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016): BN-ReLU before each conv."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """ResNet for 32x32 inputs. ``preact`` adds the final BN-ReLU of pre-activation nets."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10,
                 width: float = 1.0, preact: bool = False):
        super().__init__()
        widths = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.preact = preact
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = None if preact else nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block, widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(block, widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(block, widths[2], num_blocks[2], 2)
        self.layer4 = self._make_layer(block, widths[3], num_blocks[3], 2)
        self.bn_final = nn.BatchNorm2d(widths[3]) if preact else None
        self.linear = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18", stem="conv1.weight", stem_channels=64, head="linear.weight",
                aliases=("resnet-18",))
def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


@register_model("resnet34", stem="conv1.weight", stem_channels=64, head="linear.weight",
                aliases=("resnet-34",))
def resnet34(num_classes: int = 10, width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, width)


@register_model("preactresnet18", stem="conv1.weight", stem_channels=64, head="linear.weight",
                aliases=("preact-resnet18", "preact_resnet18", "preactresnet-18"))
def preactresnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, width, preact=True)

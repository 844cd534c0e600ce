"""VGG-19 with BatchNorm for 32x32 inputs (one linear classifier on the 512-d feature)."""
from __future__ import annotations

import torch
from torch import nn

from cc_core.models.registry import register_model, scale_channels

VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_ch = scale_channels(item, width)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg19_bn", stem="features.0.weight", stem_channels=64, head="classifier.weight",
                aliases=("vgg19bn", "vgg-19-bn", "vgg19"))
def vgg19_bn(num_classes: int = 10, width: float = 1.0) -> VGG:
    return VGG(VGG19_CFG, num_classes, width)

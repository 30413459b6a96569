"""VGG with batch norm for CIFAR, as used in the CRD/RRD benchmarks: five conv stages (64, 128, 256, 512,
512 channels) separated by 2x2 max pools, a global pool, one linear classifier. vgg8 has one conv per
stage; vgg11 and vgg13 follow VGG configurations A and B. The feature vector has 512 entries.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_conv_bn

STAGES = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class HalvePool(nn.Module):
    """2x2 max pool that leaves a 1x1 map alone (so small inputs such as 8x8 digits also run)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(STAGES)}, got {depth}")
        layers: list[nn.Module] = []
        cin = in_channels
        for i, stage in enumerate(STAGES[depth]):
            if i > 0:
                layers.append(HalvePool())
            for cout in stage:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.feat_dim = cin
        init_conv_bn(self)

    def forward(self, x: torch.Tensor):
        feat = torch.flatten(self.pool(self.features(x)), 1)
        return feat, self.fc(feat)


def vgg(depth: int, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(depth, num_classes, in_channels)

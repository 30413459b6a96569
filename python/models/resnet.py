"""CIFAR ResNets as in He et al. 2016 section 4.2 and the CRD/RRD model zoos: three stages of basic blocks
(n blocks each, depth = 6n + 2), the last two stages halve the resolution, then a global average pool.

widths = (stem, stage1, stage2, stage3). resnet20/56 use (16, 16, 32, 64); resnet8x4/32x4 use
(32, 64, 128, 256), so their feature vector has 256 entries.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_conv_bn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            # projection shortcut (1x1 conv + BN) whenever the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.stem = nn.Sequential(conv3x3(in_channels, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        self.stage1 = self._stage(stem, w1, n, 1)
        self.stage2 = self._stage(w1, w2, n, 2)
        self.stage3 = self._stage(w2, w3, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self.feat_dim = w3
        init_conv_bn(self)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)]
        layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        feat = torch.flatten(self.pool(x), 1)
        return feat, self.fc(feat)


def cifar_resnet(depth: int, widths, num_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, widths, num_classes, in_channels)

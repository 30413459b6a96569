"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: pre-activation basic blocks, depth = 6n + 4,
stage widths 16k, 32k, 64k for widen factor k. The feature vector is the pooled output of the final
BN-ReLU (64k entries: 128 for wrn_16_2 and wrn_40_2). No dropout, so training is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_conv_bn


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # when the shape changes the shortcut reads the pre-activated input, as in the WRN paper's code
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stage1 = self._stage(widths[0], widths[1], n, 1)
        self.stage2 = self._stage(widths[1], widths[2], n, 2)
        self.stage3 = self._stage(widths[2], widths[3], n, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feat_dim = widths[3]
        init_conv_bn(self, zero_linear_bias=True)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBlock(cin, cout, stride)]
        layers += [PreActBlock(cout, cout, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = self.relu(self.bn(x))
        feat = torch.flatten(self.pool(x), 1)
        return feat, self.fc(feat)


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(depth, widen, num_classes, in_channels)

"""Tiny models for the offline demo on scikit-learn's 8x8 digits.

DigitsCNN (teacher): three 3x3 conv layers (32, 64, 128 channels) with BN, one 2x2 pool, global average
pool -> 128 features. DigitsMLP (student): the flattened image through two 32-unit hidden layers with BN
-> 32 features. The student has about a tenth of the teacher's parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(128, num_classes)
        self.feat_dim = 128

    def forward(self, x: torch.Tensor):
        feat = torch.flatten(self.features(x), 1)
        return feat, self.fc(feat)


class DigitsMLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 32, pixels: int = 64):
        super().__init__()
        self.in_features = in_channels * pixels
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes)
        self.feat_dim = hidden

    def forward(self, x: torch.Tensor):
        if x[0].numel() != self.in_features:
            raise ValueError(
                f"digits_mlp expects {self.in_features} input values per image, got shape {tuple(x.shape[1:])}"
            )
        feat = self.body(x)
        return feat, self.fc(feat)

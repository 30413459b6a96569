"""Model zoo for the reference training app.

Every model maps images to ``(features, logits)``: ``features`` is the penultimate pooled vector (what
RRD's projection head reads, as in the paper), ``logits`` the classifier output. ``feat_dim`` is the
length of that vector. All models end in a global average pool, so they also accept inputs smaller than
CIFAR's 32x32 (e.g. the 8x8 digits).
"""
from __future__ import annotations

import torch.nn as nn

from .resnet import cifar_resnet
from .small import DigitsCNN, DigitsMLP
from .vgg import vgg
from .wrn import wide_resnet

# name -> constructor(num_classes, in_channels)
MODELS = {
    # CIFAR ResNets (basic blocks, 6n+2 layers); "x4" = four times wider.
    "resnet8": lambda nc, ic: cifar_resnet(8, (16, 16, 32, 64), nc, ic),
    "resnet14": lambda nc, ic: cifar_resnet(14, (16, 16, 32, 64), nc, ic),
    "resnet20": lambda nc, ic: cifar_resnet(20, (16, 16, 32, 64), nc, ic),
    "resnet32": lambda nc, ic: cifar_resnet(32, (16, 16, 32, 64), nc, ic),
    "resnet44": lambda nc, ic: cifar_resnet(44, (16, 16, 32, 64), nc, ic),
    "resnet56": lambda nc, ic: cifar_resnet(56, (16, 16, 32, 64), nc, ic),
    "resnet110": lambda nc, ic: cifar_resnet(110, (16, 16, 32, 64), nc, ic),
    "resnet8x4": lambda nc, ic: cifar_resnet(8, (32, 64, 128, 256), nc, ic),
    "resnet32x4": lambda nc, ic: cifar_resnet(32, (32, 64, 128, 256), nc, ic),
    # Wide ResNets WRN-depth-widen (pre-activation blocks, 6n+4 layers).
    "wrn_16_1": lambda nc, ic: wide_resnet(16, 1, nc, ic),
    "wrn_16_2": lambda nc, ic: wide_resnet(16, 2, nc, ic),
    "wrn_40_1": lambda nc, ic: wide_resnet(40, 1, nc, ic),
    "wrn_40_2": lambda nc, ic: wide_resnet(40, 2, nc, ic),
    # VGG with batch norm; vgg8 has one conv per stage.
    "vgg8": lambda nc, ic: vgg(8, nc, ic),
    "vgg11": lambda nc, ic: vgg(11, nc, ic),
    "vgg13": lambda nc, ic: vgg(13, nc, ic),
    # Tiny models for the 8x8 digits demo.
    "digits_cnn": lambda nc, ic: DigitsCNN(nc, ic),
    "digits_mlp": lambda nc, ic: DigitsMLP(nc, ic),
}


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes, in_channels)


__all__ = ["MODELS", "build_model"]

"""Datasets held in memory as tensors, a deterministic (optionally distributed) batch sampler, and data
augmentation written with torch ops on the training device.

Randomness here comes from exactly two places, both saved in checkpoints:
  * batch order: a DistributedSampler (seeded with the stage seed, reshuffled per epoch via set_epoch);
  * augmentation: a torch.Generator on the data device (one per rank).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from .optional import INSTALL_HINT

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class DataError(ValueError):
    """A dataset could not be loaded; the message says which path and what is expected there."""


@dataclass
class ImageSet:
    """Images as a N x C x H x W tensor (uint8 for CIFAR, float32 in [0, 1] for digits) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class DatasetSpec:
    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    in_channels: int
    mean: tuple
    std: tuple
    crop_padding: int  # random-crop padding in pixels
    hflip: bool  # random horizontal flips


def load_digits_dataset(split_seed: int = 0, test_fraction: float = 0.2) -> DatasetSpec:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), a fixed stratified train/test split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(
            f"the digits data set comes with scikit-learn, which is not installed ({exc}); {INSTALL_HINT}"
        ) from exc

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # N x 1 x 8 x 8 in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    return DatasetSpec(
        name="digits",
        train=ImageSet(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=ImageSet(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        in_channels=1,
        mean=(mean,),
        std=(std,),
        crop_padding=1,  # shifts of up to one pixel
        hflip=False,  # a mirrored digit is a different symbol
    )


def cifar100_dir(data_dir: str) -> str:
    """The cifar-100-python folder: DIR itself if it holds train/test, else DIR/cifar-100-python."""
    for cand in (os.path.join(data_dir, "cifar-100-python"), data_dir):
        if os.path.isfile(os.path.join(cand, "train")) and os.path.isfile(os.path.join(cand, "test")):
            return cand
    raise DataError(
        f"--data-dir: CIFAR-100 not found under {os.path.abspath(data_dir)!r}. Expected the python version "
        f"as torchvision downloads it: {os.path.join(os.path.abspath(data_dir), 'cifar-100-python')}/train "
        f"and .../test (pickled dicts with b'data' N x 3072 uint8 and b'fine_labels'), i.e. the contents of "
        f"cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html. This app never downloads."
    )


def _read_cifar_pickle(path: str) -> ImageSet:
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"fine_labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, ValueError) as exc:
        raise DataError(
            f"--data-dir: {path!r} is not a CIFAR-100 python pickle with b'data' and b'fine_labels' ({exc})"
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DataError(f"--data-dir: {path!r} has data of shape {data.shape}, expected N x 3072")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels))


def load_cifar100_dataset(data_dir: str) -> DatasetSpec:
    root = cifar100_dir(data_dir)
    return DatasetSpec(
        name="cifar100",
        train=_read_cifar_pickle(os.path.join(root, "train")),
        test=_read_cifar_pickle(os.path.join(root, "test")),
        num_classes=100,
        in_channels=3,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        crop_padding=4,
        hflip=True,
    )


def load_dataset(name: str, data_dir: str | None, split_seed: int = 0) -> DatasetSpec:
    if name == "digits":
        return load_digits_dataset(split_seed)
    if name == "cifar100":
        if not data_dir:
            raise DataError("--data-dir is required for --dataset cifar100 (the folder holding cifar-100-python/)")
        return load_cifar100_dataset(data_dir)
    raise DataError(f"--dataset: unknown dataset {name!r}")


class Preprocess:
    """uint8/float images -> normalised float32, with optional augmentation: random crop with zero padding
    (as torchvision's RandomCrop(padding=p)) and random horizontal flip, drawn per sample from ``generator``."""

    def __init__(self, spec: DatasetSpec, device: torch.device):
        c = spec.in_channels
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.pad = spec.crop_padding
        self.hflip = spec.hflip

    @staticmethod
    def _to_unit(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        return (self._to_unit(x) - self.mean) / self.std

    def train(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self._to_unit(x)
        n, _, h, w = x.shape
        dev = x.device
        if self.pad > 0:
            p = self.pad
            padded = F.pad(x, (p, p, p, p))  # zeros, in pixel space (before normalisation)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # n x 1 x h x 1
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # n x 1 x 1 x w
            batch = torch.arange(n, device=dev)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std


class _Length:
    """Stands in for a dataset where DistributedSampler only needs len()."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def make_sampler(n: int, world: int, rank: int, seed: int) -> DistributedSampler:
    """Shuffled index order for this rank; a function of (seed, epoch) only, so resuming at epoch k is exact.
    With several ranks the dataset is padded to a multiple of the world size, so every rank sees the same
    number of batches of the same sizes (RRD's all-gather needs equal batch sizes)."""
    return DistributedSampler(_Length(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)


def batches(indices: list[int], batch_size: int, device: torch.device):
    """Index tensors of consecutive batches (one host-to-device copy per epoch)."""
    order = torch.tensor(indices, dtype=torch.long).to(device)
    for start in range(0, len(indices), batch_size):
        yield order[start : start + batch_size]

"""The frozen teacher's outputs on one seed's training batches, computed once and reused by that seed's
other distillation runs.

Why it is exact: every student method of a seed draws the same batches and augmentations (the sampler and
the augmentation generator are seeded from the seed alone), and the teacher is frozen, so KD, RRD and
RRD+KD would each run the very same teacher forward passes. On the digits demo those passes are most of
the job's time (the CNN teacher costs about three times the MLP student's whole step).

Why it cannot be wrong: an entry keeps the batch it was computed on and is used only for a batch equal to
it, element for element; anything else (another seed, a resumed stage, a different augmentation) is
recomputed. The teacher pass is deterministic on the CPU for a fixed thread count, so a reused output is
bit-identical to a recomputed one (tests/test_train_app.py checks the histories and weights).

CPU only: comparing the batch reads a result on the host, which on a GPU would be a synchronisation per
step; GPU teacher passes are cheap next to the rest anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TeacherMemo:
    """``memo(key, x, teacher)`` returns ``teacher(x)`` (feature, logits), from the memo when ``key`` was
    seen with an equal ``x``. Call it under the same no_grad / autocast context each time. Entries stop being
    added once they hold ``max_bytes`` (a large data set then simply recomputes the rest)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self.entries: dict = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __call__(self, key, x: torch.Tensor, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries.get(key)
        if entry is not None and _same(entry[0], x):
            self.hits += 1
            # copies: a caller that modified its tensors in place must not change what the next run gets
            return entry[1].clone(), entry[2].clone()
        self.misses += 1
        feat, logits = teacher(x)
        stored = (x.detach().clone(), feat.detach().clone(), logits.detach().clone())
        size = sum(t.numel() * t.element_size() for t in stored)
        old = sum(t.numel() * t.element_size() for t in entry) if entry is not None else 0
        if self.bytes - old + size <= self.max_bytes:
            self.entries[key] = stored
            self.bytes += size - old
        return feat, logits


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)

"""The per-sample momentum memory of the authors' CRD-style module: initialisation and the update.

One row per training sample. After each loss, the rows of the batch's samples move toward the batch's
unit embeddings and are renormalised (the authors' ContrastMemory update):

    row <- (m row + (1 - m) e) / ||m row + (1 - m) e||

computed from the rows as they were before this step, then written with index_copy_. All on the device,
in place, no host-device synchronisation.

A sample index repeated within one batch: every occurrence computes its update from the same pre-step row,
and index_copy_ then writes all of them to one row. PyTorch leaves the winner unspecified for duplicate
indices (on a GPU it is a race; on the CPU the last one wins at small sizes, not at large ones, measured
with torch 2.13), so the authors' memory keeps one of the occurrences' updates, whichever the hardware
picked. Here it is always the last occurrence's (in batch order): one of the outcomes theirs can have, and
the same on every run and device.
"""
from __future__ import annotations

import math

import torch

from .reference import NORM_EPS


def uniform_memory(n: int, dim: int) -> torch.Tensor:
    """n x dim, uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3) (the authors' init: rows of expected
    squared norm 1, not normalised), from torch's global generator."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim).mul_(2 * stdv).add_(-stdv)


def last_writer(y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """For each batch position i, the last position j with y[j] == y[i] (and valid[j]); -1 where there is
    none (every occurrence of that index invalid). B x B comparisons, no sync."""
    B = y.shape[0]
    same = y[:, None] == y[None, :]
    if valid is not None:
        same = same & valid[None, :]
    pos = torch.arange(B, device=y.device).expand(B, B)
    return torch.where(same, pos, torch.full((), -1, dtype=pos.dtype, device=y.device)).amax(dim=1)


def momentum_rows(memory: torch.Tensor, y: torch.Tensor, emb: torch.Tensor, momentum: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """The B rows to write at ``y`` (in range): each the momentum update of memory[y] toward the unit
    embedding ``emb`` (B x D), renormalised; every occurrence of an index gets the last valid occurrence's
    update, so the write does not depend on the order index_copy_ takes; an index whose occurrences are
    all invalid keeps its row. The norm is guarded by eps 1e-12 (the authors divide by it unguarded: only a
    blend of norm below 1e-12 differs, a NaN row for them, a zero-ish row here)."""
    old = memory.index_select(0, y)
    new = old * momentum + emb.to(memory.dtype) * (1 - momentum)
    new = new / torch.linalg.vector_norm(new, dim=1, keepdim=True).clamp_min(NORM_EPS)
    win = last_writer(y, valid)
    return torch.where((win >= 0)[:, None], new[win.clamp_min(0)], old)

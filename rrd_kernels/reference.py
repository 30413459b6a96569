"""The RRD loss written plainly in PyTorch, exactly as docs/math.md defines it.

This is the specification: every backend is tested against it (in float64), and nothing else in the
package re-derives the math. It materialises the B x K logits, so it is for testing and small sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # as F.normalize

OBJECTIVES = ("ce", "kl")
REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def rrd_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor,
    tau_s: float,
    tau_t: float,
    objective: str = "ce",
    reduction: str = "mean",
) -> torch.Tensor:
    """RRD loss of raw embeddings ``student``, ``teacher`` (B x D) against a bank of unit rows (K x D).

    Computed entirely in ``student.dtype`` (the bank is cast to it), so calling it on float64 copies gives
    the oracle and calling it on bf16 inputs gives "the reference computed in the same dtype".
    ``objective="ce"`` is the soft cross-entropy the authors' code returns; ``"kl"`` subtracts the
    teacher entropy (same gradient). Gradients flow wherever autograd allows: detach what must not learn.
    """
    dtype = student.dtype
    s = F.normalize(student, dim=1, eps=NORM_EPS)
    t = F.normalize(teacher.to(dtype), dim=1, eps=NORM_EPS)
    q_bank = bank.to(dtype)
    logits_s = s @ q_bank.T / tau_s
    logits_t = t @ q_bank.T / tau_t
    log_q = F.log_softmax(logits_s, dim=1)
    log_p = F.log_softmax(logits_t, dim=1)
    p = log_p.exp()
    rows = -(p * log_q).sum(dim=1)
    if objective == "kl":
        rows = rows + (p * log_p).sum(dim=1)
    return reduce_rows(rows, reduction)

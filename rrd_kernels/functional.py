"""rrd_loss: the functional entry point. Validates, picks the backend, reduces."""
from __future__ import annotations

import torch

from ._validate import check_rrd_inputs
from .backends import resolve_backend
from .reference import reduce_rows, rrd_reference


def loss_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The loss is accumulated in fp32 and returned as fp32 for half-precision inputs (as autocast does for
    softmax losses), as float64 for float64 inputs."""
    return torch.promote_types(student_dtype, torch.float32)


def rrd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor,
    *,
    tau_s: float,
    tau_t: float,
    objective: str = "ce",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Relational Representation Distillation loss.

    Args:
        student: B x D raw student embeddings (any norm); the only input that receives a gradient.
        teacher: B x D raw teacher embeddings (detached inside).
        bank: K x D memory bank with unit rows (detached inside).
        tau_s, tau_t: student and teacher softmax temperatures (> 0).
        objective: "ce" (soft cross-entropy, what the authors' code returns) or "kl" (CE minus the teacher
            entropy; same gradient).
        reduction: "mean" | "sum" | "none" over the batch.
        backend: "auto" (a fused kernel backend when the tensors are on a CUDA device and one is usable, else
            "torch"), "torch" (the plain PyTorch reference), "triton", or "cuda".

    Returns the loss in float32 (float64 for float64 inputs): a scalar, or B values for reduction="none".
    """
    tau_s, tau_t = check_rrd_inputs(student, teacher, bank, tau_s, tau_t, objective, reduction)
    name = resolve_backend(backend, student, teacher, bank)
    if name == "torch":
        rows = rrd_reference(student, teacher.detach(), bank.detach(), tau_s, tau_t, objective, "none")
    else:
        from .ops import rrd_forward

        rows = rrd_forward(student, teacher.detach(), bank.detach(), tau_s, tau_t, objective == "kl", name)[0]
    return reduce_rows(rows.to(loss_dtype(student.dtype)), reduction)

"""The fused RRD op registered with torch.library, so torch.compile(fullgraph=True) traces through it.

Two custom ops (forward, backward) with fake kernels, and autograd wiring between them. The backend is a
string argument: the op body hands the call to the backend module chosen in functional.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import kernel_module


@torch.library.custom_op("rrd_kernels::rrd_forward", mutates_args=())
def rrd_forward(
    student: Tensor, teacher: Tensor, bank: Tensor, tau_s: float, tau_t: float, kl: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernel_module(backend).forward(student, teacher, bank, tau_s, tau_t, kl)


@rrd_forward.register_fake
def _(student, teacher, bank, tau_s, tau_t, kl, backend):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    # A backend may keep more than one value per row in the lse_t slot (Triton: a coefficient bound too).
    lse_t = rows.new_empty(getattr(kernel_module(backend), "LSE_T_ROWS", 1) * rows.shape[0])
    return rows, torch.empty_like(rows), lse_t, torch.empty_like(rows, dtype=torch.int32)


@torch.library.custom_op("rrd_kernels::rrd_backward", mutates_args=())
def rrd_backward(
    grad_rows: Tensor,
    student: Tensor,
    teacher: Tensor,
    bank: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    ref: Tensor,
    tau_s: float,
    tau_t: float,
    backend: str,
) -> Tensor:
    return kernel_module(backend).backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t)


@rrd_backward.register_fake
def _(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t, backend):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, bank, tau_s, tau_t, _kl, backend = inputs
    _rows, lse_s, lse_t, ref = output
    ctx.save_for_backward(student, teacher, bank, lse_s, lse_t, ref)
    ctx.tau_s, ctx.tau_t, ctx.backend = tau_s, tau_t, backend


def _backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t, _grad_ref):
    # Outputs other than rows are saved state for the backward, not differentiable results: grads ignored.
    student, teacher, bank, lse_s, lse_t, ref = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = rrd_backward(
            grad_rows, student, teacher, bank, lse_s, lse_t, ref, ctx.tau_s, ctx.tau_t, ctx.backend
        )
    return grad_student, None, None, None, None, None, None


rrd_forward.register_autograd(_backward, setup_context=_setup_context)

"""Correctness check of a provider against the float64 oracle (rrd_kernels.rrd_reference) at the size
being timed, on the same rounded inputs.

What is compared:
- the loss: relative error |loss - ref| / |ref|, the reference computed in float64 over all B rows, in row
  chunks so that no chunk's float64 B_chunk x K temporaries exceed a memory budget;
- the gradient dL/dstudent: relative error ||g - g_ref|| / ||g_ref|| over the checked rows. Each gradient row
  depends only on its own sample (and the bank), so a row subset is an exact check of those rows. All rows are
  checked when B x K is at most GRAD_ALL_ROWS_MAX_BK, else GRAD_SUBSET_ROWS rows spread evenly over the batch
  (first and last included), computed with autograd through the float64 reference, in chunks.
The bank is converted to float64 once (K x D x 8 bytes: 2 GiB at K 1M, D 256).
"""
from __future__ import annotations

import math

import torch

from .config import Config

GRAD_ALL_ROWS_MAX_BK = 2**26
GRAD_SUBSET_ROWS = 256
CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def thresholds(dtype: str, tf32_possible: bool) -> tuple[float, float]:
    """(loss, grad) relative-error thresholds. fp32 at "highest" precision must be at fp32 level; when TF32
    may be used by the matmuls, the logits carry ~3e-4 relative error amplified by 1/tau."""
    if dtype == "float32":
        return (2e-4, 1e-3) if tf32_possible else (2e-5, 2e-4)
    if dtype == "bfloat16":
        return (2e-2, 2e-2)
    if dtype == "float16":
        return (1e-2, 1e-2)
    raise ValueError(dtype)


def grad_rows_to_check(B: int, K: int) -> torch.Tensor:
    if B * K <= GRAD_ALL_ROWS_MAX_BK or B <= GRAD_SUBSET_ROWS:
        return torch.arange(B)
    return torch.linspace(0, B - 1, GRAD_SUBSET_ROWS).round().long().unique()


class Reference:
    """float64 loss and gradient rows for one input set."""

    def __init__(self, cfg: Config, student, teacher, bank):
        dev = student.device
        budget = CHUNK_BUDGET_BYTES.get(dev.type, 256 << 20)
        s64 = student.detach().to(torch.float64)
        t64 = teacher.detach().to(torch.float64)
        if cfg.memory == "momentum":
            # rrd_kernels.gathered_reference (the specification, materialising the gathered rows); a row
            # depends only on its own sample, its memory rows and the fixed Z
            from rrd_kernels import gathered_reference

            from .config import NCE_T

            memory, n_cols = bank, cfg.K + 1
            z = memory.z.to(torch.float64) if cfg.scores == "faithful" else None
            kw = dict(tau_s=cfg.tau_s, tau_t=cfg.tau_t, scores=cfg.scores, nce_t=NCE_T, z=z)
            chunk = max(1, min(cfg.B, budget // (4 * 8 * n_cols * cfg.D)))  # two gathered float64 chunks

            def loss_of_rows(s, sel):
                rows, _ = gathered_reference(s, t64[sel], memory.memory_s, memory.memory_t, memory.index[sel],
                                             **kw)
                return rows.sum()
        else:
            from rrd_kernels import rrd_reference

            q64, n_cols = bank.detach().to(torch.float64), cfg.K
            # about 8 float64 B_chunk x K temporaries live at once in the reference with autograd
            chunk = max(1, min(cfg.B, budget // (8 * 8 * n_cols)))

            def loss_of_rows(s, sel):
                return rrd_reference(s, t64[sel], q64, cfg.tau_s, cfg.tau_t, "ce", "sum")
        self._chunked(cfg.B, n_cols, chunk, s64, loss_of_rows)

    def _chunked(self, B: int, n_cols: int, chunk: int, s64: torch.Tensor, loss_of_rows) -> None:
        """The mean loss over all B rows and the gradient of the checked rows, chunk rows at a time, from
        loss_of_rows(student rows, their selector) -> the float64 sum of those rows' losses."""
        total = torch.zeros((), dtype=torch.float64, device=s64.device)
        with torch.no_grad():
            for i in range(0, B, chunk):
                total += loss_of_rows(s64[i : i + chunk], slice(i, i + chunk))
        self.loss = (total / B).item()
        self.rows = grad_rows_to_check(B, n_cols).to(s64.device)
        grads = []
        for i in range(0, self.rows.numel(), chunk):
            idx = self.rows[i : i + chunk]
            s = s64[idx].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_of_rows(s, idx) / B, s)
            grads.append(g)
        self.grad = torch.cat(grads)


def compare(ref: Reference, loss: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(loss relative error, gradient relative error); inf when anything is not finite."""
    lv = float(loss.detach().double().item())
    g = grad.detach()[ref.rows].double()
    if not math.isfinite(lv) or not bool(torch.isfinite(g).all()):
        return math.inf, math.inf
    loss_err = abs(lv - ref.loss) / max(abs(ref.loss), 1e-30)
    grad_err = float((g - ref.grad).norm() / ref.grad.norm().clamp_min(1e-300))
    return loss_err, grad_err

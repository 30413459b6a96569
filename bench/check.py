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
        if cfg.memory == "momentum":
            self._momentum(cfg, student, teacher, bank)
            return
        from rrd_kernels import rrd_reference

        dev = student.device
        B, K = cfg.B, cfg.K
        budget = CHUNK_BUDGET_BYTES.get(dev.type, 256 << 20)
        # about 8 float64 B_chunk x K temporaries live at once in the reference with autograd
        chunk = max(1, min(B, budget // (8 * 8 * K)))
        s64 = student.detach().to(torch.float64)
        t64 = teacher.detach().to(torch.float64)
        q64 = bank.detach().to(torch.float64)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        with torch.no_grad():
            for i in range(0, B, chunk):
                total += rrd_reference(s64[i : i + chunk], t64[i : i + chunk], q64, cfg.tau_s, cfg.tau_t,
                                       "ce", "sum")
        self.loss = (total / B).item()
        self.rows = grad_rows_to_check(B, K).to(dev)
        grads = []
        for i in range(0, self.rows.numel(), chunk):
            idx = self.rows[i : i + chunk]
            s = s64[idx].clone().requires_grad_(True)
            rows_loss = rrd_reference(s, t64[idx], q64, cfg.tau_s, cfg.tau_t, "ce", "sum") / B
            (g,) = torch.autograd.grad(rows_loss, s)
            grads.append(g)
        self.grad = torch.cat(grads)
        del q64


    def _momentum(self, cfg: Config, student, teacher, memory) -> None:
        """The momentum memory: rrd_kernels.gathered_reference (the specification, materialising the gathered
        rows) in float64, in row chunks (a row depends only on its own sample, its rows and the fixed Z)."""
        from rrd_kernels import gathered_reference

        from .config import NCE_T

        dev = student.device
        B, k1, D = cfg.B, cfg.K + 1, cfg.D
        budget = CHUNK_BUDGET_BYTES.get(dev.type, 256 << 20)
        chunk = max(1, min(B, budget // (4 * 8 * k1 * D)))  # two gathered float64 chunks, with autograd
        s64 = student.detach().to(torch.float64)
        t64 = teacher.detach().to(torch.float64)
        z = memory.z.to(torch.float64) if cfg.scores == "faithful" else None
        kw = dict(tau_s=cfg.tau_s, tau_t=cfg.tau_t, scores=cfg.scores, nce_t=NCE_T, z=z)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        with torch.no_grad():
            for i in range(0, B, chunk):
                rows, _ = gathered_reference(s64[i : i + chunk], t64[i : i + chunk], memory.memory_s,
                                             memory.memory_t, memory.index[i : i + chunk], **kw)
                total += rows.sum()
        self.loss = (total / B).item()
        self.rows = grad_rows_to_check(B, k1).to(dev)
        grads = []
        for i in range(0, self.rows.numel(), chunk):
            idx = self.rows[i : i + chunk]
            s = s64[idx].clone().requires_grad_(True)
            rows, _ = gathered_reference(s, t64[idx], memory.memory_s, memory.memory_t, memory.index[idx], **kw)
            (g,) = torch.autograd.grad(rows.sum() / B, s)
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

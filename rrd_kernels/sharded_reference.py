"""The sharded-bank pieces (backends.py, "Sharded bank") in plain PyTorch: the reference the kernel
backends' pieces are tested against. Materialises the N x K_shard logits, so it is for testing and small
sizes; float64 inputs give a float64 computation (half inputs are computed in fp32).

State planes, natural units, per row over this shard: lse_a, lse_b (log-sum-exp of the student and teacher
logits), u = sum_k p'_k a_k and v = sum_k p'_k b_k under the shard's own teacher softmax p', and max_a.
Merging weights shard r by w_r = exp(lse_b^(r) - lse_b): CE = lse_a - sum_r w_r u_r, H = lse_b - sum_r w_r v_r.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import NORM_EPS

PLANES = 5


def _dtype(student: torch.Tensor) -> torch.dtype:
    return torch.promote_types(student.dtype, torch.float32)


def _logits(student, teacher, shard, tau_s, tau_t):
    dtype = _dtype(student)
    q = shard.to(dtype)
    s = F.normalize(student.to(dtype), dim=1, eps=NORM_EPS)
    t = F.normalize(teacher.to(dtype), dim=1, eps=NORM_EPS)
    return s @ q.T / tau_s, t @ q.T / tau_t, q


def forward_partial(student, teacher, shard, tau_s, tau_t, k_offset, n_splits=None):
    a, b, _ = _logits(student, teacher, shard, tau_s, tau_t)
    lse_a = torch.logsumexp(a, dim=1)
    lse_b = torch.logsumexp(b, dim=1)
    p = torch.exp(b - lse_b[:, None])
    max_a, arg = a.max(dim=1)
    planes = torch.stack([lse_a, lse_b, (p * a).sum(dim=1), (p * b).sum(dim=1), max_a])
    return planes, arg + k_offset


def merge_row_states(planes, kl):
    """(rows, lse_a, lse_b) of planes [W, >= 4, N] whose first four are (lse_a, lse_b, u, v) per part (see
    the module docstring). A part holding none of a row's logits has lse -inf there, so its weight is 0 (the
    sharded momentum memory, rrd_kernels/sharded_momentum.py, merges its ranks so)."""
    lse_a = torch.logsumexp(planes[:, 0], dim=0)
    lse_b = torch.logsumexp(planes[:, 1], dim=0)
    w = torch.exp(planes[:, 1] - lse_b)
    rows = lse_a - (w * planes[:, 2]).sum(dim=0)
    if kl:
        rows = rows - (lse_b - (w * planes[:, 3]).sum(dim=0))
    return rows, lse_a, lse_b


def merge_states(planes, idx, kl):
    rows, lse_a, lse_b = merge_row_states(planes, kl)
    winner = planes[:, 4].argmax(dim=0)  # the first shard holding the largest logit, as a global argmax
    ref = idx.gather(0, winner[None]).squeeze(0)
    return rows, lse_a, lse_b, ref


def backward_partial(student, teacher, shard, lse_s, lse_t, tau_s, tau_t, n_splits=None):
    a, b, q = _logits(student, teacher, shard, tau_s, tau_t)
    c = torch.exp(a - lse_s[:, None].to(a.dtype)) - torch.exp(b - lse_t[:, None].to(b.dtype))
    return c @ q, c.sum(dim=1)


def backward_finish(acc, sigma, q_ref, student, grad_rows, tau_s):
    dtype = acc.dtype
    g = (acc - sigma[:, None] * q_ref.to(dtype)) / tau_s
    x = student.to(dtype)
    norm = x.norm(dim=1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    s = x / denom
    # d(x / max(|x|, eps)): a projection while the clamp is inactive, a plain 1/eps scaling where it is.
    proj = torch.where(norm > NORM_EPS, (s * g).sum(dim=1, keepdim=True), torch.zeros_like(norm))
    grad = (g - s * proj) * (grad_rows.to(dtype)[:, None] / denom)
    return grad.to(student.dtype)

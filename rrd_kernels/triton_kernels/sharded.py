"""Host side of the Triton backend's sharded-bank pieces (contract in rrd_kernels/backends.py).

A shard of the bank on another rank is a bank split on another device, so the launcher's own pieces serve:
forward_states gives the per-split partial states over this shard (merged here into one state per row, so
what crosses ranks does not grow with the split count), merge_states folds the W ranks' states exactly as it
folds splits, backward_sums gives the partial sums, and backward_finish applies the rounding guard and the
normalisation Jacobian to the reduced sums, with the gathered reference rows passed as a bank of N rows and
ref = arange(N).

State planes: N_STATE = 6 (m_a, n_a, m_b, n_b, W, V of online_state.py, log2 units). As in the unsharded
backend, the contract's lse_s slot carries lse_s - lse_t (base 2) and lse_t is base 2.
"""
from __future__ import annotations

import torch

from .forward import N_STATE
from .launch import _on, _row_major, backward_finish as _finish, backward_sums, forward_states, plan_for
from .launch import merge_states as _merge

PLANES = N_STATE


def _merge_count(m_x, n_x, m_y, n_y):
    # online_state.merge_count for two non-empty states (both maxima finite).
    m = torch.maximum(m_x, m_y)
    n = torch.where(
        m_y > m_x,
        (n_x + 1.0) * torch.exp2(torch.clamp(m_x - m_y, max=0.0)) + n_y,
        n_x + (n_y + 1.0) * torch.exp2(torch.clamp(m_y - m_x, max=0.0)),
    )
    return m, n


def _merge_splits(part: torch.Tensor, part_idx: torch.Tensor):
    """[N_STATE, S, N] split states of one shard -> one state [N_STATE, N] (online_state.merge_state, on the
    host side in torch: S is small and every split saw a valid bank row, so no state is empty)."""
    m_a, n_a, m_b, n_b, w, v = part[:, 0]
    idx = part_idx[0]
    for j in range(1, part.shape[1]):
        m_a2, n_a2, m_b2, n_b2, w2, v2 = part[:, j]
        new_m_a, new_n_a = _merge_count(m_a, n_a, m_a2, n_a2)
        new_m_b, new_n_b = _merge_count(m_b, n_b, m_b2, n_b2)
        r1, r2 = torch.exp2(m_b - new_m_b), torch.exp2(m_b2 - new_m_b)
        z1, z2 = 1.0 + n_b, 1.0 + n_b2
        w = r1 * (w + (new_m_a - m_a) * z1) + r2 * (w2 + (new_m_a - m_a2) * z2)
        v = r1 * (v + (new_m_b - m_b) * z1) + r2 * (v2 + (new_m_b - m_b2) * z2)
        idx = torch.where(m_a2 > m_a, part_idx[j], idx)
        m_a, n_a, m_b, n_b = new_m_a, new_n_a, new_m_b, new_n_b
    return torch.stack([m_a, n_a, m_b, n_b, w, v]), idx


def _prepared(student, teacher, shard, n_splits):
    """Row-major operands and the launch plan for N all-gathered rows against this shard."""
    student, teacher, shard = _row_major(student), _row_major(teacher), _row_major(shard)
    return student, teacher, shard, plan_for(student, teacher, shard, n_splits)


def forward_partial(student, teacher, shard, tau_s, tau_t, k_offset, n_splits=None):
    with _on(student.device):
        student, teacher, shard, plan = _prepared(student, teacher, shard, n_splits)
        part, part_idx = forward_states(student, teacher, shard, tau_s, tau_t, plan)
    planes, idx = _merge_splits(part, part_idx) if plan.n_splits > 1 else (part[:, 0], part_idx[0])
    return planes, idx + k_offset  # global row index, int32 (sharded_backend checked the global K)


def merge_states(planes, idx, kl):
    with _on(planes.device):
        # [W, N_STATE, N] -> [N_STATE, W, N]: the ranks are the splits.
        return _merge(planes.transpose(0, 1).contiguous(), idx.to(torch.int32).contiguous(), kl)


def backward_partial(student, teacher, shard, lse_s, lse_t, tau_s, tau_t, n_splits=None):
    with _on(student.device):
        student, teacher, shard, plan = _prepared(student, teacher, shard, n_splits)
        part, part_sigma = backward_sums(
            student, teacher, shard, lse_s.contiguous(), lse_t.contiguous(), tau_s, tau_t, plan
        )
    return part.sum(dim=0)[:, : student.shape[1]], part_sigma.sum(dim=0)


def backward_finish(acc, sigma, q_ref, student, grad_rows, tau_s):
    student, q_ref = _row_major(student), _row_major(q_ref)
    N = student.shape[0]
    ref = torch.arange(N, device=student.device, dtype=torch.int32)  # row i of q_ref is row i's reference
    with _on(student.device):
        return _finish(acc.contiguous()[None], sigma.contiguous()[None], q_ref, ref, student, grad_rows, tau_s)

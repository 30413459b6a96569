"""Host side of the Triton backend's sharded-bank pieces (contract in rrd_kernels/backends.py).

A shard of the bank on another rank is a bank split on another device, so the existing kernels serve
unchanged: rrd_fwd_kernel with SPLIT=True writes the per-split partial state, rrd_merge_kernel merges the
W ranks' states exactly as it merges splits, rrd_bwd_kernel with SPLIT=True writes the partial sums, and
rrd_bwd_finish_kernel applies the rounding guard and the normalisation Jacobian to the reduced sums, with
the gathered reference rows passed as a bank of N rows and ref = arange(N).

State planes: the kernels' N_STATE = 6 (m_a, n_a, m_b, n_b, W, V of online_state.py, log2 units); LSEs
are base 2, as the unsharded backward reads them.
"""
from __future__ import annotations

import torch
import triton

from .backward import rrd_bwd_finish_kernel, rrd_bwd_kernel
from .common import LOG2E
from .forward import N_STATE, rrd_fwd_kernel, rrd_merge_kernel
from .launch import _fp32_precision, _op_dtype, _row_major, interpreting, make_plan

PLANES = N_STATE
MERGE_BLOCK = 128


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
    """Row-major operands, the sizes and the launch plan for N all-gathered rows against this shard (the
    launcher's forward and backward start the same way)."""
    student, teacher, shard = _row_major(student), _row_major(teacher), _row_major(shard)
    N, D = student.shape
    K = shard.shape[0]
    return student, teacher, shard, N, K, D, make_plan(N, K, D, student.device, n_splits)


def forward_partial(student, teacher, shard, tau_s, tau_t, k_offset, n_splits=None):
    student, teacher, shard, N, K, D, plan = _prepared(student, teacher, shard, n_splits)
    f32 = dict(device=student.device, dtype=torch.float32)
    part = torch.empty((N_STATE, plan.n_splits, N), **f32)
    part_idx = torch.empty((plan.n_splits, N), device=student.device, dtype=torch.int32)
    unused = torch.empty(1, **f32)  # the finished-row outputs: not written with SPLIT=True
    rrd_fwd_kernel[(plan.n_row_blocks, plan.n_splits)](
        student, teacher, shard, unused, unused, unused, part_idx, part, part_idx,
        N, K, D, student.stride(0), teacher.stride(0), shard.stride(0),
        LOG2E / tau_s, LOG2E / tau_t,
        plan.tiles_per_split,
        KL=False, SPLIT=True,
        OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
        BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, BLOCK_D=plan.block_d,
        num_warps=plan.num_warps,
    )
    planes, idx = _merge_splits(part, part_idx) if plan.n_splits > 1 else (part[:, 0], part_idx[0])
    return planes, idx + k_offset  # global row index, int32 (sharded_backend checked the global K)


def merge_states(planes, idx, kl):
    W, _, N = planes.shape
    part = planes.transpose(0, 1).contiguous()  # [N_STATE, W, N]: the ranks are the splits
    part_idx = idx.to(torch.int32).contiguous()
    f32 = dict(device=planes.device, dtype=torch.float32)
    rows, lse_s, lse_t = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
    ref = torch.empty(N, device=planes.device, dtype=torch.int32)
    rrd_merge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
        part, part_idx, rows, lse_s, lse_t, ref, N, W, KL=bool(kl), BLOCK_B=MERGE_BLOCK
    )
    return rows, lse_s, lse_t, ref


def backward_partial(student, teacher, shard, lse_s, lse_t, tau_s, tau_t, n_splits=None):
    student, teacher, shard, N, K, D, plan = _prepared(student, teacher, shard, n_splits)
    f32 = dict(device=student.device, dtype=torch.float32)
    part = torch.empty((plan.n_splits, N, plan.block_d), **f32)
    part_sigma = torch.empty((plan.n_splits, N), **f32)
    ref = torch.empty(1, device=student.device, dtype=torch.int32)  # REF, W, DS: not read with SPLIT=True
    rrd_bwd_kernel[(plan.n_row_blocks, plan.n_splits)](
        student, teacher, shard, lse_s.contiguous(), lse_t.contiguous(), ref, lse_s, student, part, part_sigma,
        N, K, D, student.stride(0), teacher.stride(0), shard.stride(0), 0, student.stride(0),
        LOG2E / tau_s, LOG2E / tau_t, 1.0 / tau_s,
        plan.tiles_per_split,
        SPLIT=True,
        OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
        BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, BLOCK_D=plan.block_d,
        num_warps=plan.num_warps,
    )
    return part.sum(dim=0)[:, :D], part_sigma.sum(dim=0)


def backward_finish(acc, sigma, q_ref, student, grad_rows, tau_s):
    student, q_ref = _row_major(student), _row_major(q_ref)
    N, D = student.shape
    block_d = max(16, triton.next_power_of_2(D))
    part = acc.new_zeros((1, N, block_d))
    part[0, :, :D] = acc
    grad_rows = grad_rows.to(torch.float32)
    grad_student = torch.empty_like(student)
    ref = torch.arange(N, device=student.device, dtype=torch.int32)  # row i of q_ref is row i's reference
    finish_block = 32 if block_d <= 256 else 16
    rrd_bwd_finish_kernel[(triton.cdiv(N, finish_block),)](
        part, sigma.contiguous().view(1, N), student, q_ref, ref, grad_rows, grad_student, N, D,
        student.stride(0), q_ref.stride(0), grad_rows.stride(0), grad_student.stride(0), 1.0 / tau_s, 1,
        OP_DTYPE=_op_dtype(student), UPCAST=interpreting(), BLOCK_B=finish_block, BLOCK_D=block_d,
    )
    return grad_student

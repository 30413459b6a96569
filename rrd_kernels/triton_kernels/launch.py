"""Host side of the Triton backend: the plan for the device, workspaces, launches.

Implements the kernel-backend contract of rrd_kernels/backends.py. Inputs have been validated by
rrd_kernels._validate; nothing here synchronises with the device. Launches run under the tensors' device, so
the plan (read from Triton's driver for the current device) and the compiled kernels are the right GPU's.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .backward import rrd_bwd_finish_kernel, rrd_bwd_kernel
from .common import LOG2E
from .forward import N_STATE, rrd_argmax_kernel, rrd_fwd_kernel, rrd_merge_kernel
from .gathered import rrd_gathered_bwd_kernel, rrd_gathered_fwd_kernel
from .planes import rrd_split_bank_kernel, rrd_split_rows_kernel, split_bank, split_rows
from .planes_backward import rrd_bwd_planes_kernel
from .resident import rrd_bwd_resident_kernel, rrd_fwd_resident_kernel
from .plans import (FINISH, MERGE_BLOCK_B, DeviceLimits, Plan, current_limits, family, interpreting,
                    argmax_chunk, mode_of, unsupported)
from .plans import make_plan as _make_plan

MAX_D = 512
# The contract's lse_t slot holds LSE_T_ROWS values per row (ops.py's fake and sharded_loss.py read it).
LSE_T_ROWS = 2
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands, with torch's meaning:
# "highest" is products at fp32 accuracy (at tau 0.005 a logit is 200 x a dot product): fp32 FMA, or where
# the plan has them the fp16 planes (planes.py; their accuracy measured within 0.93-1.17 x of fp32 products,
# docs/math.md section 6); "high" and "medium" allow TF32.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def why_unusable(device, dtype, bank_dtype, B, K, D) -> str | None:
    if device.type == "cpu" and interpreting():
        pass
    elif device.type != "cuda":
        return f"triton kernels need CUDA tensors (got {device}; TRITON_INTERPRET=1 runs them on the CPU)"
    if dtype not in EMBED_DTYPES:
        return f"triton takes float32/bfloat16/float16 embeddings, got {dtype}"
    if bank_dtype not in BANK_DTYPES:
        return f"triton takes a float32/bfloat16/float16 bank, got {bank_dtype}"
    if D > MAX_D:
        return f"triton kernels support D <= {MAX_D}, got D = {D}"
    if K >= 2**31 or B * max(D, 1) >= 2**31:
        return f"triton kernels index rows with int32: B*D and K must stay below 2^31 (B={B}, K={K}, D={D})"
    if device.type == "cuda":
        with _on(device):
            limits = current_limits()
        # No family for the device, or a combination known not to compile there: refused before compiling.
        return unsupported(limits, mode_of(dtype == torch.float32, _fp32_precision(), bank_dtype.itemsize), dtype,
                           bank_dtype, D)
    return None


_KERNELS = (rrd_split_bank_kernel, rrd_split_rows_kernel, rrd_fwd_kernel, rrd_fwd_resident_kernel, rrd_argmax_kernel,
            rrd_merge_kernel, rrd_bwd_kernel, rrd_bwd_resident_kernel, rrd_bwd_planes_kernel, rrd_bwd_finish_kernel,
            rrd_gathered_fwd_kernel, rrd_gathered_bwd_kernel)
_compiled_for = [None]  # the Triton driver the kernels' caches were filled under


def _on(device):
    """Run under the tensors' device: the current device decides the compile target and the stream. In the
    interpreter, numpy's floating-point warnings are off: a GPU overflows to inf and forms NaN silently, and
    the kernels rely on that (the resident kernels' -inf start references, NaN rows)."""
    if interpreting():
        import numpy as np
        return np.errstate(all="ignore")
    drv = triton.runtime.driver.active
    if drv is not _compiled_for[0]:
        # Triton keys compiled kernels by device index only and keeps the target of the first driver it
        # saw; when the active driver is replaced (a stand-in for another GPU, as the compile gate and
        # tests do) the kernels must be compiled for the new one.
        for kernel in _KERNELS:
            kernel.device_caches.clear()
        _compiled_for[0] = drv
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _op_dtype(student: torch.Tensor):
    """Products run in the embeddings' dtype when it is fp16/bf16 (bank tiles are cast to it), else fp32."""
    return _TL_DTYPE[student.dtype]


def _fp32_precision() -> str:
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def make_plan(B: int, K: int, D: int, student_dtype: torch.dtype, limits: DeviceLimits | None = None,
              n_splits: int | None = None, bank_dtype: torch.dtype = torch.float32,
              aligned: bool | None = None) -> Plan:
    """The plan a call with these sizes and dtypes gets on the current device (or `limits`)."""
    mode = mode_of(student_dtype == torch.float32, _fp32_precision(), bank_dtype.itemsize)
    return _make_plan(B, K, D, limits or current_limits(), mode, n_splits, aligned)


def plan_for(student, teacher, bank, n_splits=None) -> Plan:
    """make_plan for these (row-major) operands: their sizes, dtypes and whether their rows are 16-aligned."""
    D = student.shape[1]
    aligned = D % 16 == 0 and all(x.stride(0) % 16 == 0 for x in (student, teacher, bank))
    return make_plan(student.shape[0], bank.shape[0], D, student.dtype, n_splits=n_splits, bank_dtype=bank.dtype,
                     aligned=aligned)


def forward(student, teacher, bank, tau_s, tau_t, kl, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    with _on(student.device):
        plan = plan_for(student, teacher, bank, n_splits)
        part, part_idx = forward_states(student, teacher, bank, tau_s, tau_t, plan, kl=kl)
        # The contract's lse_s slot carries lse_s - lse_t (base 2): see backward.py for why.
        return merge_states(part, part_idx, kl)


def _resident_operands(student, teacher, bank, tau_s, tau_t, plan: Plan):
    """The leading and PLANES arguments of the resident kernels: (S, T, Q, strides) as given, or with
    plan.planes their hi planes, then (S_LO, T_LO, Q_LO, C_S, C_T, Q_UNSCALE) (unused placeholders without)."""
    if not plan.planes:
        return ((student, teacher, bank), (student.stride(0), teacher.stride(0), bank.stride(0)),
                (student, teacher, bank, bank, bank, bank))
    d_pad = plan.tiles.block_dk
    q_hi, q_lo, q_amax, q_unscale = split_bank(bank, d_pad)
    # Walked planes load whole row blocks unmasked (resident._walked_products): pad to a multiple of both
    # blocks (powers of two).
    rows = max(plan.tiles.block_b, plan.tiles.bwd_rows) if plan.tiles.walk_dk else 1
    s_hi, s_lo, c_s = split_rows(student, LOG2E / tau_s, q_amax, d_pad, rows)
    t_hi, t_lo, c_t = split_rows(teacher, LOG2E / tau_t, q_amax, d_pad, rows)
    return (s_hi, t_hi, q_hi), (d_pad, d_pad, d_pad), (s_lo, t_lo, q_lo, c_s, c_t, q_unscale)


def forward_states(student, teacher, bank, tau_s, tau_t, plan: Plan, kl=True):
    """Partial online-softmax states of every row over each of plan.n_splits chunks of the bank:
    ([N_STATE, n_splits, B] float32, [n_splits, B] int32 argmax rows of this bank). With kl=False the states
    may leave out the teacher's entropy (V = 0): merge them only for the cross-entropy."""
    B, D = student.shape
    K = bank.shape[0]
    t = plan.tiles
    part = torch.empty((N_STATE, plan.n_splits, B), device=student.device, dtype=torch.float32)
    part_idx = torch.empty((plan.n_splits, B), device=student.device, dtype=torch.int32)
    args = (student, teacher, bank, part, part_idx, B, K, D, student.stride(0), teacher.stride(0), bank.stride(0),
            LOG2E / tau_s, LOG2E / tau_t, plan.tiles_per_split)
    common = dict(OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(), BLOCK_B=t.block_b,
                  BLOCK_K=t.block_k, num_warps=t.fwd_warps, num_stages=t.fwd_stages)
    if plan.resident:
        ops, strides, extra = _resident_operands(student, teacher, bank, tau_s, tau_t, plan)
        rrd_fwd_resident_kernel[(plan.n_row_blocks, plan.n_splits)](
            *ops, part, part_idx, B, K, D, *strides, *args[11:], *extra,
            D_PAD=t.block_dk, EVEN_D=D == t.block_dk, KL=bool(kl), PLANES=plan.planes,
            BLOCK_DK=t.walk_dk or t.block_dk, **common)
    else:
        rrd_fwd_kernel[(plan.n_row_blocks, plan.n_splits)](*args, BLOCK_DK=t.block_dk, **common)
    d_pad = triton.next_power_of_2(D)
    chunk = argmax_chunk(t.block_k, d_pad)
    rrd_argmax_kernel[(B,)](
        student, bank, part, part_idx, B, K, D, student.stride(0), bank.stride(0), plan.n_splits,
        SPLITS=triton.next_power_of_2(plan.n_splits), BLOCK_K=t.block_k, BLOCK_DK=chunk, D_PAD=d_pad,
        EVEN_D=D % chunk == 0, num_warps=4, num_stages=1,
    )
    return part, part_idx


def merge_states(part, part_idx, kl):
    """Fold [N_STATE, n, B] partial states (splits of a bank, or shards of it on other ranks) into
    (rows, lse_s - lse_t, lse_t, ref) of the backend contract; the lse_t slot is [LSE_T_ROWS B]: lse_t, then
    the bound on |q - p| per row that the planes backward scales its coefficients by (rrd_merge_kernel)."""
    n, B = part_idx.shape
    f32 = dict(device=part.device, dtype=torch.float32)
    rows, lse_diff, lse_t = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(LSE_T_ROWS * B, **f32)
    ref = torch.empty(B, device=part.device, dtype=torch.int32)
    rrd_merge_kernel[(triton.cdiv(B, MERGE_BLOCK_B),)](
        part, part_idx, rows, lse_diff, lse_t, ref, B, n, int(bool(kl)), BLOCK_B=MERGE_BLOCK_B
    )
    return rows, lse_diff, lse_t, ref


def backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    with _on(student.device):
        plan = plan_for(student, teacher, bank, n_splits)
        part, part_sigma = backward_sums(student, teacher, bank, lse_s, lse_t, tau_s, tau_t, plan)
        return backward_finish(part, part_sigma, bank, ref, student, grad_rows, tau_s)


def backward_sums(student, teacher, bank, lse_diff, lse_t, tau_s, tau_t, plan: Plan):
    """Per chunk of the bank, sum_k (q_ik - p_ik) Q_k and sigma_i = sum_k (q_ik - p_ik):
    ([n_splits, B, d_pad] float32, [n_splits, B] float32)."""
    B, D = student.shape
    K = bank.shape[0]
    t = plan.tiles
    part = torch.empty((plan.bwd_n_splits, B, plan.d_pad), device=student.device, dtype=torch.float32)
    part_sigma = torch.empty((plan.bwd_n_splits, B), device=student.device, dtype=torch.float32)
    if plan.resident:
        # The planes are made again rather than kept from the forward: two passes over the bank's bytes,
        # against holding a bank-sized buffer for as long as autograd keeps the graph.
        ops, strides, extra = _resident_operands(student, teacher, bank, tau_s, tau_t, plan)
        if t.bwd_transposed:
            rrd_bwd_planes_kernel[(triton.cdiv(B, t.bwd_rows), plan.bwd_n_splits)](
                *ops, lse_diff, lse_t, part, part_sigma, B, K, plan.bwd_split_tiles, *extra,
                UPCAST=interpreting(), BLOCK_B=t.bwd_rows, BLOCK_K=t.block_k // t.bwd_split, D_PAD=t.block_dk,
                num_warps=t.bwd_warps, num_stages=t.bwd_stages,
            )
            return part, part_sigma
        for v in range(plan.n_dslices):  # D 512: one launch per output slice (resident.py says why)
            rrd_bwd_resident_kernel[(triton.cdiv(B, t.bwd_rows), plan.bwd_n_splits)](
                *ops, lse_diff, lse_t, part, part_sigma,
                B, K, D, *strides,
                LOG2E / tau_s, LOG2E / tau_t,
                plan.bwd_split_tiles, *extra,
                OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
                BLOCK_B=t.bwd_rows, BLOCK_K=t.block_k // t.bwd_split, D_PAD=t.block_dk, EVEN_D=D == t.block_dk,
                PLANES=plan.planes, BLOCK_DK=t.walk_dk or t.block_dk, BLOCK_DV=plan.block_dv, SLICE=v,
                num_warps=t.bwd_warps, num_stages=t.bwd_stages,
            )
        return part, part_sigma
    rrd_bwd_kernel[(plan.n_row_blocks, plan.n_splits, plan.n_dslices)](
        student, teacher, bank, lse_diff, lse_t, part, part_sigma,
        B, K, D, plan.d_pad, student.stride(0), teacher.stride(0), bank.stride(0),
        LOG2E / tau_s, LOG2E / tau_t,
        plan.tiles_per_split,
        OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
        BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_DK=t.block_dk, BLOCK_DV=plan.block_dv,
        num_warps=t.bwd_warps, num_stages=t.bwd_stages,
    )
    return part, part_sigma


def backward_finish(part, part_sigma, bank, ref, student, grad_rows, tau_s):
    """dL/dS from the partial sums [n, B, d_pad] and sigmas [n, B]: add them up, subtract sigma_i bank[ref_i]
    (the rounding guard), scale by 1/tau_s and the upstream weights, apply the normalisation Jacobian."""
    n, B, d_pad = part.shape
    D = student.shape[1]
    grad_rows = grad_rows.to(torch.float32)  # may be an expanded (stride-0) view: strides are passed on
    grad_student = torch.empty_like(student)
    rrd_bwd_finish_kernel[(triton.cdiv(B, FINISH.block_b),)](
        part, part_sigma, student, bank, ref, grad_rows, grad_student, B, bank.shape[0], D, d_pad,
        student.stride(0), bank.stride(0), grad_rows.stride(0), grad_student.stride(0), 1.0 / tau_s, n,
        OP_DTYPE=_op_dtype(student), UPCAST=interpreting(), BLOCK_B=FINISH.block_b, BLOCK_DK=FINISH.block_dk,
        num_warps=FINISH.num_warps,
    )
    return grad_student

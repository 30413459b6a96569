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
from .forward import N_STATE, rrd_fwd_kernel, rrd_merge_kernel
from .plans import FINISH, MERGE_BLOCK_B, DeviceLimits, Plan, current_limits, family, interpreting, mode_of
from .plans import make_plan as _make_plan

MAX_D = 512
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands, with torch's meaning:
# "highest" is true fp32 products (at tau 0.005 a logit is 200 x a dot product, and 3xTF32's ~4x larger
# product error would show in the loss); "high" and "medium" allow TF32.
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
        if family(limits) is None:
            return (f"no checked Triton tile plan fits this GPU (compute capability {limits.capability // 10}."
                    f"{limits.capability % 10}, {limits.max_shared_mem // 1024} KiB shared memory per block; "
                    "compute capability 8.0+ with 99 KiB or more is needed)")
    return None


def _on(device):
    """Run under the tensors' device: the current device decides the compile target and the stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _op_dtype(student: torch.Tensor):
    """Products run in the embeddings' dtype when it is fp16/bf16 (bank tiles are cast to it), else fp32."""
    return _TL_DTYPE[student.dtype]


def _fp32_precision() -> str:
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def make_plan(B: int, K: int, D: int, student_dtype: torch.dtype, limits: DeviceLimits | None = None,
              n_splits: int | None = None) -> Plan:
    """The plan a call with these sizes and embedding dtype gets on the current device (or `limits`)."""
    mode = mode_of(student_dtype == torch.float32, _fp32_precision())
    return _make_plan(B, K, D, limits or current_limits(), mode, n_splits)


def forward(student, teacher, bank, tau_s, tau_t, kl, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    B, D = student.shape
    K = bank.shape[0]
    f32 = dict(device=student.device, dtype=torch.float32)
    with _on(student.device):
        plan = make_plan(B, K, D, student.dtype, n_splits=n_splits)
        t = plan.tiles
        rows, lse_diff, lse_t = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(B, **f32)
        ref = torch.empty(B, device=student.device, dtype=torch.int32)
        part = torch.empty((N_STATE, plan.n_splits, B), **f32)
        part_idx = torch.empty((plan.n_splits, B), device=student.device, dtype=torch.int32)
        rrd_fwd_kernel[(plan.n_row_blocks, plan.n_splits)](
            student, teacher, bank, part, part_idx,
            B, K, D, student.stride(0), teacher.stride(0), bank.stride(0),
            LOG2E / tau_s, LOG2E / tau_t,
            plan.tiles_per_split,
            OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
            BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_DK=t.block_dk,
            num_warps=t.fwd_warps, num_stages=t.fwd_stages,
        )
        rrd_merge_kernel[(triton.cdiv(B, MERGE_BLOCK_B),)](
            part, part_idx, rows, lse_diff, lse_t, ref, B, plan.n_splits, int(bool(kl)), BLOCK_B=MERGE_BLOCK_B
        )
    # The contract's lse_s slot carries lse_s - lse_t (base 2): see backward.py for why.
    return rows, lse_diff, lse_t, ref


def backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    B, D = student.shape
    K = bank.shape[0]
    grad_rows = grad_rows.to(torch.float32)  # may be an expanded (stride-0) view: strides are passed on
    with _on(student.device):
        plan = make_plan(B, K, D, student.dtype, n_splits=n_splits)
        t = plan.tiles
        grad_student = torch.empty_like(student)
        part = torch.empty((plan.n_splits, B, plan.d_pad), device=student.device, dtype=torch.float32)
        part_sigma = torch.empty((plan.n_splits, B), device=student.device, dtype=torch.float32)
        rrd_bwd_kernel[(plan.n_row_blocks, plan.n_splits, plan.n_dslices)](
            student, teacher, bank, lse_s, lse_t, part, part_sigma,
            B, K, D, plan.d_pad, student.stride(0), teacher.stride(0), bank.stride(0),
            LOG2E / tau_s, LOG2E / tau_t,
            plan.tiles_per_split,
            OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
            BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_DK=t.block_dk, BLOCK_DV=t.block_dv,
            num_warps=t.bwd_warps, num_stages=t.bwd_stages,
        )
        rrd_bwd_finish_kernel[(triton.cdiv(B, FINISH.block_b),)](
            part, part_sigma, student, bank, ref, grad_rows, grad_student, B, K, D, plan.d_pad,
            student.stride(0), bank.stride(0), grad_rows.stride(0), grad_student.stride(0), 1.0 / tau_s,
            plan.n_splits,
            OP_DTYPE=_op_dtype(student), UPCAST=interpreting(), BLOCK_B=FINISH.block_b, BLOCK_DK=FINISH.block_dk,
            num_warps=FINISH.num_warps,
        )
    return grad_student

"""Host side of the Triton backend: tile sizes, the split over the bank, workspace, launches.

Implements the kernel-backend contract of rrd_kernels/backends.py. Inputs have been validated by
rrd_kernels._validate; nothing here synchronises with the device.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backward import rrd_bwd_finish_kernel, rrd_bwd_kernel
from .common import LOG2E
from .forward import N_STATE, rrd_fwd_kernel, rrd_merge_kernel

MAX_D = 512
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands, with torch's meaning:
# "highest" is true fp32 products (at tau 0.005 a logit is 200 x a dot product, and 3xTF32's ~4x larger
# product error would show in the loss); "high" and "medium" allow TF32.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unusable(device, dtype, bank_dtype, B, K, D) -> str | None:
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"triton kernels need CUDA tensors (got {device}; TRITON_INTERPRET=1 runs them on the CPU)"
    if dtype not in EMBED_DTYPES:
        return f"triton takes float32/bfloat16/float16 embeddings, got {dtype}"
    if bank_dtype not in BANK_DTYPES:
        return f"triton takes a float32/bfloat16/float16 bank, got {bank_dtype}"
    if D > MAX_D:
        return f"triton kernels support D <= {MAX_D}, got D = {D}"
    if B * D >= 2**31 or K >= 2**31:
        return f"triton kernels index rows with int32: B*D and K must stay below 2^31 (B={B}, K={K}, D={D})"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class Plan:
    block_b: int
    block_k: int
    block_d: int
    num_warps: int
    n_row_blocks: int
    n_splits: int
    tiles_per_split: int

    @property
    def split(self) -> bool:
        return self.n_splits > 1


def make_plan(B: int, K: int, D: int, device: torch.device, n_splits: int | None = None) -> Plan:
    """Tile sizes and the split of the bank. ``n_splits`` forces a split count (tests); by default the bank
    is split until about two programs per multiprocessor are in flight (none under the interpreter)."""
    block_d = max(16, triton.next_power_of_2(D))
    if block_d <= 128:
        block_b, block_k, num_warps = 64, 64, 4
    elif block_d <= 256:
        block_b, block_k, num_warps = 64, 32, 8
    else:
        block_b, block_k, num_warps = 32, 32, 8
    block_b = min(block_b, max(16, triton.next_power_of_2(B)))  # tl.dot needs >= 16 rows
    n_row_blocks = triton.cdiv(B, block_b)
    n_tiles = triton.cdiv(K, block_k)
    if n_splits is None:
        if device.type == "cuda":
            target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            n_splits = max(1, target // n_row_blocks)
        else:
            n_splits = 1
    n_splits = max(1, min(n_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty chunk: every split sees a valid column
    return Plan(block_b, block_k, block_d, num_warps, n_row_blocks, n_splits, tiles_per_split)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _op_dtype(student: torch.Tensor):
    """Products run in the embeddings' dtype when it is fp16/bf16 (bank tiles are cast to it), else fp32."""
    return _TL_DTYPE[student.dtype]


def _fp32_precision() -> str:
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def forward(student, teacher, bank, tau_s, tau_t, kl, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    B, D = student.shape
    K = bank.shape[0]
    plan = make_plan(B, K, D, student.device, n_splits)
    f32 = dict(device=student.device, dtype=torch.float32)
    rows, lse_s, lse_t = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(B, **f32)
    ref = torch.empty(B, device=student.device, dtype=torch.int32)
    if plan.split:
        part = torch.empty((N_STATE, plan.n_splits, B), **f32)
        part_idx = torch.empty((plan.n_splits, B), device=student.device, dtype=torch.int32)
    else:
        part, part_idx = rows, ref  # not touched when not split
    rrd_fwd_kernel[(plan.n_row_blocks, plan.n_splits)](
        student, teacher, bank, rows, lse_s, lse_t, ref, part, part_idx,
        B, K, D, student.stride(0), teacher.stride(0), bank.stride(0),
        LOG2E / tau_s, LOG2E / tau_t,
        plan.tiles_per_split,
        KL=bool(kl), SPLIT=plan.split,
        OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
        BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, BLOCK_D=plan.block_d,
        num_warps=plan.num_warps,
    )
    if plan.split:
        merge_block = 128
        rrd_merge_kernel[(triton.cdiv(B, merge_block),)](
            part, part_idx, rows, lse_s, lse_t, ref, B, plan.n_splits, KL=bool(kl), BLOCK_B=merge_block
        )
    return rows, lse_s, lse_t, ref


def backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t, n_splits=None):
    student, teacher, bank = _row_major(student), _row_major(teacher), _row_major(bank)
    B, D = student.shape
    K = bank.shape[0]
    plan = make_plan(B, K, D, student.device, n_splits)
    grad_rows = grad_rows.to(torch.float32)  # may be an expanded (stride-0) view: strides are passed on
    grad_student = torch.empty_like(student)
    if plan.split:
        part = torch.empty((plan.n_splits, B, plan.block_d), device=student.device, dtype=torch.float32)
        part_sigma = torch.empty((plan.n_splits, B), device=student.device, dtype=torch.float32)
    else:
        part, part_sigma = grad_student, lse_s  # not touched when not split
    rrd_bwd_kernel[(plan.n_row_blocks, plan.n_splits)](
        student, teacher, bank, lse_s, lse_t, ref, grad_rows, grad_student, part, part_sigma,
        B, K, D, student.stride(0), teacher.stride(0), bank.stride(0), grad_rows.stride(0),
        grad_student.stride(0),
        LOG2E / tau_s, LOG2E / tau_t, 1.0 / tau_s,
        plan.tiles_per_split,
        SPLIT=plan.split,
        OP_DTYPE=_op_dtype(student), PRECISION=_fp32_precision(), UPCAST=interpreting(),
        BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, BLOCK_D=plan.block_d,
        num_warps=plan.num_warps,
    )
    if plan.split:
        finish_block = 32 if plan.block_d <= 256 else 16
        rrd_bwd_finish_kernel[(triton.cdiv(B, finish_block),)](
            part, part_sigma, student, bank, ref, grad_rows, grad_student, B, D,
            student.stride(0), bank.stride(0), grad_rows.stride(0), grad_student.stride(0), 1.0 / tau_s,
            plan.n_splits,
            OP_DTYPE=_op_dtype(student), UPCAST=interpreting(), BLOCK_B=finish_block, BLOCK_D=plan.block_d,
        )
    return grad_student

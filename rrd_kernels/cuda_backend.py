"""CUDA C++ backend: the kernels of csrc/ behind the backend contract of backends.py.

The compiled module rrd_kernels._rrd_cuda (built by setup.py when nvcc is found) takes raw device pointers,
sizes, row strides, dtype codes and the stream; this file does everything that needs torch: it validates
the tensors (so no call can crash the interpreter), makes copies where the kernels need a unit feature
stride, allocates the outputs and workspaces, and passes data_ptr()s. Nothing here synchronises with the
device. Importing this module always works; without the extension every call says why it cannot run.

Kernels (csrc/rrd_resident.cuh for fp16 / bf16 at D <= 128: S and T held in registers, cp.async bank tiles,
the backward without feature slices; csrc/rrd_kernels.cuh otherwise; math in docs/math.md, structure in
docs/design.md and csrc/README.md, as the Triton backend):
    forward:  grid (row blocks of 64, bank splits) -> partial online dual-softmax state per (split, row),
              in the cancellation-free form of the Triton backend (max, count - 1, W, V, argmax)
    merge:    per row -> CE (or KL), base-2 lse_a - lse_b (in the lse_s slot, from the counts without
              cancellation) and the teacher's LSE lse_b, the student's argmax; a row meeting a non-finite
              logit gets NaN in all three float outputs and in its gradient
    backward: grid (row blocks, bank splits[, 64-feature slices]) -> partial sum_k (q - p) Q_k (q - p as
              p (2^delta - 1) where q and p are close) and
              sigma = sum_k (q - p) per split
    finish:   per row -> sum over splits, minus sigma Q_argmax (rounding guard), / tau_s, normalisation
              Jacobian, x upstream weight -> dL/dS
Precision: bf16 / fp16 embeddings use mma.sync on tensor cores (m16n8k16, bank converted to the embedding
dtype, fp32 accumulation); fp32 embeddings follow torch.get_float32_matmul_precision(): "highest" -> 3xTF32
mma.sync (hi / lo operands, three m16n8k8 products), "high" / "medium" -> TF32 mma.sync (m16n8k8).
"""
from __future__ import annotations

import functools

import torch

try:
    from . import _rrd_cuda as _ext

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built (no nvcc at install time, or RRD_SKIP_CUDA_BUILD=1)
    _ext = None
    _IMPORT_ERROR = exc

MAX_D = 512
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_FP32_FMA, MODE_TF32_MMA, MODE_FP16_MMA, MODE_BF16_MMA = 0, 1, 2, 3
_MODE_NAMES = {MODE_FP32_FMA: "3xTF32 mma", MODE_TF32_MMA: "TF32 mma", MODE_FP16_MMA: "fp16 mma",
               MODE_BF16_MMA: "bf16 mma"}


def extension_available() -> bool:
    return _ext is not None


def build_info() -> str | None:
    """Sources hash, architectures and nvcc version the extension was built with (None when not built)."""
    return None if _ext is None else _ext.BUILD_INFO


@functools.lru_cache(maxsize=None)
def _runtime_problem() -> str | None:
    """Why the extension cannot run at all on this machine (checked once), else None."""
    if _ext is None:
        return (
            f"the CUDA extension rrd_kernels._rrd_cuda is not built ({_IMPORT_ERROR}); reinstall rrd_kernels "
            "with nvcc available (CUDA_HOME or nvcc on PATH) and RRD_SKIP_CUDA_BUILD unset"
        )
    count, err = _ext.runtime_status()
    if err:
        return f"the CUDA runtime built into rrd_kernels._rrd_cuda cannot run here ({err})"
    if count == 0:
        return "no CUDA device is visible to rrd_kernels._rrd_cuda"
    return None


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    """torch.cuda.get_device_properties(index), once per device (it never changes in a process)."""
    return torch.cuda.get_device_properties(index)


def _num_sms(index: int) -> int:
    return _properties(index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _launch_env(index: int):
    """(context manager making device `index` current, handle of its current stream) for a launch. The
    module's own static CUDA runtime is pointed at the same device by the C++ side (cudaSetDevice)."""
    return torch.cuda.device(index), torch.cuda.current_stream(index).cuda_stream


def why_unusable(device, dtype, bank_dtype, B, K, D) -> str | None:
    """None when the cuda backend can run on inputs like these, else the reason (so backend="auto" can fall
    back and say why). Refuses exactly what cannot run: no extension, a CUDA runtime that cannot run or sees
    no device, non-CUDA tensors, dtypes other than fp32/fp16/bf16, empty inputs, D > 512, K > 2^30, and,
    from the device's own properties, compute capability < 8.0 or less shared memory per block than the
    kernels of this precision mode are launched with. Never raises for a visible device."""
    problem = _extension_or_device_problem(device)
    if problem is not None:
        return problem
    if dtype not in _DTYPE_CODES:
        return f"the cuda backend supports float32/float16/bfloat16 embeddings, got {dtype}"
    if bank_dtype not in _DTYPE_CODES:
        return f"the cuda backend supports a float32/float16/bfloat16 bank, got {bank_dtype}"
    if B < 1 or K < 1 or D < 1:
        return f"empty input (B={B}, K={K}, D={D})"
    if D > MAX_D:
        return f"the cuda backend supports D <= {MAX_D}, got D = {D}"
    if K > 2**30:
        return f"the cuda backend supports K <= 2^30 bank rows, got {K}"
    return _device_problem(_device_index(device), _mode(dtype))


def _extension_or_device_problem(device) -> str | None:
    """Why no kernel of the extension can run on `device`: not built, not CUDA tensors, a CUDA runtime that
    cannot run or sees no device; else None."""
    if _ext is None:
        return _runtime_problem()
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    return _runtime_problem()


def _device_problem(index: int, mode: int) -> str | None:
    """Why device `index` cannot run the kernels of precision `mode`, from its properties, else None."""
    launch_smem = getattr(_ext, "launch_smem", None)
    if launch_smem is None:  # a module built from older sources (build_info() says which)
        return "rrd_kernels._rrd_cuda is older than this package (no launch_smem); rebuild it (pip install -e .)"
    return _capability_problem(index, max(launch_smem(mode).values()), f"the cuda backend's {_MODE_NAMES[mode]} kernels")


def _capability_problem(index: int, smem_needed: int, what: str) -> str | None:
    """Why device `index` cannot run kernels that need smem_needed bytes of shared memory per block: compute
    capability < 8.0 (bf16/tf32 mma.sync, cvt.rna.tf32: the build targets sm_80+), or less shared memory.
    Launches do not opt in to more than the default per-block shared memory (cudaFuncSetAttribute), so what
    counts is shared_memory_per_block (48 KiB on every CUDA GPU so far; 49152 when torch is too old to
    report it). The kernels' needs are <= 48 KiB by a static_assert; this guards a device that gives less."""
    props = _properties(index)
    capability = (props.major, props.minor)
    if capability < (8, 0):
        return (f"the cuda backend needs compute capability >= 8.0 (bf16/tf32 mma.sync, cvt.rna.tf32), got "
                f"{capability[0]}.{capability[1]} on cuda:{index} ({props.name})")
    have = getattr(props, "shared_memory_per_block", 48 * 1024)
    if smem_needed > have:
        return f"{what} need {smem_needed} bytes of shared memory per block; cuda:{index} ({props.name}) gives {have}"
    return None


def _require_usable(student, teacher, bank) -> None:
    if student.dim() != 2 or teacher.shape != student.shape or bank.dim() != 2 or bank.shape[1] != student.shape[1]:
        raise RuntimeError(
            f"backend='cuda': shapes must be B x D, B x D, K x D; got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}, {tuple(bank.shape)}"
        )
    if teacher.device != student.device or bank.device != student.device or teacher.dtype != student.dtype:
        raise RuntimeError("backend='cuda': student, teacher and bank must share a device; teacher the student's dtype")
    B, D = student.shape
    reason = why_unusable(student.device, student.dtype, bank.dtype, B, bank.shape[0], D)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run this call: {reason}")


def _unit_feature_stride(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (rows x D) with unit feature stride and a row stride >= D, copying only when needed; and that row
    stride in elements."""
    rows, d = x.shape
    ok = (d == 1 or x.stride(1) == 1) and (rows == 1 or x.stride(0) >= d)
    if not ok:
        x = x.contiguous()
    return x, (x.stride(0) if rows > 1 else d)


def _mode(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return MODE_BF16_MMA
    if dtype == torch.float16:
        return MODE_FP16_MMA
    return MODE_FP32_FMA if torch.get_float32_matmul_precision() == "highest" else MODE_TF32_MMA


def _common(student, teacher, bank):
    _require_usable(student, teacher, bank)
    s, ld_s = _unit_feature_stride(student.detach())
    t, ld_t = _unit_feature_stride(teacher.detach())
    q, ld_q = _unit_feature_stride(bank.detach())
    B, D = s.shape
    K = q.shape[0]
    index = _device_index(s.device)
    args = dict(
        student=s.data_ptr(), teacher=t.data_ptr(), bank=q.data_ptr(), ld_s=ld_s, ld_t=ld_t, ld_q=ld_q,
        B=B, K=K, D=D, emb_dtype=_DTYPE_CODES[s.dtype], bank_dtype=_DTYPE_CODES[q.dtype], mode=_mode(s.dtype),
        device=index,
    )
    return (s, t, q), args, index


def forward(student, teacher, bank, tau_s, tau_t, kl):
    """(rows, lse_s, lse_t, ref): per-row CE (or KL), float32; in the lse_s slot lse_a - lse_b and in lse_t
    lse_b (base 2, float32; read only by this backend's backward); ref, int32: the student's argmax bank row
    per row (the backward's rounding guard)."""
    keep, args, index = _common(student, teacher, bank)
    B, K, D = args["B"], args["K"], args["D"]
    device = keep[0].device
    plan = _ext.forward_plan(B, K, D, _num_sms(index))
    part = torch.empty(plan["workspace_floats"], dtype=torch.float32, device=device)
    rows = torch.empty(B, dtype=torch.float32, device=device)
    lse_s = torch.empty_like(rows)
    lse_t = torch.empty_like(rows)
    ref = torch.empty(B, dtype=torch.int32, device=device)
    context, stream = _launch_env(index)
    with context:
        _ext.forward(
            **args, tau_s=float(tau_s), tau_t=float(tau_t), kl=bool(kl), num_splits=plan["num_splits"],
            chunk=plan["chunk"], part=part.data_ptr(), rows=rows.data_ptr(), lse_s=lse_s.data_ptr(),
            lse_t=lse_t.data_ptr(), ref=ref.data_ptr(), stream=stream,
        )
    return rows, lse_s, lse_t, ref


def backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t):
    """dL/dS (B x D, student's dtype) for upstream per-row weights grad_rows (any stride, e.g. expanded);
    lse_s, lse_t, ref as the forward returned them (ref outside [0, K) is clamped by the kernel: any bank row
    is algebraically exact, the argmax is the accurate one)."""
    keep, args, index = _common(student, teacher, bank)
    B, K, D = args["B"], args["K"], args["D"]
    device = keep[0].device
    for name, x in (("grad_rows", grad_rows), ("lse_s", lse_s), ("lse_t", lse_t), ("ref", ref)):
        if x.device != device or x.dim() != 1 or x.shape[0] != B:
            raise RuntimeError(f"backend='cuda': {name} must be a ({B},) tensor on {device}, got "
                               f"{tuple(x.shape)} on {x.device}")
    grad_rows = grad_rows.detach().to(torch.float32)  # keeps an expanded (stride 0) view as it is
    lse_s = lse_s.detach().to(torch.float32).contiguous()
    lse_t = lse_t.detach().to(torch.float32).contiguous()
    ref = ref.detach().to(torch.int32).contiguous()
    plan = _ext.backward_plan(B, K, D, _num_sms(index))
    gpart = torch.empty(plan["workspace_floats"], dtype=torch.float32, device=device)
    grad = torch.empty((B, D), dtype=keep[0].dtype, device=device)
    context, stream = _launch_env(index)
    with context:
        _ext.backward(
            **args, tau_s=float(tau_s), tau_t=float(tau_t), num_splits=plan["num_splits"], chunk=plan["chunk"],
            lse_s=lse_s.data_ptr(), lse_t=lse_t.data_ptr(), ref=ref.data_ptr(), grad_rows=grad_rows.data_ptr(),
            grad_stride=grad_rows.stride(0) if B > 1 else 0, gpart=gpart.data_ptr(), grad_student=grad.data_ptr(),
            stream=stream,
        )
    return grad


# ---- the gathered memory (csrc/rrd_gathered.cuh; rrd_kernels/gathered.py has the function) ----------------

GATHERED_MAX_N = 2**31 - 1  # memory rows are int32 inside the kernels (the argmax row)


def gathered_unusable(device, memory_dtype, B, K1, D, N) -> str | None:
    """None when the gathered-memory kernels can run on inputs like these (fp32 embeddings; "similarity"
    scores, which the caller checks), else the reason: no extension or one built before them, no usable
    CUDA runtime or device, non-CUDA tensors, a memory dtype other than fp32/fp16/bf16, empty inputs,
    D > 512, K1 > 2^30, N >= 2^31, compute capability < 8.0 or too little shared memory per block."""
    problem = _extension_or_device_problem(device)
    if problem is not None:
        return problem
    if not hasattr(_ext, "gathered"):
        return "rrd_kernels._rrd_cuda is older than this package (no gathered kernels); rebuild it (pip install -e .)"
    if memory_dtype not in _DTYPE_CODES:
        return f"the cuda gathered kernels support float32/float16/bfloat16 memories, got {memory_dtype}"
    if B < 1 or K1 < 1 or D < 1 or N < 1:
        return f"empty input (B={B}, K+1={K1}, D={D}, N={N})"
    if D > MAX_D:
        return f"the cuda backend supports D <= {MAX_D}, got D = {D}"
    if K1 > 2**30:
        return f"the cuda gathered kernels support K+1 <= 2^30 columns, got {K1}"
    if N > GATHERED_MAX_N:
        return f"the cuda gathered kernels index memory rows with int32: N must stay below 2^31, got {N}"
    return _capability_problem(_device_index(device), max(_ext.gathered_smem().values()), "the cuda gathered kernels")


def _check_gathered_args(student, teacher, memory_s, memory_t, index) -> None:
    """Shapes and dtypes the kernels rely on, each error naming its argument (the public entry,
    rrd_kernels.gathered.gathered_rrd_rows, checks these too; this guards direct calls)."""
    tensors = dict(student=student, teacher=teacher, memory_s=memory_s, memory_t=memory_t, index=index)
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"backend='cuda': {name} must be a 2-D tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.device != student.device:
            raise ValueError(f"backend='cuda': {name} is on {x.device} but student is on {student.device}")
    B, D = student.shape
    if teacher.shape != student.shape:
        raise ValueError(f"backend='cuda': teacher must have the shape of student {(B, D)}, got {tuple(teacher.shape)}")
    if memory_s.shape[1] != D or memory_t.shape != memory_s.shape:
        raise ValueError(f"backend='cuda': memory_s and memory_t must both be N x {D}, got "
                         f"{tuple(memory_s.shape)} and {tuple(memory_t.shape)}")
    if index.shape[0] != B:
        raise ValueError(f"backend='cuda': index must have B = {B} rows, got {tuple(index.shape)}")
    if student.dtype != torch.float32 or teacher.dtype != torch.float32:
        raise TypeError(f"backend='cuda': student and teacher must be float32 (the compute dtype), got "
                        f"{student.dtype} and {teacher.dtype}")
    if memory_t.dtype != memory_s.dtype:
        raise TypeError(f"backend='cuda': memory_t must have memory_s's dtype {memory_s.dtype}, got {memory_t.dtype}")
    if index.dtype != torch.int64:
        raise TypeError(f"backend='cuda': index must be int64, got {index.dtype}")


def _gathered_memories(memory_s, memory_t):
    """Both memories with unit feature stride and one common row stride (a copy only where needed)."""
    ms, ld_s = _unit_feature_stride(memory_s.detach())
    mt, ld_t = _unit_feature_stride(memory_t.detach())
    if ld_s != ld_t:
        ms, mt = ms.contiguous(), mt.contiguous()
        ld_s = ms.shape[1]
    return ms, mt, ld_s


def gathered_rows_and_grad(student, teacher, memory_s, memory_t, index, tau_s, tau_t, kl, need_grad=True,
                           n_splits=None):
    """(rows [B] float32, grad [B, D] float32 or None): per-row losses of raw fp32 embeddings against their
    gathered memory rows ("similarity" scores; rrd_kernels/gathered.py) and each row's gradient with respect
    to its raw student row for upstream weight 1. index: B x (K+1) int64; a value outside [0, N) is never
    read, and its row comes back NaN (the caller clamps and reports such rows). n_splits: columns split per
    row (default: the plan's, from the SM count). Refuses CPU tensors and bad arguments with an error that
    names the argument; no host-device synchronisation."""
    _check_gathered_args(student, teacher, memory_s, memory_t, index)
    B, D = student.shape
    K1, N = index.shape[1], memory_s.shape[0]
    reason = gathered_unusable(student.device, memory_s.dtype, B, K1, D, N)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run this call: {reason}")
    s, ld_s = _unit_feature_stride(student.detach())
    t, ld_t = _unit_feature_stride(teacher.detach())
    ms, mt, ld_m = _gathered_memories(memory_s, memory_t)
    idx, ld_idx = _unit_feature_stride(index)
    device_index = _device_index(s.device)
    plan = _ext.gathered_plan(B, K1, D, _num_sms(device_index))
    num_splits, chunk = plan["num_splits"], plan["chunk"]
    if n_splits is not None:
        if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
            raise ValueError(f"n_splits must be None or a positive int, got {n_splits!r}")
        chunk = -(-K1 // min(n_splits, K1))
        num_splits = -(-K1 // chunk)
    f32 = dict(dtype=torch.float32, device=s.device)
    workspace = torch.empty(num_splits * B * (8 + D + 1), **f32)
    rows = torch.empty(B, **f32)
    ref = torch.empty(B, dtype=torch.int32, device=s.device)
    grad = torch.empty((B, D), **f32) if need_grad else None
    context, stream = _launch_env(device_index)
    with context:
        _ext.gathered(
            student=s.data_ptr(), teacher=t.data_ptr(), memory_s=ms.data_ptr(), memory_t=mt.data_ptr(),
            index=idx.data_ptr(), ld_s=ld_s, ld_t=ld_t, ld_m=ld_m, ld_idx=ld_idx, B=B, K1=K1, D=D, N=N,
            mem_dtype=_DTYPE_CODES[ms.dtype], tau_s=float(tau_s), tau_t=float(tau_t), kl=bool(kl),
            num_splits=num_splits, chunk=chunk, workspace=workspace.data_ptr(), rows=rows.data_ptr(),
            ref=ref.data_ptr(), grad=grad.data_ptr() if grad is not None else 0, device=device_index,
            stream=stream,
        )
    return rows, grad

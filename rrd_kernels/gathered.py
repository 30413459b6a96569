"""The RRD loss against a gathered memory: sample i meets its own K+1 memory rows, index[i, :].

This is the form of the authors' momentum-memory module (CRD-style; rrd_kernels/momentum.py and
docs/momentum-memory.md). Two memories of N rows each, one per view: ``memory_s`` holds student embeddings,
``memory_t`` teacher embeddings. Scores are cross-view, as in the authors' code:

    S_ik = s_i . memory_t[index_ik]        (student against the teacher memory)
    T_ik = t_i . memory_s[index_ik]        (teacher against the student memory)

with s_i, t_i the unit-normalised embeddings (eps 1e-12, as F.normalize). Logits per ``scores``:

    "similarity":  a_ik = S_ik / tau_s                       b_ik = T_ik / tau_t
    "faithful":    a_ik = exp(S_ik / nce_t) / Z_s / tau_s    b_ik = exp(T_ik / nce_t) / Z_t / tau_t

and per row CE_i = -sum_k softmax(b_i)_k log softmax(a_i)_k ("kl" subtracts the teacher entropy). Only the
student learns: the teacher side and both memories are detached, as the authors do. In "faithful" mode
Z = (Z_s, Z_t) is the authors' normalisation constant: an entry < 0 means "not set yet", and is then set
from this batch to N * mean_ik exp(score / nce_t) (over the valid rows), used for this batch and returned.

The contract every implementation here meets (the seam where fused Triton/CUDA kernels plug in, issue 17
part 3; GATHERED_BACKENDS maps a name to such a function):

    impl(student, teacher, memory_s, memory_t, index, valid, z, tau_s, tau_t, kl, faithful, nce_t, chunk)
        -> (rows, z_used)
    student, teacher  B x D raw embeddings, already cast to the compute dtype; student may require grad.
    memory_s/_t       N x D, any float dtype; read only, never written, no gradient.
    index             B x (K+1) int64 on the device, every value in [0, N) (clamped by the caller).
    valid             None or B bools: rows marked False come back NaN (loss and gradient) and do not count
                      in Z.
    z                 None ("similarity") or the 2 stored constants (Z_s, Z_t); z_used in z's dtype.
    rows              B per-row losses in the compute dtype, differentiable with respect to student only.
    No B x (K+1) x D tensor; no host-device synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import BANK_DTYPES, EMBED_DTYPES, check_choice, check_temperature, check_tensor
from .reference import NORM_EPS, OBJECTIVES

SCORES = ("similarity", "faithful")
# Elements of one B x chunk x D gathered slice (per memory): 4M elements = 16 MiB in fp32.
GATHER_ELEMENTS = 1 << 22


def compute_dtype(student_dtype: torch.dtype, memory_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and fp32 inputs (as rrd_loss accumulates), float64 when either input is float64."""
    return torch.promote_types(torch.promote_types(student_dtype, torch.float32), memory_dtype)


def clamp_index(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index clamped into [0, n), per-row flag 'every entry was in range'), on the device, no sync. Rows
    with a bad entry are then computed on clamped (wrong but in-bounds) rows and reported as NaN."""
    inside = (index >= 0) & (index < n)
    ok = inside if index.dim() == 1 else inside.all(dim=1)
    return index.clamp(0, n - 1), ok


def _z_from_batch(exp_scores, valid, z, n):
    """The authors' Z: N * mean of exp(score / nce_t) over the batch, for each entry of z still < 0.
    Over the valid rows only; with none valid, z stays unset. Rounded to z's dtype (the authors keep Z in
    their fp32 params buffer and read it back with .item())."""
    news, counts = [], []
    for e in exp_scores:
        if valid is None:
            news.append(e.mean() * n)
            counts.append(None)
        else:
            kept = torch.where(valid[:, None], e, torch.zeros((), dtype=e.dtype, device=e.device))
            count = valid.sum() * e.shape[1]
            news.append(kept.sum() / count.clamp_min(1) * n)
            counts.append(count)
    z_new = torch.stack(news).to(z.dtype)
    unset = z < 0
    if valid is not None:
        unset = unset & (counts[0] > 0)
    return torch.where(unset, z_new, z)


def _mark_invalid(x: torch.Tensor, valid) -> torch.Tensor:
    """x with the rows of invalid samples NaN. A product, not a where: through autograd (the reference) the
    gradient of such a row is NaN too, as the chunked path reports it."""
    if valid is None:
        return x
    shape = (-1,) + (1,) * (x.dim() - 1)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.where(valid.view(shape), one, one * float("nan"))


def gathered_reference(student, teacher, memory_s, memory_t, index, tau_s, tau_t, objective="ce",
                       scores="similarity", nce_t=0.07, z=None, valid=None):
    """The specification, written plainly: materialises the B x (K+1) x D gathered rows and lets autograd
    differentiate. Computed in student.dtype (memories cast to it): float64 inputs give the oracle. Same
    arguments and result as gathered_rrd_rows (index must already be in range). For tests and small sizes."""
    dtype = student.dtype
    s = F.normalize(student, dim=1, eps=NORM_EPS)
    t = F.normalize(teacher.detach().to(dtype), dim=1, eps=NORM_EPS)
    rows_t = memory_t.detach().to(dtype)[index]  # B x (K+1) x D
    rows_s = memory_s.detach().to(dtype)[index]
    S = torch.einsum("bd,bkd->bk", s, rows_t)
    T = torch.einsum("bd,bkd->bk", t, rows_s)
    z_used = None
    if scores == "faithful":
        E_s, E_t = torch.exp(S / nce_t), torch.exp(T / nce_t)
        z_used = _z_from_batch((E_s.detach(), E_t.detach()), valid, z, memory_s.shape[0])
        zc = z_used.to(dtype)
        a, b = E_s / zc[0] / tau_s, E_t / zc[1] / tau_t
    else:
        a, b = S / tau_s, T / tau_t
    log_p = F.log_softmax(b, dim=1)
    p = log_p.exp()
    rows = -(p * F.log_softmax(a, dim=1)).sum(dim=1)
    if objective == "kl":
        rows = rows + (p * log_p).sum(dim=1)
    return _mark_invalid(rows, valid), z_used


def _spans(n_cols: int, B: int, D: int, chunk):
    step = chunk if chunk is not None else max(1, GATHER_ELEMENTS // max(1, B * D))
    return [(c0, min(c0 + step, n_cols)) for c0 in range(0, n_cols, step)]


def _gather(memory, index, c0, c1, dtype):
    """Rows memory[index[:, c0:c1]] as a B x c x D tensor in dtype: the only gathered slice alive."""
    B = index.shape[0]
    cols = index[:, c0:c1].reshape(-1)
    return memory.index_select(0, cols).view(B, c1 - c0, memory.shape[1]).to(dtype)


class _GatheredRRD(torch.autograd.Function):
    """Per-row loss of unit embeddings s, t against the gathered memories, chunk by chunk over the K+1
    columns. The gradient with respect to s is formed in the forward, in a second chunked pass:

        d row_i / d s_i = sum_k (q_ik - p_ik) (d a_ik / d S_ik) memory_t[index_ik]

    and the backward only scales it by the upstream weights. It cannot be left to the backward: the module
    overwrites memory rows in place right after the loss (the authors' order), and a regather in the
    backward would read the updated rows, not the ones the loss used."""

    @staticmethod
    def forward(ctx, s, t, memory_s, memory_t, index, valid, z, tau_s, tau_t, kl, faithful, nce_t, chunk):
        dtype = s.dtype
        B, D = s.shape
        spans = _spans(index.shape[1], B, D, chunk)
        S = torch.empty(index.shape, dtype=dtype, device=s.device)
        T = torch.empty_like(S)
        for c0, c1 in spans:
            S[:, c0:c1] = torch.bmm(_gather(memory_t, index, c0, c1, dtype), s.unsqueeze(2)).squeeze(2)
            T[:, c0:c1] = torch.bmm(_gather(memory_s, index, c0, c1, dtype), t.unsqueeze(2)).squeeze(2)
        if faithful:
            S, T = torch.exp(S / nce_t), torch.exp(T / nce_t)  # the scores are not needed after this
            z_used = _z_from_batch((S, T), valid, z, memory_s.shape[0])
            zc = z_used.to(dtype)
            a, b = S / (zc[0] * tau_s), T / (zc[1] * tau_t)
        else:
            z_used = s.new_empty(0)
            a, b = S / tau_s, T / tau_t
        del S, T
        log_q = F.log_softmax(a, dim=1)
        log_p = F.log_softmax(b, dim=1)
        p = log_p.exp()
        rows = -(p * log_q).sum(dim=1)
        if kl:
            rows = rows + (p * log_p).sum(dim=1)
        rows = _mark_invalid(rows, valid)
        if ctx.needs_input_grad[0]:
            coef = log_q.exp() - p
            # d a / d S: 1 / tau_s, or for exp(S / nce_t) / (Z tau_s) the value itself over nce_t.
            coef = coef * (a / nce_t) if faithful else coef / tau_s
            grad = torch.zeros_like(s)
            for c0, c1 in spans:
                grad += torch.bmm(coef[:, None, c0:c1], _gather(memory_t, index, c0, c1, dtype)).squeeze(1)
            ctx.save_for_backward(_mark_invalid(grad, valid))
        ctx.mark_non_differentiable(z_used)
        return rows, z_used

    @staticmethod
    def backward(ctx, grad_rows, _grad_z):
        (grad,) = ctx.saved_tensors
        return (grad_rows[:, None] * grad,) + (None,) * 12


def _torch_rows(student, teacher, memory_s, memory_t, index, valid, z, tau_s, tau_t, kl, faithful, nce_t, chunk):
    s = F.normalize(student, dim=1, eps=NORM_EPS)
    t = F.normalize(teacher.detach(), dim=1, eps=NORM_EPS)
    rows, z_used = _GatheredRRD.apply(s, t, memory_s.detach(), memory_t.detach(), index, valid, z,
                                      tau_s, tau_t, kl, faithful, nce_t, chunk)
    return rows, (z_used if faithful else None)


class _FusedGatheredRRD(torch.autograd.Function):
    """A backend's fused kernels (rows_and_grad: gathered_rows_and_grad of rrd_kernels/triton_kernels/
    gathered.py or of rrd_kernels/cuda_backend.py): loss rows and each row's gradient in the forward call
    (for the reason _GatheredRRD gives), the backward only scales the gradient."""

    @staticmethod
    def forward(ctx, rows_and_grad, student, teacher, memory_s, memory_t, index, valid, tau_s, tau_t, kl):
        rows, grad = rows_and_grad(student.detach(), teacher, memory_s, memory_t, index, tau_s, tau_t, kl)
        ctx.save_for_backward(_mark_invalid(grad, valid))
        return _mark_invalid(rows, valid)

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (None, grad_rows[:, None] * grad) + (None,) * 8


def triton_unusable(student, memory_s, index, faithful) -> str | None:
    """Why the fused gathered kernels cannot run this call, or None: they take fp32 embeddings (the compute
    dtype), "similarity" scores, and what the Triton backend's checks allow (a CUDA device, or the CPU
    interpreter; D <= 512; float32/bfloat16/float16 memories)."""
    if faithful:
        return "the fused gathered kernels compute scores='similarity' only; 'faithful' runs on backend 'torch'"
    if student.dtype != torch.float32:
        return f"the fused gathered kernels take float32 embeddings, got {student.dtype} (float64 runs on torch)"
    from .backends import unusable_reason

    if memory_s.shape[0] >= 2**31:
        return f"the fused gathered kernels index memory rows with int32: N must stay below 2^31, got {memory_s.shape[0]}"
    B, D = student.shape
    return unusable_reason("triton", student.device, torch.float32, memory_s.dtype, B, index.shape[1], D)


def cuda_unusable(student, memory_s, index, faithful) -> str | None:
    """Why the CUDA C++ gathered kernels (csrc/rrd_gathered.cuh) cannot run this call, or None: they take
    fp32 embeddings, "similarity" scores (the Z of "faithful" needs the whole batch's scores before any
    logit: a pass of its own, left to torch), and what cuda_backend.gathered_unusable allows (the extension
    built with them, a CUDA device of compute capability >= 8.0, fp32/fp16/bf16 memories, D <= 512,
    N < 2^31)."""
    if faithful:
        return "the cuda gathered kernels compute scores='similarity' only; 'faithful' runs on backend 'torch'"
    if student.dtype != torch.float32:
        return f"the cuda gathered kernels take float32 embeddings, got {student.dtype} (float64 runs on torch)"
    from .cuda_backend import gathered_unusable

    B, D = student.shape
    return gathered_unusable(student.device, memory_s.dtype, B, index.shape[1], D, memory_s.shape[0])


def _fused(name, kernel):
    """The contract's impl for a fused backend (kernel() gives its gathered_rows_and_grad). It does not
    check the call again: resolve_gathered_backend has."""
    def impl(student, teacher, memory_s, memory_t, index, valid, z, tau_s, tau_t, kl, faithful, nce_t, chunk):
        rows = _FusedGatheredRRD.apply(kernel(), student, teacher.detach(), memory_s.detach(), memory_t.detach(),
                                       index, valid, tau_s, tau_t, kl)
        return rows, None

    impl.__name__ = impl.__qualname__ = f"_{name}_rows"
    return impl


def _triton_kernel():
    from .triton_kernels.gathered import gathered_rows_and_grad

    return gathered_rows_and_grad


def _cuda_kernel():
    from .cuda_backend import gathered_rows_and_grad

    return gathered_rows_and_grad


# backend name -> implementation of the contract in the module docstring. A fused backend runs only what
# its FUSED_UNUSABLE check allows, checked once per call by resolve_gathered_backend.
GATHERED_BACKENDS = {"torch": _torch_rows, "triton": _fused("triton", _triton_kernel),
                     "cuda": _fused("cuda", _cuda_kernel)}
FUSED_UNUSABLE = {"triton": triton_unusable, "cuda": cuda_unusable}
AUTO_ORDER = ("triton", "cuda")  # what "auto" tries for CUDA tensors, first usable wins (else torch)


def fused_unusable(name, student, memory_s, index, faithful) -> str | None:
    """Why backend `name` cannot run this call, or None ("torch" always can)."""
    check = FUSED_UNUSABLE.get(name)
    return None if check is None else check(student, memory_s, index, faithful)


def resolve_gathered_backend(backend, student, memory_s, index, faithful) -> str:
    """The backend that runs the call, each fused backend's check evaluated at most once: "auto" takes the
    first of AUTO_ORDER that can run CUDA tensors, else "torch"; an explicit fused backend that cannot run
    the call raises ValueError with its reason."""
    if backend == "auto":
        if student.device.type == "cuda":
            for name in AUTO_ORDER:
                if fused_unusable(name, student, memory_s, index, faithful) is None:
                    return name
        return "torch"
    reason = fused_unusable(backend, student, memory_s, index, faithful)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def check_gathered_inputs(student, teacher, memory_s, memory_t, index, tau_s, tau_t, objective, scores, nce_t,
                          z, valid):
    """Shapes, dtypes, devices and options (host metadata only). Returns (tau_s, tau_t, nce_t) as floats."""
    check_tensor(student, "student", 2, "B x D embeddings")
    check_tensor(teacher, "teacher", 2, "B x D embeddings")
    check_tensor(memory_s, "memory_s", 2, "N x D student memory")
    check_tensor(memory_t, "memory_t", 2, "N x D teacher memory")
    check_tensor(index, "index", 2, "B x (K+1) memory rows per sample")
    B, D = student.shape
    if B == 0 or D == 0:
        raise ValueError(f"student must have B >= 1 rows and D >= 1 features, got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the shape of student {tuple(student.shape)}, got {tuple(teacher.shape)}")
    if memory_s.shape[0] == 0 or memory_s.shape[1] != D:
        raise ValueError(f"memory_s must be N x {D} with N >= 1 (D like student), got {tuple(memory_s.shape)}")
    if memory_t.shape != memory_s.shape:
        raise ValueError(f"memory_t must have the shape of memory_s {tuple(memory_s.shape)}, "
                         f"got {tuple(memory_t.shape)}")
    if index.shape[0] != B or index.shape[1] == 0:
        raise ValueError(f"index must be ({B}, K+1) with K+1 >= 1, got shape {tuple(index.shape)}")
    if student.dtype not in EMBED_DTYPES or teacher.dtype != student.dtype:
        raise TypeError(f"student and teacher must share a float dtype {EMBED_DTYPES}, got {student.dtype} "
                        f"and {teacher.dtype}")
    if memory_s.dtype not in BANK_DTYPES or memory_t.dtype != memory_s.dtype:
        raise TypeError(f"memory_s and memory_t must share a float dtype {BANK_DTYPES}, got {memory_s.dtype} "
                        f"and {memory_t.dtype}")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    for name, x in (("teacher", teacher), ("memory_s", memory_s), ("memory_t", memory_t), ("index", index)):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but student is on {student.device}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or valid.shape != (B,) or valid.device != student.device):
        raise ValueError(f"valid must be None or a bool tensor of shape ({B},) on {student.device}")
    check_choice(objective, "objective", OBJECTIVES)
    check_choice(scores, "scores", SCORES)
    if scores == "faithful":
        if not isinstance(z, torch.Tensor) or z.shape != (2,) or not z.is_floating_point():
            raise ValueError("z must be a float tensor of 2 entries (Z_s, Z_t; < 0 = set from this batch) "
                             "for scores='faithful'")
        if z.device != student.device:
            raise ValueError(f"z is on {z.device} but student is on {student.device}")
    elif z is not None:
        raise ValueError("z is only used with scores='faithful'; pass z=None")
    return (check_temperature(tau_s, "tau_s"), check_temperature(tau_t, "tau_t"),
            check_temperature(nce_t, "nce_t"))


def gathered_rrd_rows(student, teacher, memory_s, memory_t, index, *, tau_s, tau_t, objective="ce",
                      scores="similarity", nce_t=0.07, z=None, valid=None, backend="auto", chunk=None):
    """Per-row RRD loss of each sample against its own gathered memory rows (the module docstring has the
    function). Returns (rows, z_used): B losses (float32, float64 for float64 inputs), differentiable with
    respect to ``student`` only, and for scores="faithful" the Z constants this batch used (else None).

    index: B x (K+1) int64 rows of the memories. On the CPU, a value outside [0, N) is a ValueError (the
    check is free there); on a GPU it is not checked (that would synchronise): it is clamped into range and
    its row comes back NaN, loss and gradient, and does not count in Z. ``valid`` (B bools) marks further
    rows to report so. backend: "auto" (the fused Triton kernels for CUDA tensors they can run, else the
    CUDA C++ ones, else torch), "torch" (the chunked torch path), "triton" or "cuda" (an error naming the
    reason where it cannot run: scores "faithful", float64; for triton no GPU and no interpreter, for cuda
    no GPU or no built extension). chunk: columns per gathered slice of the torch path
    (default: B x chunk x D <= 4M elements)."""
    tau_s, tau_t, nce_t = check_gathered_inputs(student, teacher, memory_s, memory_t, index, tau_s, tau_t,
                                                objective, scores, nce_t, z, valid)
    if backend not in ("auto",) + tuple(GATHERED_BACKENDS):
        raise ValueError(f"backend must be one of {['auto', *GATHERED_BACKENDS]} for a gathered memory, "
                         f"got {backend!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
    n = memory_s.shape[0]
    if index.device.type == "cpu":
        if bool((index < 0).any()) or bool((index >= n).any()):
            raise ValueError(f"index holds values outside [0, {n}) (the memories have {n} rows)")
    else:
        index, ok = clamp_index(index, n)
        valid = ok if valid is None else valid & ok
    dtype = compute_dtype(student.dtype, memory_s.dtype)
    student, teacher = student.to(dtype), teacher.to(dtype)
    impl = GATHERED_BACKENDS[resolve_gathered_backend(backend, student, memory_s, index, scores == "faithful")]
    # Autocast off: the scores and softmaxes are computed in fp32 (or float64) whatever the caller's region.
    with torch.autocast(device_type=student.device.type, enabled=False):
        return impl(student, teacher, memory_s, memory_t, index, valid, z, tau_s, tau_t,
                    objective == "kl", scores == "faithful", nce_t, chunk)

"""Backend registry and choice: which implementation computes a given call.

A kernel backend is a module with three functions (the contract the op in ops.py relies on):

    why_unusable(device, dtype, bank_dtype, B, K, D) -> str | None
        None when the backend can run on inputs of this device, embedding dtype, bank dtype and size, else
        the reason (shown to the user). Plain values, not tensors: torch.compile evaluates the choice once
        at trace time (the tensors' guards on device and dtype trigger a new trace if they change).
    forward(student, teacher, bank, tau_s, tau_t, kl) -> (rows, lse_s, lse_t, ref)
        rows: per-row loss (float32, CE or KL when kl). Saved for the backward, read only by the same
        backend's backward: lse_s, lse_t, per-row log-sum-exp of the student and teacher logits (float32,
        base at the backend's choice; Triton: base 2), and ref, an int32 bank-row index per row (the
        student's argmax; the backward subtracts sigma_i Q_ref to cancel rounding, and any valid index is
        algebraically exact). lse_t may carry R values per row as [R B], the LSEs first, where the module
        sets LSE_T_ROWS = R (Triton: 2, the second a bound on every |q_ik - p_ik| of the row).
    backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t) -> grad_student
        dL/dS for upstream per-row weights grad_rows (may be an expanded, stride-0 view), in student's dtype.

"torch" is the reference in plain PyTorch with autograd; it needs no module here.

Sharded bank (RRDLoss(shard_bank=True), rrd_kernels/sharded_loss.py). Each rank holds rows [lo, hi) of the
global bank and works on the all-gathered batch (N = B x W rows); a backend that supports it has a module
in SHARDED_MODULES with four functions (the split and merge of docs/math.md section 4, across ranks; see
docs/sharded-bank.md):

    forward_partial(student, teacher, shard, tau_s, tau_t, k_offset, n_splits=None) -> (planes, idx)
        The per-row partial online-softmax state over this shard: planes [P, N] (floats, layout private to
        the backend; P fixed per backend and dtype) and idx [N] (int, the student's argmax as a GLOBAL bank
        row, i.e. local + k_offset).
    merge_states(planes [W, P, N], idx [W, N], kl) -> (rows, lse_s, lse_t, ref)
        The W shards' states of the same N rows merged: what the unsharded forward returns for them.
    backward_partial(student, teacher, shard, lse_s, lse_t, tau_s, tau_t, n_splits=None) -> (acc, sigma)
        acc [N, D] = sum_k (q_ik - p_ik) Q_k and sigma [N] = sum_k (q_ik - p_ik) over this shard's rows
        (fp32, or float64 for float64 inputs), from the merged (global) LSEs.
    backward_finish(acc, sigma, q_ref, student, grad_rows, tau_s) -> grad_student
        From the summed acc, sigma and the global reference rows q_ref [N, D] (bank row ref_i, wherever it
        lives): g = (acc - sigma q_ref) / tau_s, then the upstream weights and the normalisation Jacobian.
        Any q_ref row is algebraically exact (sum_k (q - p) = 0); the argmax row cancels rounding.

"cuda" has no sharded pieces yet (its split path would serve; not wired).
"""
from __future__ import annotations

import importlib
import sys

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_MODULES = {
    "triton": "rrd_kernels.triton_kernels",
    "cuda": "rrd_kernels.cuda_backend",
}
SHARDED_MODULES = {
    "torch": "rrd_kernels.sharded_reference",
    "triton": "rrd_kernels.triton_kernels.sharded",
}
# Order in which "auto" tries the kernel backends on a CUDA device (first usable wins).
AUTO_ORDER = ("triton",)


def kernel_module(name: str):
    return importlib.import_module(KERNEL_MODULES[name])


def unusable_reason(name: str, device, dtype, bank_dtype, B: int, K: int, D: int) -> str | None:
    try:
        module = kernel_module(name)
    except ImportError as exc:  # the module itself failed to import (e.g. triton missing)
        return f"the {name} backend could not be imported ({exc})"
    return module.why_unusable(device, dtype, bank_dtype, B, K, D)


def _constant_result(fn):
    """torch.compiler.assume_constant_result, without importing torch._dynamo when nothing has yet: that
    import doubles the time of ``import rrd_kernels`` (about 2.5 s on a 2-core CPU) for users who never
    compile. The decorator only sets the attribute below, which dynamo reads when it meets the call, so
    setting it ourselves is the same; tests/test_backends.py checks the two still agree."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def _choose(backend: str, device, dtype, bank_dtype, B: int, K: int, D: int) -> str:
    # Imports and device queries that dynamo cannot trace: under torch.compile this runs once at trace time.
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in AUTO_ORDER:
            if unusable_reason(name, device, dtype, bank_dtype, B, K, D) is None:
                return name
        return "torch"
    reason = unusable_reason(backend, device, dtype, bank_dtype, B, K, D)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def resolve_backend(backend: str, student, teacher, bank) -> str:
    """Name of the backend that will run: "torch" or a key of KERNEL_MODULES. Raises if an explicitly
    requested backend cannot run on these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    B, D = student.shape
    return _choose(backend, student.device, student.dtype, bank.dtype, B, bank.shape[0], D)


def sharded_backend(backend: str, student, shard, n_rows: int, bank_size: int) -> tuple[str, object]:
    """(name, module) of the sharded pieces for ``n_rows`` all-gathered rows like ``student`` against this
    rank's ``shard`` of a ``bank_size``-row bank: "auto" takes triton on a CUDA device where it is usable,
    else torch. A backend without sharded pieces, or one that cannot run these tensors, is an error naming it.
    Depends on host values the ranks share, so every rank makes the same choice (or raises)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    # The global K: the pieces return global row indices (int32 in the Triton kernels).
    args = (student.device, student.dtype, shard.dtype, n_rows, bank_size, student.shape[1])
    if backend == "auto":
        name = "triton" if student.device.type == "cuda" and unusable_reason("triton", *args) is None else "torch"
    elif backend not in SHARDED_MODULES:
        raise RuntimeError(f"backend={backend!r} has no sharded-bank pieces (shard_bank=True); use one of "
                           f"{sorted(SHARDED_MODULES)} or 'auto'")
    else:
        name = backend
        reason = None if name == "torch" else unusable_reason(name, *args)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
    return name, importlib.import_module(SHARDED_MODULES[name])


def backend_status() -> dict[str, str | None]:
    """{backend name: None if it can run on this machine, else the reason it cannot}, for "torch" and every
    kernel backend. Asked for the smallest valid call (fp32, B = K = D = 1) on this machine's device: the
    current CUDA device when torch sees one, else the CPU (where Triton runs only under TRITON_INTERPRET=1).
    A call can still be refused for its own dtype or size (D > 512, say); rrd_loss then says why."""
    if torch.cuda.is_available():
        device, where = torch.device("cuda"), None
    else:
        device, where = torch.device("cpu"), "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    status: dict[str, str | None] = {"torch": None}
    for name in KERNEL_MODULES:
        reason = unusable_reason(name, device, torch.float32, torch.float32, 1, 1, 1)
        # On a machine without a GPU say so first: the backend's own reason may only mention the tensors.
        status[name] = f"{where}; {reason}" if reason is not None and where is not None else reason
    return status


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (see backend_status() for why the others cannot)."""
    return [name for name, reason in backend_status().items() if reason is None]

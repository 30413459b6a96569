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
        algebraically exact).
    backward(grad_rows, student, teacher, bank, lse_s, lse_t, ref, tau_s, tau_t) -> grad_student
        dL/dS for upstream per-row weights grad_rows (may be an expanded, stride-0 view), in student's dtype.

"torch" is the reference in plain PyTorch with autograd; it needs no module here.
"""
from __future__ import annotations

import importlib

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_MODULES = {
    "triton": "rrd_kernels.triton_kernels",
    "cuda": "rrd_kernels.cuda_backend",
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


@torch.compiler.assume_constant_result
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

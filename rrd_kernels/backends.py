"""Backend registry and choice: which implementation computes a given call.

A kernel backend is a module with three functions (the contract the op in ops.py relies on):

    why_unusable(student, teacher, bank) -> str | None
        None when the backend can run on these tensors, else the reason (shown to the user).
    forward(student, teacher, bank, tau_s, tau_t, kl) -> (rows, lse_s, lse_t)
        per-row loss (float32, CE or KL), and per-row log-sum-exp of the student and teacher logits
        (float32, natural log) for the backward.
    backward(grad_rows, student, teacher, bank, lse_s, lse_t, tau_s, tau_t) -> grad_student
        dL/dS for upstream per-row weights grad_rows, in student's dtype.

"torch" is the reference in plain PyTorch with autograd; it needs no module here.
"""
from __future__ import annotations

import importlib

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_MODULES = {
    "triton": "rrd_kernels.triton_kernels",
    "cuda": "rrd_kernels.cuda_backend",
}
# Order in which "auto" tries the kernel backends on a CUDA device (first usable wins).
AUTO_ORDER = ("triton",)


def kernel_module(name: str):
    return importlib.import_module(KERNEL_MODULES[name])


def unusable_reason(name: str, student, teacher, bank) -> str | None:
    try:
        module = kernel_module(name)
    except ImportError as exc:  # the module itself failed to import (e.g. triton missing)
        return f"the {name} backend could not be imported ({exc})"
    return module.why_unusable(student, teacher, bank)


def resolve_backend(backend: str, student, teacher, bank) -> str:
    """Name of the backend that will run: "torch" or a key of KERNEL_MODULES. Raises if an explicitly
    requested backend cannot run on these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if student.device.type != "cuda":
            return "torch"
        for name in AUTO_ORDER:
            if unusable_reason(name, student, teacher, bank) is None:
                return name
        return "torch"
    reason = unusable_reason(backend, student, teacher, bank)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
    return backend


def available_backends() -> list[str]:
    """Backends whose code imports on this machine (whether a device is present is checked per call)."""
    names = ["torch"]
    for name in KERNEL_MODULES:
        try:
            kernel_module(name)
        except ImportError:
            continue
        names.append(name)
    return names

"""Input checks for the public API. Kernels assume what passes here; every message names the argument.

Checks read only shapes, dtypes and devices (host metadata): nothing here synchronises with the GPU.
"""
from __future__ import annotations

import math
import warnings
import numbers

import torch

from .reference import OBJECTIVES, REDUCTIONS

EMBED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x, name: str, rank: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D ({what}), got shape {tuple(x.shape)}")


# Up to this temperature the fp32 kernels' gradient is tested to 1e-4 relative (docs/math.md, section 6).
MAX_ACCURATE_TAU = 100.0


def check_temperature(tau, name: str) -> float:
    if isinstance(tau, torch.Tensor) or isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"{name} must be a finite number > 0, got {tau}")
    if tau > MAX_ACCURATE_TAU:
        warnings.warn(
            f"{name}={tau} > {MAX_ACCURATE_TAU:g}: both softmaxes are nearly uniform and a gradient in fp32 keeps "
            f"fewer digits as tau grows (1e-4 relative is tested up to tau {MAX_ACCURATE_TAU:g}; at tau 1000 "
            "about 3e-4); float64 inputs (backend 'torch') are exact",
            stacklevel=3,
        )
    return tau


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_rrd_inputs(student, teacher, bank, tau_s, tau_t, objective="ce", reduction="mean"):
    """Validate the arguments of rrd_loss; returns (tau_s, tau_t) as floats."""
    check_tensor(student, "student", 2, "B x D embeddings")
    check_tensor(teacher, "teacher", 2, "B x D embeddings")
    check_tensor(bank, "bank", 2, "K x D memory bank")
    if student.shape[0] == 0:
        raise ValueError("student is an empty batch (B = 0)")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher must have the shape of student {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    if student.shape[1] == 0:
        raise ValueError("student has D = 0 features")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (K = 0)")
    if bank.shape[1] != student.shape[1]:
        raise ValueError(
            f"bank must have D = {student.shape[1]} columns like student, got shape {tuple(bank.shape)}"
        )
    if student.dtype not in EMBED_DTYPES:
        raise TypeError(f"student must be a floating tensor {EMBED_DTYPES}, got {student.dtype}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher dtype {teacher.dtype} differs from student dtype {student.dtype}")
    if bank.dtype not in BANK_DTYPES:
        raise TypeError(f"bank must be a floating tensor {BANK_DTYPES}, got {bank.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if bank.device != student.device:
        raise ValueError(f"bank is on {bank.device} but student is on {student.device}")
    check_choice(objective, "objective", OBJECTIVES)
    check_choice(reduction, "reduction", REDUCTIONS)
    return check_temperature(tau_s, "tau_s"), check_temperature(tau_t, "tau_t")

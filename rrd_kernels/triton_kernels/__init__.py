"""Triton backend: fused forward (online dual softmax, split bank + merge) and recompute backward.

Importing this package needs triton; rrd_kernels imports it lazily, so the package works without it.
"""
from .launch import LSE_T_ROWS, backward, forward, make_plan, why_unusable

__all__ = ["forward", "backward", "why_unusable", "make_plan", "LSE_T_ROWS"]

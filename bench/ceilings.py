"""The two ceilings of the floor, measured on the run's own device at the start of the run:

copy bandwidth  a large device-to-device copy (x.copy_(y), 1 GiB or 1/8 of free memory), bytes read plus
                bytes written over the median time;
matmul rate     a square matmul (N = 8192) in each dtype of the run, 2 N^3 / median time. For float32 it
                honours torch.get_float32_matmul_precision() ("highest": fp32; "high"/"medium": TF32 allowed).
Inputs are random (never zeros). Timed with CUDA events, median of repetitions after warm-up.

The floor of a measured call, as in docs/math.md ("The floor"):
    floor = max(bytes / copy bandwidth, products * 2 B K D / matmul rate)
bytes = the bank once (K D elem) + the student and teacher (2 B D elem) + the gradient written (B D elem, modes
with a backward). products: forward 2; fwd+bwd 4 for the gradient-in-forward design (floor_ms) and 5 for the
recompute backward (floor_recompute_ms); backward alone 3, recompute only (the gradient-in-forward design
does that work in its forward).
"""
from __future__ import annotations

import math
import statistics

import torch

from .inputs import DTYPE

PRODUCTS = {  # mode -> (gradient-in-forward design, recompute design)
    "fwd": (2, 2),
    "bwd": (None, 3),
    "fwd+bwd": (4, 5),
}


def _median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _copy_ms(device, numel: int) -> float:
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src))


def _matmul_ms(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _median_ms(lambda: torch.mm(a, b))


def measure(device: torch.device, dtypes: list[str]) -> dict:
    """{'copy_GBps': ..., 'matmul_TFLOPs': {dtype: ...}, 'fp32_matmul_precision': ...}; empty on the CPU."""
    if device.type != "cuda":
        return {}
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = int(min(1 << 30, free // 8)) // 4 * 4
    copy_gbps = 2 * nbytes / (_copy_ms(device, nbytes // 4) * 1e-3) / 1e9
    rates = {name: 2 * 8192**3 / (_matmul_ms(device, DTYPE[name], 8192) * 1e-3) / 1e12 for name in dtypes}
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbps, "matmul_TFLOPs": rates,
            "fp32_matmul_precision": torch.get_float32_matmul_precision()}


def floor_ms(ceil: dict, B: int, K: int, D: int, dtype: str, mode: str, recompute: bool) -> float:
    if not ceil:
        return math.nan
    products = PRODUCTS[mode][1 if recompute else 0]
    if products is None:
        return math.nan
    elem = torch.empty((), dtype=DTYPE[dtype]).element_size()
    nbytes = (K * D + 2 * B * D + (B * D if mode != "fwd" else 0)) * elem
    t_bytes = nbytes / (ceil["copy_GBps"] * 1e9)
    t_flops = products * 2 * B * K * D / (ceil["matmul_TFLOPs"][dtype] * 1e12)
    return max(t_bytes, t_flops) * 1e3

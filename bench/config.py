"""Presets, the configuration grid, and the names used across the suite. Imports nothing heavy."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

PROVIDERS = ("eager", "compile", "torch", "triton", "cuda")
# Providers that are the authors' formulation: timed even when their error is above the threshold (they
# define the speed users have today); status "inaccurate" then says so.
BASELINES = ("eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
TIMINGS = ("python", "graph")
DTYPES = ("float32", "bfloat16", "float16")

# Temperature pairs (tau_s, tau_t): the authors' 2025 code (sharper teacher) and the paper's tables.
TAUS_AUTHORS_2025 = (0.1, 0.02)
TAUS_PAPER = (0.04, 0.1)


@dataclass(frozen=True)
class Config:
    B: int
    K: int
    D: int
    dtype: str
    tau_s: float
    tau_t: float

    def label(self) -> str:
        return f"B{self.B} K{self.K} D{self.D} {self.dtype} tau {self.tau_s}/{self.tau_t}"

    def as_dict(self) -> dict:
        return asdict(self)


# Timing effort per preset: warm-up calls, then as many repetitions as fit in target_ms (clamped).
PRESETS = {
    "paper": dict(
        B=[64], K=[16384], D=[128], dtypes=["float32"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "triton", "cuda"], warmup=5, target_ms=200.0, min_reps=20, max_reps=200,
    ),
    "sweep": dict(
        B=[64, 256, 1024, 4096], K=[16384, 65536, 262144, 1048576], D=[128, 256],
        dtypes=["float32", "bfloat16"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "triton", "cuda"], warmup=3, target_ms=60.0, min_reps=10, max_reps=100,
    ),
    # Tiny sizes for CI on the CPU (Triton interpreter); "torch" = rrd_loss(backend="torch") is cheap there.
    "smoke": dict(
        B=[8], K=[300], D=[32], dtypes=["float32"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "torch", "triton", "cuda"], warmup=1, target_ms=20.0, min_reps=3,
        max_reps=5,
    ),
}


def grid(B, K, D, dtypes, taus) -> list[Config]:
    """All configurations, dtype and D outermost and K innermost, so that a run cut short by a time budget
    has complete time-vs-K curves for the configurations it reached."""
    out = []
    for (tau_s, tau_t), dtype, d, b, k in itertools.product(taus, dtypes, D, B, K):
        out.append(Config(B=b, K=k, D=d, dtype=dtype, tau_s=float(tau_s), tau_t=float(tau_t)))
    return out

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
# What the loss is taken against: "bank" = one K x D bank shared by the batch (RRDLoss, rrd_loss);
# "momentum" = the momentum memory (RRDMomentumLoss): each sample's own K+1 rows (its index, then K drawn
# ones) gathered from two n_data x D memories. K is then nce_k.
MEMORIES = ("bank", "momentum")
SCORES = ("similarity", "faithful")
NCE_T = 0.07  # exp(score / nce_t) of scores="faithful" (the authors' default)

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
    memory: str = "bank"
    n_data: int = 0  # rows of each memory ("momentum"); 0 for a bank
    scores: str = "similarity"  # "momentum" only: "faithful" = the authors' exp(score / nce_t) / Z

    def label(self) -> str:
        extra = f" momentum n_data {self.n_data} {self.scores}" if self.memory == "momentum" else ""
        return f"B{self.B} K{self.K} D{self.D} {self.dtype} tau {self.tau_s}/{self.tau_t}{extra}"

    def as_dict(self) -> dict:
        return asdict(self)


# Timing effort per preset: warm-up calls, then as many repetitions as fit in target_ms (clamped).
PRESETS = {
    "paper": dict(
        B=[64], K=[16384], D=[128], dtypes=["float32"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "triton", "cuda"], warmup=5, target_ms=200.0, min_reps=20, max_reps=200,
        memory=["bank"], n_data=[50000], scores=["similarity"],
    ),
    "sweep": dict(
        B=[64, 256, 1024, 4096], K=[16384, 65536, 262144, 1048576], D=[128, 256],
        dtypes=["float32", "bfloat16"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "triton", "cuda"], warmup=3, target_ms=60.0, min_reps=10, max_reps=100,
        memory=["bank"], n_data=[50000], scores=["similarity"],
    ),
    # The momentum memory: the authors' size (B 64, nce_k 16384, D 128, CIFAR-100's 50000 samples) and a
    # larger one (B 256, nce_k 65536), both score functions; eager = their gather + bmm code.
    "momentum": dict(
        B=[64, 256], K=[16384, 65536], D=[128], dtypes=["float32"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "torch", "triton"], warmup=3, target_ms=100.0, min_reps=10, max_reps=100,
        memory=["momentum"], n_data=[50000], scores=["similarity", "faithful"],
    ),
    # Tiny sizes for CI on the CPU (Triton interpreter); "torch" = rrd_loss(backend="torch") is cheap there.
    "smoke": dict(
        B=[8], K=[300], D=[32], dtypes=["float32"], taus=[TAUS_AUTHORS_2025],
        providers=["eager", "compile", "torch", "triton", "cuda"], warmup=1, target_ms=20.0, min_reps=3,
        max_reps=5, memory=["bank", "momentum"], n_data=[500], scores=["faithful"],
    ),
}


def grid(B, K, D, dtypes, taus, memory=("bank",), n_data=(0,), scores=("similarity",)) -> list[Config]:
    """All configurations, memory outermost, then dtype and D, K innermost, so that a run cut short by a time
    budget has complete time-vs-K curves for the configurations it reached. A bank ignores n_data and scores
    (one configuration each); the momentum memory crosses them."""
    out = []
    for mem in memory:
        variants = [(0, "similarity")] if mem == "bank" else list(itertools.product(n_data, scores))
        for (tau_s, tau_t), dtype, d, (n, sc), b, k in itertools.product(taus, dtypes, D, variants, B, K):
            out.append(Config(B=b, K=k, D=d, dtype=dtype, tau_s=float(tau_s), tau_t=float(tau_t), memory=mem,
                              n_data=int(n), scores=sc))
    return out

"""Statistics over seeds for the results table: mean and sample std, and the paired comparison of two
methods trained with the same seeds (mean difference with a Student-t 95 % interval).

Written without scipy so the app needs nothing beyond what it already imports; the t quantiles are
checked against scipy in the tests.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# two-sided 95 % quantiles t_{0.975, df} for df = 1 .. 30 (standard tables, 3 decimals)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom: the table up to 30, beyond it the Cornish-Fisher
    expansion around the normal quantile (error < 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class PairedDiff:
    """``a - b`` per seed, its mean and the 95 % t-interval of that mean (None with a single seed)."""

    diffs: list
    mean: float
    low: float | None
    high: float | None

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero: the difference stands above the seed-to-seed noise."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "n": len(self.diffs), "resolved": self.resolved}


def paired_diff(a: list[float], b: list[float]) -> PairedDiff:
    """Paired comparison of two methods run with the same seeds (a[i] and b[i] share seed i)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_diff needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return PairedDiff(diffs, mean, None, None)
    half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDiff(diffs, mean, mean - half, mean + half)

"""The training app's optional dependencies (the `train` extra: pip install "rrd_kernels[train]"): what to do
when one is missing. Progress bars and the plot are conveniences, so their absence is a notice; the digits
data set comes from scikit-learn, so its absence is an error that says what to install (rrdtrain.data)."""
from __future__ import annotations

import sys

INSTALL_HINT = 'pip install "rrd_kernels[train]" (or: pip install tqdm scikit-learn matplotlib)'
_noticed: set[str] = set()


def notice_missing(module: str, what: str) -> None:
    """One line on stderr, once per module per process."""
    if module not in _noticed:
        _noticed.add(module)
        print(f"rrdtrain: {module} is not installed: {what}; {INSTALL_HINT}", file=sys.stderr)


def progress_bar(**kwargs):
    """A tqdm bar, or None (with a notice) when tqdm is not installed: training goes on without bars."""
    try:
        from tqdm import tqdm
    except ImportError:
        notice_missing("tqdm", "no progress bars (training is unaffected)")
        return None
    return tqdm(**kwargs)

"""The end-of-job summary: a text table, results.json and a PNG of the test-accuracy curves."""
from __future__ import annotations

import json
import math
import os

from .optional import notice_missing


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(methods: dict) -> dict:
    """methods: name -> {"label", "weights", "histories": [per-seed list of epoch rows]} -> adds stats."""
    for m in methods.values():
        finals = [h[-1]["test_acc"] for h in m["histories"]]
        bests = [max(r["test_acc"] for r in h) for h in m["histories"]]
        m["final_acc"], m["best_acc"] = finals, bests
        m["final_mean"], m["final_std"] = mean_std(finals)
        m["best_mean"], m["best_std"] = mean_std(bests)
        m["curves"] = [[r["test_acc"] for r in h] for h in m["histories"]]
    return methods


def format_table(title: str, teacher: dict, methods: dict, n_seeds: int) -> str:
    pm = "+-"
    head = f"{'method':<22} {'gamma':>5} {'alpha':>5} {'beta':>5}   {'final test acc %':>18}   {'best test acc %':>18}"
    lines = [title, head, "-" * len(head)]
    lines.append(f"{'teacher ' + teacher['arch']:<22} {'':>5} {'':>5} {'':>5}   {teacher['test_acc']:>18.2f}   {'':>18}")
    for m in methods.values():
        g, a, b = m["weights"]
        lines.append(
            f"{m['label']:<22} {g:>5g} {a:>5g} {b:>5g}   "
            f"{m['final_mean']:>10.2f} {pm} {m['final_std']:<5.2f}   {m['best_mean']:>10.2f} {pm} {m['best_std']:<5.2f}"
        )
    lines.append(
        f"(mean {pm} sample std over {n_seeds} seed{'s' if n_seeds != 1 else ''}; final = last epoch, "
        f"best = max over epochs)"
    )
    return "\n".join(lines)


def save_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def save_plot(path: str, title: str, teacher: dict, methods: dict) -> bool:
    """Test accuracy per epoch (mean +- std over seeds) to path; False (with a notice) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        notice_missing("matplotlib", f"no plot ({os.path.basename(path)}); the table and results.json are written")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods.values():
        curves = np.array(m["curves"], dtype=float)  # seeds x epochs
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        line = ax.plot(x, mean, label=m["label"])[0]
        if curves.shape[0] > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(teacher["test_acc"], color="k", linestyle="--", linewidth=1, label=f"teacher {teacher['arch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

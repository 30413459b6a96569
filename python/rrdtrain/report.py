"""The end-of-job summary: a text table, results.json and a PNG of the test-accuracy curves."""
from __future__ import annotations

import json
import os

from .stats import mean_std, paired_diff
from .optional import notice_missing


# the methods every other one is compared with, seed by seed, when they were run: name -> column title
BASELINES = {"ce": "vs student (CE)", "kd": "vs KD"}


def summarise(methods: dict) -> dict:
    """methods: name -> {"label", "weights", "histories": [per-seed list of epoch rows]} -> adds stats, and
    for every baseline in BASELINES that was run, the paired difference of final accuracies (same seeds)."""
    for m in methods.values():
        finals = [h[-1]["test_acc"] for h in m["histories"]]
        bests = [max(r["test_acc"] for r in h) for h in m["histories"]]
        m["final_acc"], m["best_acc"] = finals, bests
        m["final_mean"], m["final_std"] = mean_std(finals)
        m["best_mean"], m["best_std"] = mean_std(bests)
        m["curves"] = [[r["test_acc"] for r in h] for h in m["histories"]]
    order = list(BASELINES)
    for name, m in methods.items():
        # a baseline is compared only with the baselines before it (KD vs CE, not CE vs KD as well)
        earlier = order[: order.index(name)] if name in order else order
        m["paired"] = {
            base: paired_diff(m["final_acc"], methods[base]["final_acc"]).as_dict()
            for base in earlier if base in methods
        }
    return methods


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return ""
    if d["low"] is None:  # one seed: no interval
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{' *' if d['resolved'] else ''}"


def format_table(title: str, teacher: dict, methods: dict, n_seeds: int) -> str:
    pm = "+-"
    bases = [b for b in BASELINES if b in methods]
    w = 24  # width of a paired-difference column
    head = (f"{'method':<22} {'gamma':>5} {'alpha':>5} {'beta':>5}   {'final acc %':>14}   {'best acc %':>14}"
            + "".join(f"   {BASELINES[b]:<{w}}" for b in bases))
    head = head.rstrip()
    lines = [title, head, "-" * len(head)]
    lines.append(f"{'teacher ' + teacher['arch']:<22} {'':>5} {'':>5} {'':>5}   {teacher['test_acc']:>14.2f}")
    for m in methods.values():
        g, a, b = m["weights"]
        row = (f"{m['label']:<22} {g:>5g} {a:>5g} {b:>5g}   {m['final_mean']:>6.2f} {pm} {m['final_std']:<4.2f}"
               f"   {m['best_mean']:>6.2f} {pm} {m['best_std']:<4.2f}")
        row += "".join(f"   {_diff_cell(m['paired'].get(base)):<{w}}" for base in bases)
        lines.append(row.rstrip())
    s = "s" if n_seeds != 1 else ""
    lines.append(f"final = last epoch, best = max over epochs: mean {pm} sample std over {n_seeds} seed{s}.")
    if bases:
        lines.append(
            f"vs X: final accuracy minus X's on the same seed, mean [95% t-interval over {n_seeds} seed{s}];\n"
            f"* = the interval excludes 0: the difference stands above the seed-to-seed noise."
        )
    return "\n".join(lines)


def save_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def zoom_ylim(teacher_acc: float, bands: list, start: int) -> tuple[float, float]:
    """y-limits that hold every method's mean +- std band from epoch index ``start`` on, and the teacher's
    line, with a small margin: the range in which the methods differ (early epochs fall below it)."""
    lows = [min(lo[start:]) for lo, _ in bands]
    highs = [max(hi[start:]) for _, hi in bands]
    lo, hi = min(lows), max(highs + [teacher_acc])
    pad = 0.08 * (hi - lo) + 0.1
    return lo - pad, min(hi + pad, 100.0 + pad)


def save_plot(path: str, title: str, teacher: dict, methods: dict) -> bool:
    """Two panels: every epoch on the full scale, and the last third of training zoomed in on where
    the methods differ. Lines: mean over seeds; bands: mean +- sample std over seeds; teacher dashed."""
    try:
        import matplotlib
    except ImportError:
        notice_missing("matplotlib", f"no plot ({os.path.basename(path)}); the table and results.json are written")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    n_seeds = len(next(iter(methods.values()))["curves"])
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    bands = []
    for m in methods.values():
        curves = np.array(m["curves"], dtype=float)  # seeds x epochs
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        std = curves.std(0, ddof=1) if curves.shape[0] > 1 else np.zeros_like(mean)
        bands.append((mean - std, mean + std))
        for ax in (full, zoom):
            line = ax.plot(x, mean, label=f"{m['label']}: {m['final_mean']:.2f}")[0]
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    epochs = len(bands[0][0])
    start = epochs - max(1, epochs // 3)  # the last third: after the first lr decay, where the methods settle
    for ax in (full, zoom):
        ax.axhline(teacher["test_acc"], color="k", linestyle="--", linewidth=1.2,
                   label=f"teacher {teacher['arch']}: {teacher['test_acc']:.2f}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    full.set_ylabel("test accuracy (%)")
    full.set_ylim(top=max(100.0, teacher["test_acc"]) + 1.0)  # the teacher's line clear of the frame
    full.set_title("all epochs")
    if epochs > start + 1:
        zoom.set_xlim(start + 1, epochs)
    zoom.set_ylim(*zoom_ylim(teacher["test_acc"], bands, start))
    zoom.set_title(f"epochs {start + 1}-{epochs}, zoomed")
    band = f"line: mean, band: mean +- sample std over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    # the full-scale panel's lower right is empty (curves rise from the lower left), so the legend goes there
    full.legend(loc="lower right", fontsize=8, title=f"final test acc %\n{band}", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

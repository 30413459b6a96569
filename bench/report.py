"""Writes the results of a run: results.csv, results.json, results.md, and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from .runner import COLUMNS, OK_STATUSES


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _clean(r.get(k)) is None else _clean(r.get(k))) for k in COLUMNS})


def write_json(rows: list[dict], meta: dict, path: Path) -> None:
    doc = {"meta": meta, "columns": COLUMNS, "rows": [{k: _clean(r.get(k)) for k in COLUMNS} for r in rows]}
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")


def _fmt(v, digits=4) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def sig2(v) -> str:
    """At least two significant digits without an exponent (0.0019, 0.70, 1.0, 12, 609); '-' for no value.
    Ratios in the summary span 1e-3 (the interpreter vs eager) to 1e3, so a fixed '.2f' would print 0.00."""
    if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        return "-"
    if v == 0:
        return "0"
    decimals = max(0, 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


MD_COLUMNS = [
    ("B", "B"), ("K", "K"), ("D", "D"), ("dtype", "dtype"), ("memory", "memory"), ("n_data", "n_data"),
    ("scores", "scores"), ("provider", "provider"), ("mode", "mode"),
    ("timing", "timing"), ("status", "status"), ("median_ms", "median ms"), ("p20_ms", "p20"),
    ("p80_ms", "p80"), ("peak_extra_mib", "extra MiB"), ("floor_ms", "floor ms"), ("pct_of_floor", "% floor"),
    ("pct_of_floor_recompute", "% floor (5 prod.)"), ("speedup_vs_eager", "x eager"),
    ("loss_rel_err", "loss err"), ("grad_rel_err", "grad err"), ("first_call_s", "1st call s"),
    ("reason", "reason"),
]


def write_md(rows: list[dict], meta: dict, path: Path) -> None:
    c = meta.get("ceilings") or {}
    lines = [f"# RRD benchmark: preset `{meta.get('preset')}`", ""]
    lines.append(f"- device: {meta.get('device')}; torch {meta.get('torch')}, triton {meta.get('triton')}, "
                 f"CUDA {meta.get('cuda') or '-'}, Python {meta.get('python')}")
    lines.append(f"- git commit: {meta.get('git_commit')}; fp32 matmul precision: "
                 f"{meta.get('fp32_matmul_precision')}; TRITON_INTERPRET={meta.get('triton_interpret') or 0}")
    if c:
        rates = ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in c["matmul_TFLOPs"].items())
        lines.append(f"- ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s (read + write); "
                     f"matmul {rates}")
    else:
        lines.append("- no GPU: times are CPU wall-clock (time.perf_counter); no memory, floor or graph columns")
    lines.append(f"- started {meta.get('started')}, took {meta.get('elapsed_s', float('nan')):.1f} s")
    lines += ["", "Times in ms (median, p20, p80). `% floor`: floor / median (100 = at the floor). "
              "See bench/README.md for every column.", ""]
    lines.append("| " + " | ".join(h for _, h in MD_COLUMNS) + " |")
    lines.append("|" + "---|" * len(MD_COLUMNS))
    for r in rows:
        cells = []
        for k, _ in MD_COLUMNS:
            v = r.get(k)
            s = _fmt(v, 3 if k in ("loss_rel_err", "grad_rel_err") else 4)
            cells.append(s.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _memory_tag(r: dict) -> str:
    """'bank', or 'mom-sim' / 'mom-faith' for the momentum memory (rows from before the memory column: bank)."""
    if r.get("memory") != "momentum":
        return "bank"
    return "mom-faith" if r.get("scores") == "faithful" else "mom-sim"


def summary_lines(rows: list[dict], mode: str = "fwd+bwd", limit: int = 80) -> list[str]:
    """A compact table: one line per (config, provider) for one mode, python and graph medians side by side."""
    by = {}
    order = []
    for r in rows:
        if r["mode"] != mode:
            continue
        key = (r["B"], r["K"], r["D"], r["dtype"], r["tau_s"], r["tau_t"], r["provider"], _memory_tag(r))
        if key not in by:
            by[key] = {}
            order.append(key)
        by[key][r["timing"]] = r
    head = f"{'B':>5} {'K':>8} {'D':>4} {'dtype':>8} {'memory':>10} {'provider':>8} {'status':>12} {'py ms':>9} " \
           f"{'graph ms':>9} {'%floor':>7} {'x eager':>7} {'loss err':>9} {'grad err':>9}"
    out = [f"summary ({mode}; py = called from Python, graph = CUDA-graph replay):", head]
    for key in order[:limit]:
        d = by[key]
        py, gr = d.get("python", {}), d.get("graph", {})
        first = py or gr
        st = first.get("status", "")
        if py and gr and gr.get("status") != st:
            st = f"{st}/{gr.get('status')}"

        def f(v, w, spec):
            return f"{v:{w}{spec}}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>{w}}"

        out.append(f"{key[0]:>5} {key[1]:>8} {key[2]:>4} {key[3]:>8} {key[7]:>10} {key[6]:>8} {st[:12]:>12} "
                   f"{f(py.get('median_ms', math.nan), 9, '.4f')} {f(gr.get('median_ms', math.nan), 9, '.4f')} "
                   f"{sig2(first.get('pct_of_floor', math.nan)):>7} "
                   f"{sig2(py.get('speedup_vs_eager', math.nan)):>7} "
                   f"{f(first.get('loss_rel_err', math.nan), 9, '.1e')} "
                   f"{f(first.get('grad_rel_err', math.nan), 9, '.1e')}")
    if len(order) > limit:
        out.append(f"... {len(order) - limit} more (config, provider) pairs in results.md")
    failed = [r for r in rows if r["status"] not in OK_STATUSES + ("skipped",)]
    reasons = {}
    for r in failed:
        reasons.setdefault((r["provider"], r["status"], r["reason"]), 0)
        reasons[(r["provider"], r["status"], r["reason"])] += 1
    for (p, st, why), n in list(reasons.items())[:10]:
        out.append(f"  {p} {st} x{n}: {why[:150]}")
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped[r["reason"]] = skipped.get(r["reason"], 0) + 1
    for why, n in skipped.items():
        out.append(f"  {n} rows skipped: {why}")
    return out


def _precision_of(row: dict) -> str | None:
    """The fp32 product mode a row ran in, as the cost model names it (None for fp16/bf16 rows)."""
    if row.get("dtype") != "float32":
        return None
    return "high" if row.get("fp32_matmul_precision") in ("high", "medium") else "highest"


def prediction_lines(rows: list[dict], predictions: dict | None, mode: str = "fwd+bwd") -> list[str]:
    """The measured triton and cuda rows beside the static cost model's prediction for the same backend,
    (B, K, D, dtype) and GPU (bench/predict.py): python and graph medians, predicted and calibrated ms,
    measured / predicted."""
    if not predictions:
        return ["cost model: no predictions (bench/predict.py did not finish)"]
    note = f"; {predictions['note']}" if predictions.get("note") else ""
    out = [f"cost model vs measured ({mode}; tools/cost_model.py for {predictions.get('arch')} on "
           f"{predictions.get('gpu')}, device {predictions.get('device')}{note}):",
           f"{'backend':>7} {'B':>5} {'K':>8} {'D':>4} {'dtype':>15} {'status':>10} {'py ms':>9} {'graph ms':>9} "
           f"{'pred ms':>9} {'calib ms':>9} {'py/pred':>7} {'gr/pred':>7} bound"]
    # documents written before the CUDA model hold triton rows without a backend field
    preds = {(p.get("backend", "triton"), p["B"], p["K"], p["D"], p["dtype"], p.get("precision")): p
             for p in predictions.get("rows", [])}
    by: dict[tuple, dict] = {}
    for r in rows:
        if r.get("provider") in ("triton", "cuda") and r.get("mode") == mode:
            key = (r["provider"], r["B"], r["K"], r["D"], r["dtype"], _precision_of(r))
            by.setdefault(key, {})[r.get("timing")] = r
    for key in list(by) + [k for k in preds if k not in by]:
        d = by.get(key, {})
        py, gr = d.get("python", {}), d.get("graph", {})
        status = (py or gr).get("status", "not run") if d else "not run"
        p = preds.get(key) or {}
        pred, calib = p.get("predicted_ms"), p.get("calibrated_ms")

        def ms(v):
            return f"{v:9.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>9}"

        def ratio(v):
            ok = isinstance(v, (int, float)) and not math.isnan(v) and isinstance(pred, (int, float)) and pred > 0
            return f"{sig2(v / pred):>7}" if ok else f"{'-':>7}"

        mpy = py.get("median_ms") if py.get("status") in OK_STATUSES else None
        mgr = gr.get("median_ms") if gr.get("status") in OK_STATUSES else None
        bound = p.get("bound") or (p.get("error") or "no prediction")[:60]
        dtype = key[4] + ("/" + key[5] if key[5] else "")
        out.append(f"{key[0]:>7} {key[1]:>5} {key[2]:>8} {key[3]:>4} {dtype:>15} {status[:10]:>10} {ms(mpy)} "
                   f"{ms(mgr)} {ms(pred)} {ms(calib)} {ratio(mpy)} {ratio(mgr)} {bound}")
    if len(out) == 2:
        out.append("  (no triton or cuda rows measured and no predictions)")
    return out


# ----------------------------------------------------------------------------------------------- plots
def _groups(rows, mode):
    """{(B, D, dtype, taus, memory): {(provider, timing): [(K, row)]}} for rows of one mode."""
    g = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["mode"] == mode:
            g[(r["B"], r["D"], r["dtype"], r["tau_s"], r["tau_t"], _memory_tag(r))][(r["provider"], r["timing"])].append(
                (r["K"], r))
    return g


def _value(r, key):
    v = r.get(key)
    if r["status"] not in OK_STATUSES or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
        return None
    return float(v)


def _k_label(k: int) -> str:
    """Bank sizes as people write them: 300, 16K, 1M."""
    if k >= 2**20 and k % 2**20 == 0:
        return f"{k // 2**20}M"
    if k >= 2**10 and k % 2**10 == 0:
        return f"{k // 2**10}K"
    return str(k)


def _no_data_reason(group, key) -> str:
    rows = [r for pts in group.values() for _, r in pts]
    if any(r["status"] in OK_STATUSES for r in rows):
        what = "peak memory is measured on CUDA devices only" if key == "peak_extra_mib" else "not measured"
        return f"no data: {what}; this run was on {rows[0].get('device') or 'a machine without a GPU'}"
    return "no data: every provider failed or was skipped (see results.md)"


def _figure(groups, title, ylabel, key, kinds, extra=None):
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    keys = sorted(groups)
    n = max(1, len(keys))
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    colors = {}
    for ax, gk in zip(axes.flat, keys):
        b, d, dt, ts, tt, mem = gk
        ax.set_title(f"B {b}, D {d}, {dt}, tau {ts}/{tt}" + ("" if mem == "bank" else f", {mem}"), fontsize=9)
        plotted = False
        for (prov, kind), pts in sorted(groups[gk].items()):
            if kind not in kinds:
                continue
            pts = sorted((k, _value(r, key)) for k, r in pts)
            pts = [(k, v) for k, v in pts if v is not None]
            if not pts:
                continue
            plotted = True
            color = colors.setdefault(prov, f"C{len(colors)}")
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", color=color,
                    linestyle="-" if kind == "python" else "--", label=f"{prov} ({kind})")
        if not plotted:
            # An empty panel says why inside its own frame (wrapped to fit) instead of drawing bare axes.
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, textwrap.fill(_no_data_reason(groups[gk], key), 34), ha="center", va="center",
                    fontsize=9, transform=ax.transAxes)
            continue
        if extra is not None:
            extra(ax, groups[gk])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Ticks at the K values measured (a log axis alone would label powers of two around them).
        ks = sorted({k for pts in groups[gk].values() for k, _ in pts})
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ks, [_k_label(k) for k in ks])
        if len(ks) == 1:
            ax.set_xlim(ks[0] / 1.6, ks[0] * 1.6)
        ax.set_xlabel("K (bank rows)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    devices = {r.get("device") for grp in groups.values() for pts in grp.values() for _, r in pts}
    if any(str(d).startswith("cpu") for d in devices):
        note = "(CPU wall-clock, Triton in its interpreter: a plumbing check, not performance)"
        title += "\n" + textwrap.fill(note, 48 * cols)  # wrapped to the figure's width: one panel is ~50 chars
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def write_plots(rows: list[dict], out: Path, mode: str = "fwd+bwd") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows, mode)

    def floor_line(ax, grp):
        pts = {}
        for _pk, lst in grp.items():
            for k, r in lst:
                v = r.get("floor_ms")
                if isinstance(v, float) and not math.isnan(v):
                    pts[k] = v
        if pts:
            ks = sorted(pts)
            ax.plot(ks, [pts[k] for k in ks], color="k", linestyle=":", label="floor")

    paths = []
    for name, title, ylabel, key, kinds, extra in [
        ("time_vs_K.png", f"RRD loss {mode}: median time", "ms", "median_ms", ("python", "graph"), floor_line),
        ("memory_vs_K.png", f"RRD loss {mode}: peak extra memory", "MiB", "peak_extra_mib", ("python",), None),
        ("speedup_vs_K.png", f"RRD loss {mode}: speedup over eager", "x eager", "speedup_vs_eager",
         ("python", "graph"), None),
    ]:
        fig = _figure(groups, title, ylabel, key, kinds, extra)
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths

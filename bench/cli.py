"""Command line of the benchmark suite (python -m bench). Parses arguments before importing torch or
triton, so that TRITON_INTERPRET can be set first on a machine without a CUDA device."""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import sys
import time
from pathlib import Path

from .config import DTYPES, MEMORIES, MODES, PRESETS, PROVIDERS, SCORES, TIMINGS, grid


def _taus(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TAU_S,TAU_T (e.g. 0.1,0.02), got {text!r}")
    return a, b


def _per_preset(key: str) -> str:
    """'default: the preset's: paper X; sweep Y; smoke Z' for an option whose default comes from the preset."""
    def show(value) -> str:
        if isinstance(value, (list, tuple)):
            return " ".join(",".join(f"{y:g}" for y in v) if isinstance(v, tuple) else str(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)
    return "default: the preset's: " + "; ".join(f"{name} {show(pre[key])}" for name, pre in PRESETS.items())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the RRD loss: eager PyTorch, torch.compile, and the rrd_kernels backends. "
        "Every list option overrides the preset's value.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: B 64 K 16384 D 128 fp32; sweep: B x K x D x dtype grid; momentum: the momentum memory at "
                   "the authors' size and a larger one; smoke: tiny, CPU-able (bank and momentum) "
                   "(default: %(default)s)")
    p.add_argument("--B", type=int, nargs="+", help=f"batch sizes ({_per_preset('B')})")
    p.add_argument("--K", type=int, nargs="+", help=f"bank sizes ({_per_preset('K')})")
    p.add_argument("--D", type=int, nargs="+", help=f"embedding widths ({_per_preset('D')})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help=f"input dtypes ({_per_preset('dtypes')})")
    p.add_argument("--memory", nargs="+", choices=MEMORIES,
                   help=f"what the loss is taken against: bank = one K x D bank (RRDLoss); momentum = the momentum "
                   f"memory, each sample's own K+1 rows of two n_data x D memories (RRDMomentumLoss; K = nce_k) "
                   f"({_per_preset('memory')})")
    p.add_argument("--n-data", type=int, nargs="+",
                   help=f"rows of each momentum memory (the training set size) ({_per_preset('n_data')})")
    p.add_argument("--scores", nargs="+", choices=SCORES,
                   help=f"momentum memory: similarity = scores over tau; faithful = the authors' exp(score / 0.07) "
                   f"/ Z ({_per_preset('scores')})")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help=f"implementations to run ({_per_preset('providers')})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help=f"what is timed: forward, backward, or both in one call (default: {' '.join(MODES)})")
    p.add_argument("--timings", nargs="+", choices=TIMINGS, default=list(TIMINGS),
                   help=f"python: called from Python; graph: CUDA-graph replay (GPU only) (default: {' '.join(TIMINGS)})")
    p.add_argument("--taus", type=_taus, nargs="+", metavar="TAU_S,TAU_T",
                   help="temperature pairs (default 0.1,0.02: the authors' 2025 code; the paper's is 0.04,0.1)")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default="highest",
                   help="torch.set_float32_matmul_precision for the run (highest = PyTorch's default, no TF32; "
                   "default: %(default)s)")
    p.add_argument("--warmup", type=int, help=f"warm-up calls before timing ({_per_preset('warmup')})")
    p.add_argument("--target-ms", type=float,
                   help=f"time to spend per measurement, which sets the repetitions between --min-reps and "
                   f"--max-reps ({_per_preset('target_ms')})")
    p.add_argument("--min-reps", type=int,
                   help=f"fewest timed repetitions per measurement, however long they take ({_per_preset('min_reps')})")
    p.add_argument("--max-reps", type=int,
                   help=f"most timed repetitions per measurement, however short they are ({_per_preset('max_reps')})")
    p.add_argument("--max-seconds", type=float,
                   help="time budget in seconds: (configuration, provider) cases not started when it is spent are "
                   "recorded as skipped (default: no budget)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the current CUDA device when torch sees one, else the CPU (Triton then runs in its "
                   "interpreter: plumbing checks, not timings); cuda fails without a GPU (default: %(default)s)")
    p.add_argument("--time-wrong", action="store_true",
                   help="also time kernel providers whose error is above the tolerance (status inaccurate; default: off, "
                   "such a provider is recorded as wrong and not timed; eager and compile are always timed)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs (each configuration's inputs derive from it) (default: %(default)s)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads on a CPU run (1: stable timings on a shared machine) (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/<preset>-<device>-<date>/)")
    p.add_argument("--no-plots", action="store_true",
                   help="write the tables (results.csv, .json, .md) but no plots (default: plots when matplotlib "
                   "is installed)")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bar on stderr (default: a bar when tqdm is installed)")
    p.add_argument("--summary-rows", type=int, default=60,
                   help="lines of the summary printed at the end (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t_start = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc)

    import torch  # does not import triton

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if not use_cuda and "TRITON_INTERPRET" not in os.environ:
        # Without a CUDA device Triton kernels can only run in the interpreter (CPU tensors).
        if "triton" in sys.modules:
            print("warning: triton was imported before TRITON_INTERPRET could be set", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_float32_matmul_precision(args.matmul_precision)
    if not use_cuda:
        torch.set_num_threads(max(1, args.cpu_threads))

    from . import report
    from .runner import RunOptions, Runner
    from .timing import Effort

    pre = PRESETS[args.preset]
    configs = grid(args.B or pre["B"], args.K or pre["K"], args.D or pre["D"], args.dtypes or pre["dtypes"],
                   args.taus or pre["taus"], args.memory or pre["memory"], args.n_data or pre["n_data"],
                   args.scores or pre["scores"])
    if any(c.memory == "momentum" and c.n_data < 1 for c in configs):
        print("--n-data must be >= 1 for the momentum memory", file=sys.stderr)
        return 2
    effort = Effort(
        warmup=args.warmup if args.warmup is not None else pre["warmup"],
        target_ms=args.target_ms if args.target_ms is not None else pre["target_ms"],
        min_reps=args.min_reps if args.min_reps is not None else pre["min_reps"],
        max_reps=args.max_reps if args.max_reps is not None else pre["max_reps"],
    )
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if args.out is None:
        name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        args.out = Path(__file__).resolve().parent / "results" / f"{args.preset}-{slug}-{started:%Y-%m-%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "errors.log"
    if log_path.exists():
        log_path.unlink()

    opts = RunOptions(
        preset=args.preset, configs=configs, providers=args.providers or pre["providers"], modes=args.modes,
        timings=args.timings, effort=effort, device=device, max_seconds=args.max_seconds,
        time_wrong=args.time_wrong, seed=args.seed, log_path=log_path, progress=not args.no_progress,
        extra_meta={"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:] if argv is None else argv},
    )
    print(f"bench: preset {args.preset}, {len(configs)} configuration(s), providers {opts.providers}, "
          f"device {device}, out {args.out}", file=sys.stderr)
    def write_partial(rows):
        report.write_csv(rows, args.out / "results.csv")
        report.write_json(rows, runner.meta | {"partial": True}, args.out / "results.json")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    opts.on_config_done = write_partial
    runner = Runner(opts)
    rows = runner.run()
    if runner.interrupted:
        print("bench: interrupted; configurations not finished are recorded as skipped", file=sys.stderr)
    meta = runner.meta
    meta["elapsed_s"] = time.monotonic() - t_start
    report.write_csv(rows, args.out / "results.csv")
    report.write_json(rows, meta, args.out / "results.json")
    report.write_md(rows, meta, args.out / "results.md")
    if not args.no_plots:
        try:
            report.write_plots(rows, args.out)
        except ImportError as exc:  # matplotlib missing: the tables are the results, plots a convenience
            print(f"bench: no plots ({exc})", file=sys.stderr)
    print("\n".join(report.summary_lines(rows, limit=args.summary_rows)))
    print(f"bench: {len(rows)} rows in {meta['elapsed_s']:.1f} s -> {args.out}")
    return 0

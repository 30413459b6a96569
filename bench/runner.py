"""Runs a benchmark: for each configuration and provider, check against float64, then time every mode
and timing kind, and collect one row per measurement. Failures are recorded, never fatal."""
from __future__ import annotations

import gc
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ceilings, check, inputs, providers, timing
from .config import BASELINES, Config

REPO_ROOT = Path(__file__).resolve().parent.parent
OK_STATUSES = ("ok", "inaccurate")
CONFIG_KEYS = ("B", "K", "D", "dtype", "tau_s", "tau_t", "memory", "n_data", "scores")  # Config's fields, in order

# Column order of the CSV (the JSON rows carry the same keys).
COLUMNS = [
    "device", "torch", "triton", "cuda", "python", "git_commit", "preset", "fp32_matmul_precision",
    "B", "K", "D", "dtype", "tau_s", "tau_t", "memory", "n_data", "scores", "provider", "mode", "timing", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "reps", "input_sets", "peak_extra_mib",
    "floor_ms", "pct_of_floor", "floor_recompute_ms", "pct_of_floor_recompute", "speedup_vs_eager",
    "loss_rel_err", "grad_rel_err", "grad_rows_checked", "loss_tol", "grad_tol", "first_call_s",
    "copy_GBps", "matmul_TFLOPs",
]


@dataclass
class RunOptions:
    preset: str
    configs: list[Config]
    providers: list[str]
    modes: list[str]
    timings: list[str]
    effort: timing.Effort
    device: torch.device
    max_seconds: float | None = None
    time_wrong: bool = False
    seed: int = 0
    log_path: Path | None = None
    progress: bool = True
    on_config_done: object = None  # callable(rows) after each configuration (partial results on disk)
    extra_meta: dict = field(default_factory=dict)


def git_commit() -> str:
    env = os.environ.get("RRD_GIT_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rrd_kernels", "bench", "setup.py"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device, preset: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "preset": preset,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of a provider failure."""
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    msg = msg[:300]
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom", msg
    if isinstance(exc, ImportError) or (isinstance(exc, RuntimeError) and "cannot run this call" in str(exc)):
        return "unavailable", msg
    return "error", msg


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        torch.cuda.empty_cache()


def make_case(fn, sets, mode: str):
    """(setup, run) for one mode; setup(i) uses input set i mod len(sets)."""
    n = len(sets)

    if mode == "fwd":
        def setup(i):
            return sets[i % n]

        def run(x):
            return fn(x.student, x.teacher, x.bank)
    elif mode == "bwd":
        def setup(i):
            x = sets[i % n]
            return x.student, fn(x.student, x.teacher, x.bank)

        def run(state):
            student, loss = state
            return torch.autograd.grad(loss, student)[0]
    elif mode == "fwd+bwd":
        def setup(i):
            return sets[i % n]

        def run(x):
            loss = fn(x.student, x.teacher, x.bank)
            return torch.autograd.grad(loss, x.student)[0]
    else:
        raise ValueError(mode)
    return setup, run


class Runner:
    def __init__(self, opts: RunOptions):
        self.o = opts
        self.meta = environment(opts.device, opts.preset) | opts.extra_meta
        dtypes = sorted({c.dtype for c in opts.configs})
        self.ceil = ceilings.measure(opts.device, dtypes)
        self.meta["ceilings"] = self.ceil
        self.rows: list[dict] = []
        self.t0 = time.monotonic()
        self.tf32_possible = torch.get_float32_matmul_precision() != "highest"
        self.interrupted = False

    # ----------------------------------------------------------------------------------------------- rows
    def _row(self, cfg: Config, provider: str, mode: str, timing_kind: str, status: str, reason: str = "",
             **values) -> dict:
        row = {k: self.meta.get(k, "") for k in COLUMNS if k in self.meta}
        row.update(cfg.as_dict())
        row.update(provider=provider, mode=mode, timing=timing_kind, status=status, reason=reason)
        for k in COLUMNS:
            row.setdefault(k, math.nan if k not in ("reason",) else "")
        if self.ceil and cfg.memory == "bank":  # no floor model for the gathered memory yet
            row["copy_GBps"] = self.ceil["copy_GBps"]
            row["matmul_TFLOPs"] = self.ceil["matmul_TFLOPs"][cfg.dtype]
            row["floor_ms"] = ceilings.floor_ms(self.ceil, cfg.B, cfg.K, cfg.D, cfg.dtype, mode, False)
            row["floor_recompute_ms"] = ceilings.floor_ms(self.ceil, cfg.B, cfg.K, cfg.D, cfg.dtype, mode, True)
        row.update(values)
        med = row.get("median_ms")
        if isinstance(med, float) and med > 0 and not math.isnan(med):
            row["pct_of_floor"] = 100.0 * row["floor_ms"] / med
            row["pct_of_floor_recompute"] = 100.0 * row["floor_recompute_ms"] / med
        return row

    def _kinds(self) -> list[str]:
        if self.o.device.type == "cuda":
            return list(self.o.timings)
        return ["python"]  # no graph mode on the CPU

    def _all_rows(self, cfg, provider, status, reason, **values) -> list[dict]:
        return [self._row(cfg, provider, m, k, status, reason, **values)
                for m in self.o.modes for k in self._kinds()]

    def _log(self, title: str, exc: BaseException) -> None:
        if self.o.log_path is None:
            return
        with open(self.o.log_path, "a", encoding="utf-8") as f:
            f.write(f"==== {title}\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def over_budget(self) -> bool:
        return self.o.max_seconds is not None and time.monotonic() - self.t0 > self.o.max_seconds

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        tasks = len(self.o.configs) * len(self.o.providers)
        bar = None
        if self.o.progress:
            try:
                from tqdm import tqdm
            except ImportError:  # progress is a convenience: go on without it
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=tasks, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
        done = 0
        try:
            for ci, cfg in enumerate(self.o.configs):
                self._run_config(cfg, ci, bar)
                done += 1
                free_memory(self.o.device)
                if self.o.on_config_done is not None:
                    self.o.on_config_done(self.rows)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (from `timeout`) turned into it by the command line
            self.interrupted = True
            cfg_done = {tuple(c.as_dict().values()) for c in self.o.configs[:done]}
            self.rows = [r for r in self.rows if tuple(r[k] for k in CONFIG_KEYS) in cfg_done]
            for cfg in self.o.configs[done:]:
                for p in self.o.providers:
                    self.rows += self._all_rows(cfg, p, "skipped", "interrupted")
        if bar is not None:
            bar.close()
        return self.rows

    def _run_config(self, cfg: Config, ci: int, bar) -> None:
        start = len(self.rows)
        skip_reason = (f"time budget of {self.o.max_seconds:g} s spent" if self.o.max_seconds is not None else "")
        if self.over_budget():
            for p in self.o.providers:
                self.rows += self._all_rows(cfg, p, "skipped", skip_reason)
                if bar is not None:
                    bar.update(1)
            return
        dev = self.o.device
        sets, ref = [], None
        try:
            n_sets = inputs.n_rotating_sets(cfg, dev)
            sets = [inputs.make_inputs(cfg, dev, seed=self.o.seed * 1_000_003 + ci * 101 + i)
                    for i in range(n_sets)]
            ref = check.Reference(cfg, sets[0].student, sets[0].teacher, sets[0].bank)
        except Exception as exc:  # inputs or the float64 reference do not fit
            failed = classify(exc)
            self._log(f"{cfg.label()} inputs/reference", exc)
        else:
            failed = None
        if failed is not None:
            status, reason = failed
            sets, ref = [], None
            free_memory(dev)
            for p in self.o.providers:
                self.rows += self._all_rows(cfg, p, status, "inputs/reference: " + reason)
                if bar is not None:
                    bar.update(1)
            return
        for p in self.o.providers:
            if bar is not None:
                bar.set_postfix_str(f"{cfg.B}x{cfg.K}x{cfg.D} {cfg.dtype} {p}")
            if self.over_budget():
                self.rows += self._all_rows(cfg, p, "skipped", skip_reason)
            else:
                self.rows += self._run_provider(cfg, p, sets, ref)
                free_memory(dev)
            if bar is not None:
                bar.update(1)
        del sets, ref
        self._speedups(self.rows[start:])

    def _run_provider(self, cfg: Config, provider: str, sets, ref) -> list[dict]:
        dev = self.o.device
        lt, gt = check.thresholds(cfg.dtype, self.tf32_possible)
        errs = dict(loss_tol=lt, grad_tol=gt, grad_rows_checked=int(ref.rows.numel()),
                    input_sets=len(sets))
        # 1. build and check against float64; the first forward + backward (synchronised) includes the
        #    kernels' JIT compilation (Triton, torch.compile): reported as first_call_s
        try:
            t_first = time.perf_counter()
            fn = providers.build(provider, cfg)
            x = sets[0]
            loss = fn(x.student, x.teacher, x.bank)
            (grad,) = torch.autograd.grad(loss, x.student)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            errs["first_call_s"] = time.perf_counter() - t_first
            print(f"first call (build + compile + fwd + bwd) {provider} {cfg.label()}: "
                  f"{errs['first_call_s']:.1f} s", flush=True)
            loss_err, grad_err = check.compare(ref, loss, grad)
            del loss, grad
        except Exception as exc:
            failed = classify(exc)
            self._log(f"{cfg.label()} {provider} check", exc)
        else:
            failed = None
        if failed is not None:
            fn = None
            free_memory(dev)
            return self._all_rows(cfg, provider, *failed, **errs)
        errs.update(loss_rel_err=loss_err, grad_rel_err=grad_err)
        accurate = loss_err <= lt and grad_err <= gt
        status, reason = "ok", ""
        if not accurate:
            reason = f"error above tolerance (loss {loss_err:.2e} vs {lt:g}, grad {grad_err:.2e} vs {gt:g})"
            if provider in BASELINES or self.o.time_wrong:
                status = "inaccurate"
            else:
                return self._all_rows(cfg, provider, "wrong", reason + "; not timed", **errs)
        # 2. time every mode and timing kind
        out = []
        for mode in self.o.modes:
            setup, run = make_case(fn, sets, mode)
            for kind in self._kinds():
                failed = None
                try:
                    vals = self._measure(kind, setup, run, len(sets))
                    out.append(self._row(cfg, provider, mode, kind, status, reason, **errs, **vals))
                except Exception as exc:
                    failed = classify(exc)
                    self._log(f"{cfg.label()} {provider} {mode} {kind}", exc)
                if failed is not None:  # outside the except block: its traceback no longer holds tensors
                    st, why = failed
                    if kind == "graph" and st == "error":
                        st = "graph_failed"
                    free_memory(dev)
                    out.append(self._row(cfg, provider, mode, kind, st, why, **errs))
        return out

    def _measure(self, kind: str, setup, run, n_sets: int) -> dict:
        eff = self.o.effort
        if self.o.device.type != "cuda":
            t = timing.time_cpu(setup, run, eff)
            return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
        if kind == "python":
            mem = timing.peak_extra_mib(setup, run)
            t = timing.time_cuda_python(setup, run, eff)
            return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                        peak_extra_mib=mem)
        case = timing.GraphCase(setup, run, n_sets)
        try:
            t = case.time(eff)
        finally:
            case.close()
        return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)

    @staticmethod
    def _speedups(rows: list[dict]) -> None:
        base = {(r["mode"], r["timing"]): r["median_ms"] for r in rows
                if r["provider"] == "eager" and r["status"] in OK_STATUSES}
        for r in rows:
            b = base.get((r["mode"], r["timing"]))
            m = r.get("median_ms")
            if b is not None and r["status"] in OK_STATUSES and isinstance(m, float) and m > 0:
                r["speedup_vs_eager"] = b / m

"""Compile gate for the Triton kernels: every kernel configuration the launchers can choose, compiled by the
real Triton compiler (front end, LLVM, ptxas) for sm_80, sm_86, sm_90, sm_100 and sm_120, without a GPU.

Each case calls the backend's own forward and backward (rrd_kernels/triton_kernels/launch.py) on CPU tensors
while a stand-in driver (tools/standin_driver.py) answers for the architecture: the launch path, the plan
chosen from the device's limits, the argument specialisation and the compile options are exactly a GPU
call's; only the final launch does nothing. What the launchers can choose is finite: the plan depends on the
device family, the product mode (fp32 FMA, TF32, fp16/bf16), the bank dtype, and Triton specialises the
integer and pointer arguments on divisibility by 16 (an aligned D such as 128, an unaligned one such as
100, and D = 1). Batch size, bank size and split count are not specialised (do_not_specialize), so they
cannot make new kernels.

A kernel fails the gate on a compile error, on dynamic shared memory above the architecture's per-block
limit (what Triton refuses at launch), or on any stack frame (register spills, local arrays). A case the
plans refuse (plans.unsupported(): the UNSUPPORTED table, what is known not to compile) is not compiled: it
is a "refused (reason)" row, which is not a failure; --try-refused compiles it anyway, to see whether this
triton still needs the refusal.

Below the table, the torch/triton pair it ran under: the committed report is made with PINNED_TRITON (CI and
the GPU machines); torch's own triton pin, when it has one, is checked against the triton installed; --write
refuses another triton.

    python -m tools.triton_gate                 # all archs, print the table, exit 1 on a failure
    python -m tools.triton_gate --write         # also rewrite the committed report (the pinned triton only)
    python -m tools.triton_gate --arch sm_86 -j 2

The Triton cache is a fresh temporary directory: a cached kernel skips the front end and would hide errors.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "rrd_kernels" / "triton_kernels" / "compile-report.txt"
MAX_STACK = 0  # bytes of stack frame a kernel may have
# Archs whose plans are borrowed from another family and not tuned for them (plans.py: TILES/RESIDENT
# aliases): a stack frame there is reported in the verdict but is no failure, since no plan has been tuned
# (or run) on such a GPU yet; compile errors and shared memory over the limit fail as everywhere. Remove an
# arch from here when it gets tiles of its own, and its spills fail the gate.

# The torch/triton versions story (README "Versions"). The pinned triton makes the committed report and is
# what CI (.ci/run: torch 2.13.0 CPU) and the GPU machines (torch 2.11 + cu130, whose pin it is) run.
PINNED_TRITON = "3.6.0"
KNOWN_TRITON = {
    PINNED_TRITON: "the pinned triton (CI, the GPU machines): the committed report applies exactly",
    "3.8.0": "torch 2.14.1's pin (a fresh venv's default torch): no compile error or shared memory over the "
             "limit seen, but stack frames (spills) in some kernels (docs/design.md, section 7), which the gate "
             "fails and the gate test only warns about",
}

# (embedding dtype, fp32 matmul precision, bank dtype): every product mode with every bank dtype.
MODES = [
    ("float32", "highest"), ("float32", "high"), ("bfloat16", "highest"), ("float16", "highest"),
]
BANK_DTYPES = ["float32", "bfloat16", "float16"]
# D: divisible by 16, not divisible, and 1 (unit strides), on the resident kernels (D <= 128 where the plan has
# them); 256 and 300 (aligned and not) on the resident D-256 tiles or the chunked kernels, and 512 on sm_90's
# resident D-512 tiles (aligned rows only: D 300 stays chunked there), the chunked kernels elsewhere.
SHAPES = [128, 100, 1, 256, 300, 512]


def _cases():
    for dtype, precision in MODES:
        for bank_dtype in BANK_DTYPES:
            for D in SHAPES:
                yield dtype, precision, bank_dtype, D


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one function in a cubin, read by cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def refusal(dtype, bank_dtype, D: int) -> str | None:
    """The reason the plans refuse this case on the active (stand-in) driver's device, as the launcher would
    (plans.unsupported with the call's product mode), or None. Compiles nothing."""
    import torch

    from rrd_kernels.triton_kernels import launch, plans

    mode = plans.mode_of(dtype == torch.float32, launch._fp32_precision(), bank_dtype.itemsize)
    return plans.unsupported(plans.current_limits(), mode, dtype, bank_dtype, D)


def run_arch(arch_name: str, try_refused: bool = False) -> list[dict]:
    """Compile every case for one architecture; one row per distinct compiled kernel, one per refused case."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"rrd-gate-{arch_name}-")
    sys.path.insert(0, str(ROOT))
    import torch

    from rrd_kernels.triton_kernels import launch
    from tools.standin_driver import ARCHS, stand_in

    arch = ARCHS[arch_name]
    kernels = list(launch._KERNELS)
    for k in kernels:
        k.device_caches.clear()  # a binder remembers the target it was made for
    seen: dict[tuple, dict] = {}
    tried: set[tuple] = set()  # kernels compiled only by refused cases (--try-refused)
    gen = torch.Generator().manual_seed(0)
    B, K = 5, 300
    def compile_case(case, run, refused):
        """Run one case's launches (compiling their kernels) and add a row per kernel it compiled first."""
        if refused is not None:
            row = dict(arch=arch_name, kernel="(refused)", case=case, refused=refused)
            seen[("refused", case)] = row
            if not try_refused:
                return
        error = None
        t0 = time.time()
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a failing case is a gate row, not a crash
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        elapsed = time.time() - t0
        if refused is not None:  # --try-refused: what this triton does with it; its kernels are no rows
            row["tried"] = "still fails: " + error if error else "compiles with this triton"
            for k in kernels:
                for key in k.device_caches[0][0]:
                    tried.add((k.fn.__name__, key))
            return
        for k in kernels:
            for key, compiled in k.device_caches[0][0].items():
                if (k.fn.__name__, key) in seen or (k.fn.__name__, key) in tried:
                    continue
                regs, stack = _resources(compiled.asm["cubin"])
                md = compiled.metadata
                seen[(k.fn.__name__, key)] = dict(
                    arch=arch_name, kernel=k.fn.__name__, case=case, regs=regs, stack=stack,
                    shared=md.shared, limit=arch.max_shared_mem, warps=md.num_warps, stages=md.num_stages,
                    seconds=elapsed,
                )
        if error is not None:
            seen[("error", case)] = dict(arch=arch_name, kernel="(launch)", case=case, error=error)

    with stand_in(arch):
        for dtype, precision, bank_dtype, D in _cases():
            torch.set_float32_matmul_precision(precision)
            dt, bdt = getattr(torch, dtype), getattr(torch, bank_dtype)
            s = torch.randn(B, D, generator=gen).to(dt)
            t = torch.randn(B, D, generator=gen).to(dt)
            q = torch.randn(K, D, generator=gen).to(bdt)

            def run():
                rows, lse_s, lse_t, ref = launch.forward(s, t, q, 0.1, 0.05, False, n_splits=2)
                launch.backward(torch.ones(B), s, t, q, lse_s, lse_t, ref, 0.1, 0.05, n_splits=2)

            case = f"{dtype}/{precision if dtype == 'float32' else '-'} bank {bank_dtype} D {D}"
            compile_case(case, run, refusal(dt, bdt, D))
        # The gathered-memory kernels (triton_kernels/gathered.py): fp32 embeddings, any memory dtype; their
        # plan depends on D only (and on the KL flag of the forward).
        from rrd_kernels.triton_kernels.gathered import gathered_rows_and_grad

        for bank_dtype in BANK_DTYPES:
            for D in SHAPES:
                bdt = getattr(torch, bank_dtype)
                s = torch.randn(B, D, generator=gen)
                memory = torch.randn(K, D, generator=gen).to(bdt)
                index = torch.randint(0, K, (B, 33), generator=gen)

                def run():
                    for kl in (False, True):
                        gathered_rows_and_grad(s, s, memory, memory, index, 0.1, 0.05, kl, n_splits=2)

                compile_case(f"gathered float32 memory {bank_dtype} D {D}", run, None)
    return list(seen.values())


def verdict(row: dict) -> str:
    if "refused" in row:
        return f"refused ({row['refused']})" + (f"; {row['tried']}" if "tried" in row else "")
    if "error" in row:
        return "FAIL " + row["error"]
    problems = []
    if row["shared"] > row["limit"]:
        problems.append(f"shared {row['shared']} > {row['limit']}")
    if row["stack"] > MAX_STACK:
        problems.append(f"stack {row['stack']} B (spills)")
    return "FAIL " + ", ".join(problems) if problems else "ok"


def failed(row: dict) -> bool:
    return verdict(row).startswith("FAIL")


def versions() -> tuple[list[str], list[str]]:
    """(notes, warnings) on the torch/triton pair this runs under: which triton, what is known of it, and
    whether torch's own triton pin (a CUDA build has one, a CPU build none) is the triton installed."""
    import importlib.metadata as md

    import torch
    import triton

    tv = triton.__version__
    known = KNOWN_TRITON.get(tv, f"not a version checked here; the committed report is made with the pinned "
                                 f"triton {PINNED_TRITON}, and other versions may differ in spills (see README)")
    notes, warns = [f"versions: torch {torch.__version__}, triton {tv}: {known}"], []
    try:
        reqs = md.requires("torch") or []
    except md.PackageNotFoundError:
        reqs = []
    pins = [m.group(1) for m in (re.match(r"triton\s*==\s*([\w.]+)", r) for r in reqs) if m]
    if not pins:
        notes.append(f"versions: torch {torch.__version__} pins no triton (a CPU build): the triton installed "
                     "is whatever was asked for")
    for pin in pins:
        if pin != tv:
            warns.append(f"torch {torch.__version__} pins triton {pin} but triton {tv} is installed: a GPU "
                         f"install of this torch compiles with {pin}, not what this table shows")
    return notes, warns


def format_table(rows: list[dict]) -> str:
    import triton

    lines = [
        f"# Triton compile gate (tools/triton_gate.py), triton {triton.__version__}: every kernel the launchers",
        "# can choose, compiled for each arch. shared = dynamic shared memory per block (bytes), limit = the",
        "# arch's per-block maximum, stack = stack frame (bytes; > 0 means spills).",
        f"{'arch':6} {'kernel':22} {'case':44} {'regs':>4} {'stack':>5} {'shared':>7} {'limit':>7} {'warps':>5} "
        f"{'stages':>6}  verdict",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["case"])):
        if "error" in r or "refused" in r:
            lines.append(f"{r['arch']:6} {r['kernel']:22} {r['case']:44} {verdict(r)}")
            continue
        lines.append(
            f"{r['arch']:6} {r['kernel']:22} {r['case']:44} {r['regs']:>4} {r['stack']:>5} {r['shared']:>7} "
            f"{r['limit']:>7} {r['warps']:>5} {r['stages']:>6}  {verdict(r)}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tools.standin_driver import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: all")
    parser.add_argument("-j", "--jobs", type=int, default=min(3, os.cpu_count() or 1))
    parser.add_argument("--write", action="store_true", help=f"rewrite {REPORT.relative_to(ROOT)}")
    parser.add_argument("--try-refused", action="store_true",
                        help="also compile the cases the plans refuse (UNSUPPORTED) and say what this triton does")
    args = parser.parse_args(argv)
    archs = args.arch or sorted(ARCHS)
    import triton

    if args.write and triton.__version__ != PINNED_TRITON:
        print(f"--write: the committed report is made with the pinned triton {PINNED_TRITON}, not "
              f"{triton.__version__}", file=sys.stderr)
        return 2
    t0 = time.time()
    with futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = [row for rows in pool.map(run_arch, archs, [args.try_refused] * len(archs)) for row in rows]
    table = format_table(results)
    print(table, end="")
    notes, warns = versions()
    for line in notes:
        print("# " + line)
    for line in warns:
        print("# WARNING " + line)
    failures = [r for r in results if failed(r)]
    refused = sum("refused" in r for r in results)
    print(f"# {len(results)} rows: {len(results) - refused} kernels, {refused} refused cases, {len(failures)} failing, "
          f"{time.time() - t0:.0f} s")
    if args.write and not args.try_refused:
        REPORT.write_text(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

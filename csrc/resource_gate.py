"""Compile gate of the CUDA kernels: every kernel the CUDA backend can launch, compiled by nvcc/ptxas for each
GPU architecture we support, must fit that architecture. Needs nvcc only, no GPU.

    python csrc/resource_gate.py            # compile, print the table, exit 1 when a kernel does not fit
    python csrc/resource_gate.py --write    # also rewrite csrc/ptxas-report.txt (commit it)

What "every configuration we can launch" is here: the kernels take all sizes (B, K, D, strides, splits) at
run time, so the compiled kernels are the whole set: rrd_forward_kernel and rrd_backward_kernel for each of
the 4 precision modes, rrd_forward_resident_kernel and rrd_backward_resident_kernel for fp16 and bf16 (the
launches' choice for D <= 128), each twice: bank tiles by cp.async or by converting loads (the ASYNC template
argument, chosen per call by rrd::bank_by_cp_async), rrd_merge_kernel and rrd_finish_kernel, and the gathered-memory kernels
rrd_gathered_{forward,backward,finish}_kernel for each of the 3 memory dtypes (forward and backward twice:
for D <= 128 and D <= 512), all launched with 128 threads
and the dynamic shared memory of rrd::launch_smem / rrd::gathered_smem (rrd_host.inl,
rrd_gathered_host.inl; read here by compiling and running a small host program
against the same header, so the table cannot drift from what the launches pass).

The rule (the same one the Triton kernels answer to, with the stack limit tightened from 256 B to 0, which
these kernels meet):
  * nvcc compiles the kernels for the architecture;
  * no stack frame and no spill stores / loads (local memory is slow and a sign of a register-starved tile);
  * registers x 128 threads within the 64 K registers of a multiprocessor (and <= 255 per thread);
  * static + dynamic shared memory within 48 KiB: the launches do not call cudaFuncSetAttribute, so that is
    what a block may have on every CUDA device (and it is under each architecture's opt-in maximum:
    sm_80 A100 163 KiB, sm_86 / sm_89 99 KiB, sm_90 H100/H200 227 KiB).

Architectures: the build ships sm_80 and sm_90 machine code (+ compute_90 PTX). GPUs of compute capability
8.6 and 8.9 (RTX 30xx/40xx, A10, L4) run the sm_80 cubin (machine code is compatible within a major version),
so the sm_80 rows are also held to the 8.6/8.9 shared-memory limit; the gate compiles for sm_86 as well, to
show the kernels need no more there than on sm_80.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

CSRC = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(CSRC, "ptxas-report.txt")
# Every file whose content changes the compiled module (hashed into the module's BUILD_INFO and the report).
HASHED = ["rrd_api.h", "rrd_common.cuh", "rrd_kernels.cuh", "rrd_resident.cuh", "rrd_host.inl",
          "rrd_gathered.cuh", "rrd_gathered_host.inl", "rrd_cuda.cu", "binding.cpp"]
ARCHS = ("sm_80", "sm_86", "sm_90")
THREADS = 128
KERNELS = 33  # FIFO: 4 forward + 4 backward (chunked), 4 + 4 resident (fp16, bf16 x cp.async, converting),
# merge, finish; gathered,
# per memory dtype (3): forward and backward for D <= 128 and for D <= 512, finish
MAX_STACK = 0  # bytes (the shared rule allows 256; these kernels have none and should stay so)
REGS_PER_SM = 65536
SMEM_WITHOUT_OPT_IN = 48 * 1024
# Per-block opt-in maximum of the GPUs each cubin runs on (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_OPT_IN = {
    "sm_80": 101376,  # 163 KiB on an A100 (8.0), but this cubin also runs on 8.6 / 8.9: 99 KiB
    "sm_86": 101376,  # RTX 30xx, A10; 8.9 (RTX 40xx, L4) the same
    "sm_90": 232448,  # H100 / H200: 227 KiB
}
MODES = ("3xTF32 mma", "tf32 mma", "fp16 mma", "bf16 mma")
# nvcc's flags for rrd_cuda.cu, shared by the real build (setup.py), this gate and the cost model
# (tools/cuda_cost.py), so that all three see the same machine code; each adds its -gencode targets.
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-I" + CSRC]
MEMORY_DTYPES = ("fp32", "fp16", "bf16")  # the gathered kernels' template parameter (dtype codes 0, 1, 2)
GATHERED_SLOTS = {16: 128, 64: 512}  # the gathered kernels' features per lane -> the largest D they run

# Host-only program printing rrd::launch_smem for every mode. RRD_LAUNCH discards its arguments, so no kernel
# is instantiated and this compiles in seconds.
PROBE = r"""
#include <cstdio>
#define RRD_STREAM_T uintptr_t
#define RRD_LAUNCH(kernel, grid, block, smem, stream, ...) ((void)(grid), (void)(smem))
#include "rrd_host.inl"
#include "rrd_gathered_host.inl"
int main() {
  for (int mode = 0; mode < 4; ++mode) {
    const rrd::SmemUse u = rrd::launch_smem(mode);
    std::printf("%d %d %d %d %d %d %d\n", mode, u.forward, u.merge, u.backward, u.finish, u.forward_resident,
                u.backward_resident);
  }
  const rrd::GatheredSmem g = rrd::gathered_smem();
  std::printf("gathered %d %d %d\n", g.forward, g.backward, g.finish);
  return 0;
}
"""


def source_hash() -> str:
    """sha256 (first 16 hex digits) of the sources the extension is built from."""
    h = hashlib.sha256()
    for name in HASHED:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or the one the triton wheel ships (CUDA 13's nvcc packages may lack it)."""
    nvcc = find_nvcc()
    candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")] if nvcc else []
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    return next((v for v in out.splitlines() if "release" in v), out or "unknown")


def parse_ptxas(log: str) -> list[dict]:
    """Per-kernel records from `nvcc -Xptxas -v` output: name, arch, registers, stack, spill stores / loads,
    static shared memory."""
    records, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "static_smem": 0}
            records.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
    return records


def kernel_key(mangled: str) -> str | None:
    """'forward 0' .. 'backward 3', 'forward_resident 2 async' .. 'backward_resident 3 convert', 'merge', 'finish',
    'gathered forward 0 16' .. 'gathered finish 2' from a mangled kernel name (None: not ours)."""
    m = re.search(r"rrd_gathered_(forward|backward|finish)_kernelILi(\d)E(?:Li(\d+)E)?", mangled)
    if m:
        return f"gathered {m.group(1)} {m.group(2)}" + (f" {m.group(3)}" if m.group(3) else "")
    m = re.search(r"rrd_(forward|backward|forward_resident|backward_resident)_kernelILi(\d)E(?:Lb([01])E)?", mangled)
    if m:
        staging = {None: "", "1": " async", "0": " convert"}[m.group(3)]
        return f"{m.group(1)} {m.group(2)}{staging}"
    m = re.search(r"rrd_(merge|finish)_kernel", mangled)
    return m.group(1) if m else None


def dynamic_smem(nvcc: str, workdir: str) -> dict[str, int]:
    """Dynamic shared memory per kernel key, as rrd::launch_smem gives it to the launches."""
    src, exe = os.path.join(workdir, "smem_probe.cu"), os.path.join(workdir, "smem_probe")
    with open(src, "w") as f:
        f.write(PROBE)
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-I" + CSRC, src, "-o", exe], check=True, capture_output=True, text=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    smem = {}
    for line in out.split("\n"):
        if line.startswith("gathered"):
            fwd, bwd, finish = map(int, line.split()[1:])
            for dtype in range(len(MEMORY_DTYPES)):
                smem[f"gathered finish {dtype}"] = finish
                for slots in GATHERED_SLOTS:
                    smem[f"gathered forward {dtype} {slots}"] = fwd
                    smem[f"gathered backward {dtype} {slots}"] = bwd
        elif line.strip():
            mode, fwd, merge, bwd, finish, fwd_res, bwd_res = map(int, line.split())
            smem[f"forward {mode}"], smem[f"backward {mode}"] = fwd, bwd
            for staging in ("async", "convert"):  # the same buffers either way
                smem[f"forward_resident {mode} {staging}"] = fwd_res
                smem[f"backward_resident {mode} {staging}"] = bwd_res
            smem["merge"], smem["finish"] = merge, finish  # the same for every mode
    return smem


def compile_kernels(nvcc: str, archs, workdir: str, threads: int = 2) -> str:
    """ptxas' verbose output for rrd_cuda.cu compiled for `archs`; raises CalledProcessError on a compile error."""
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    cmd = [nvcc, *NVCC_FLAGS, f"--threads={threads}", *gencode, "-c", os.path.join(CSRC, "rrd_cuda.cu"), "-o", os.path.join(workdir, "rrd_cuda.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, cmd, out.stdout, out.stderr)
    return out.stdout + out.stderr


def evaluate(records: list[dict], smem: dict[str, int], archs=ARCHS) -> tuple[list[dict], list[str]]:
    """(rows of the table, violations). A row per (arch, kernel) with every limit it was held to."""
    rows, problems = [], []
    for arch in archs:
        mine = [r for r in records if r["arch"] == arch]
        if len(mine) != KERNELS:
            problems.append(f"{arch}: expected {KERNELS} kernels in ptxas' output, got {len(mine)}")
        for r in mine:
            key = kernel_key(r["name"])
            if key is None or "registers" not in r or "stack" not in r:
                problems.append(f"{arch}: unexpected or incomplete ptxas record {r}")
                continue
            dyn = smem[key]
            total = r["static_smem"] + dyn
            limit = min(SMEM_WITHOUT_OPT_IN, SMEM_OPT_IN[arch])
            row = {**r, "key": key, "dynamic_smem": dyn, "total_smem": total, "smem_limit": limit}
            why = []
            if r["stack"] > MAX_STACK or r["spill_stores"] or r["spill_loads"]:
                why.append(f"stack {r['stack']} B / spills {r['spill_stores']}+{r['spill_loads']} B")
            if r["registers"] > 255 or r["registers"] * THREADS > REGS_PER_SM:
                why.append(f"{r['registers']} registers x {THREADS} threads")
            if total > limit:
                why.append(f"shared memory {total} B > {limit} B")
            row["verdict"] = "FAIL: " + "; ".join(why) if why else "ok"
            if why:
                problems.append(f"{arch} {key}: {'; '.join(why)}")
            rows.append(row)
    return rows, problems


def describe(key: str) -> str:
    if key.startswith("gathered "):
        _, kind, dtype, *slots = key.split()
        size = f", D<={GATHERED_SLOTS[int(slots[0])]}" if slots else ""
        return f"gathered {kind} ({MEMORY_DTYPES[int(dtype)]} mem{size})"
    kind, *rest = key.split()
    if not rest:
        return kind
    staging = {"async": ", cp.async", "convert": ", converting"}.get(rest[1], "") if len(rest) > 1 else ""
    return f"{kind} ({MODES[int(rest[0])]}{staging})"


def render(rows: list[dict], header: list[str]) -> str:
    lines = [f"# {h}" for h in header] + ["#"]
    lines.append(f"# {'arch':<6} {'regs':>4} {'stack':>5} {'spill_st':>8} {'spill_ld':>8} {'smem_st':>7} "
                 f"{'smem_dyn':>8} {'limit':>6}  {'kernel':<44} verdict")
    for r in rows:
        lines.append(f"  {r['arch']:<6} {r['registers']:>4} {r['stack']:>5} {r['spill_stores']:>8} "
                     f"{r['spill_loads']:>8} {r['static_smem']:>7} {r['dynamic_smem']:>8} {r['smem_limit']:>6}  "
                     f"{describe(r['key']):<44} {r['verdict']}")
    return "\n".join(lines) + "\n"


def run_gate(nvcc: str | None = None, archs=ARCHS, threads: int = 2) -> tuple[str, list[str], list[dict]]:
    """Compile, evaluate and render: (table text, violations, ptxas records)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory(prefix="rrd-gate-") as work:
        smem = dynamic_smem(nvcc, work)
        log = compile_kernels(nvcc, archs, work, threads)
    records = parse_ptxas(log)
    rows, problems = evaluate(records, smem, archs)
    header = [
        "CUDA compile gate of rrd_kernels._rrd_cuda: `python csrc/resource_gate.py --write` (checked by",
        "tests/test_cuda_build.py; rules in csrc/resource_gate.py)",
        f"source hash {source_hash()} (csrc: {', '.join(HASHED)})",
        f"nvcc: {nvcc_version(nvcc)}; {THREADS} threads per block for every kernel",
        "regs: per thread; stack / spills: bytes; smem_st: static (ptxas), smem_dyn: dynamic (rrd::launch_smem,",
        "rrd::gathered_smem),",
        f"limit: per-block shared memory without opt-in ({SMEM_WITHOUT_OPT_IN} B), which is below the opt-in",
        "maximum of every GPU the cubin runs on (sm_80 -> 8.0/8.6/8.9: 101376 B; sm_86: 101376 B; sm_90: 232448 B)",
        f"violations: {len(problems)}",
    ]
    return render(rows, header), problems, records


def main(argv: list[str]) -> int:
    text, problems, _ = run_gate(threads=max(2, min(len(ARCHS), os.cpu_count() or 2)))
    sys.stdout.write(text)
    for p in problems:
        print("VIOLATION:", p, file=sys.stderr)
    if "--write" in argv:
        with open(REPORT, "w") as f:
            f.write(text)
        print(f"wrote {REPORT}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

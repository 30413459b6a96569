"""The ptxas resource report of the CUDA extension (csrc/ptxas-report.txt), written by setup.py.

nvcc runs one ptxas per architecture in parallel (--threads), so the order in which their outputs reach the
log changes from build to build. The report is committed, and a build must not dirty the checkout, so it is
made a function of the content only: kernel blocks are sorted by (architecture, mangled name), and the file
is rewritten only when that text differs from what is there.

Loaded by setup.py by file path (this folder is not a package) and by tests/test_cuda_build.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")

NOTES = [
    "dynamic shared memory per block (not in ptxas' count): forward 28160 B (fp32 modes) /",
    "15872 B (fp16/bf16); backward 35328 B / 18944 B; finish 16 B (see rrd_kernels.cuh)",
]


def _arch_key(arch: str) -> tuple[int, str]:
    m = re.match(r"sm_(\d+)(\w*)", arch)
    return (int(m.group(1)), m.group(2)) if m else (0, arch)


def parse_ptxas(log: str) -> list[dict]:
    """Per-kernel records of `nvcc -Xptxas -v` output, sorted by (arch, mangled name): name, arch,
    registers, stack, spill_stores, spill_loads, static_smem, and raw (the block's own log lines)."""
    records, current = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "raw": [line.rstrip()]}
            records.append(current)
            continue
        if current is None or not line.strip():
            continue
        m = _FRAME.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["static_smem"] = int(s.group(1)) if s else 0
        # Lines of this kernel's block: its properties, frame and usage. Anything else ptxas prints between
        # blocks (e.g. "0 bytes gmem", once per architecture) is not tied to a kernel and is left out.
        if "Function properties" in line or _FRAME.search(line) or _USED.search(line):
            current["raw"].append(line.rstrip())
    records.sort(key=lambda r: (_arch_key(r["arch"]), r["name"]))
    return records


def demangle(names: list[str]) -> list[str]:
    """C++ names via c++filt when it is there (else the mangled names)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    try:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        return lines if len(lines) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def format_report(log: str, header: list[str], demangler=demangle) -> str:
    """The report text: header, one table row per kernel, the notes, then each kernel's raw ptxas lines in
    the same order. Depends only on the set of kernel blocks in `log`, not on their order."""
    records = parse_ptxas(log)
    pretty = demangler([r["name"] for r in records])
    lines = [f"# {h}" for h in header]
    lines.append("#")
    lines.append(f"# {'arch':<6} {'regs':>4} {'stack':>5} {'spill_st':>8} {'spill_ld':>8} {'smem':>5}  kernel")
    for r, name in zip(records, pretty):
        lines.append(
            f"  {r['arch']:<6} {r.get('registers', -1):>4} {r.get('stack', -1):>5} {r.get('spill_stores', -1):>8}"
            f" {r.get('spill_loads', -1):>8} {r.get('static_smem', 0):>5}  {name}"
        )
    lines.append("#")
    lines.extend(f"# {n}" for n in NOTES)
    lines.append("#")
    lines.append("# raw ptxas output, per kernel in the order above:")
    for r in records:
        lines.extend(r["raw"])
    return "\n".join(lines) + "\n"


def write_if_changed(path: str, text: str) -> bool:
    """Write text to path unless the file already holds exactly that (keeps the checkout clean and the
    mtime as it was). True when it wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True

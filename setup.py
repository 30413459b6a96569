"""Build rrd_kernels from source. Pure-Python package; the CUDA extension (csrc/) is built when nvcc is found.

The extension rrd_kernels._rrd_cuda is built by driving nvcc directly (no torch.utils.cpp_extension, no torch
headers), so the build needs only nvcc, a host C++ compiler and pybind11, and works without a GPU:
  * nvcc is CUDA_HOME/bin/nvcc (or CUDA_PATH) when set, else nvcc on PATH;
  * RRD_CUDA_ARCHS (default "80;90") lists the SASS targets; PTX is embedded for the newest one;
  * RRD_SKIP_CUDA_BUILD=1 skips the extension (the package then installs without it);
  * the CUDA runtime is linked statically (-cudart static), so the module depends only on the driver;
  * ninja runs the two compilations in parallel when available (the `ninja` build requirement);
  * ninja missing: the two compilations run as plain parallel subprocesses; pybind11 missing: the package
    installs without the extension and says why (as without nvcc);
  * the ptxas resource report (registers, spills per kernel per arch) of this build is written to
    <build_temp>/ptxas-report.txt; the committed csrc/ptxas-report.txt is the compile gate's table
    (csrc/resource_gate.py: every kernel for sm_80, sm_86 and sm_90, with shared memory and limits).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
EXT_NAME = "rrd_kernels._rrd_cuda"
CU_SOURCES = ["csrc/rrd_cuda.cu"]
CXX_SOURCES = ["csrc/binding.cpp"]


def _load_gate():
    """csrc/resource_gate.py (source hash, ptxas parsing), loaded by path: csrc is not a package."""
    spec = importlib.util.spec_from_file_location("rrd_resource_gate", os.path.join(CSRC, "resource_gate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


find_nvcc = gate.find_nvcc  # CUDA_HOME / CUDA_PATH, else nvcc on PATH


def cuda_archs() -> list[str]:
    raw = os.environ.get("RRD_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d{2,3}[af]?", a) or int(re.match(r"\d+", a).group()) < 80:
            raise SystemExit(f"RRD_CUDA_ARCHS: {a!r} is not a compute capability >= 80 (e.g. '80;90')")
    return archs


def find_ninja() -> str | None:
    try:
        import ninja  # the PyPI package, a build requirement in pyproject.toml

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    try:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        return lines if len(lines) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def ptxas_report(log: str, header: list[str]) -> str:
    records = gate.parse_ptxas(log)
    pretty = demangle([r["name"] for r in records])
    lines = [f"# {h}" for h in header]
    lines.append("#")
    lines.append(f"# {'arch':<6} {'regs':>4} {'stack':>5} {'spill_st':>8} {'spill_ld':>8} {'smem':>5}  kernel")
    for r, name in zip(records, pretty):
        lines.append(
            f"  {r['arch']:<6} {r.get('registers', -1):>4} {r.get('stack', -1):>5} {r.get('spill_stores', -1):>8}"
            f" {r.get('spill_loads', -1):>8} {r.get('static_smem', 0):>5}  {name}"
        )
    lines.append("#")
    lines.append("# dynamic shared memory per kernel and the per-arch limits: csrc/ptxas-report.txt (the gate)")
    lines.append("#")
    lines.append("# raw ptxas output:")
    lines.extend(line.rstrip() for line in log.splitlines() if line.strip() and "Compile time" not in line)
    return "\n".join(lines) + "\n"


class CUDAExtension(Extension):
    """Marker: built by NvccBuildExt with nvcc, not by setuptools' compiler."""


class NvccBuildExt(build_ext):
    def run(self):
        notice_skip()  # also for a bare `setup.py build_ext --inplace`
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        self._build_cuda(ext)

    def _build_cuda(self, ext):
        import pybind11

        nvcc = find_nvcc()
        archs = cuda_archs()
        out_path = self.get_ext_fullpath(ext.name)
        build_dir = os.path.abspath(os.path.join(self.build_temp, "rrd_cuda"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
        version = next((v for v in version.splitlines() if "release" in v), version or "unknown")
        digest = gate.source_hash()
        newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
        build_info = f"source {digest}; archs sm_{' sm_'.join(archs)} + compute_{newest} PTX; {version}"

        nvcc_flags = [*gate.NVCC_FLAGS, f"--threads={len(archs) + 1}"] + gencode
        cxx = os.environ.get("CXX", "c++")
        cxx_flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-I" + CSRC,
                     "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"],
                     '-DRRD_BUILD_INFO="' + build_info.replace('"', "'") + '"']
        # No device-link step (there is no relocatable device code): it would add an empty default-arch cubin.
        link_flags = ["-shared", "-cudart", "static", "--no-device-link"]

        cu_objs = [os.path.join(build_dir, os.path.basename(s) + ".o") for s in CU_SOURCES]
        cxx_objs = [os.path.join(build_dir, os.path.basename(s) + ".o") for s in CXX_SOURCES]
        jobs = []  # (output, command, log) in dependency order: compiles first, link last
        for src, obj in zip(CU_SOURCES, cu_objs):
            jobs.append((obj, [nvcc, *nvcc_flags, "-c", os.path.join(ROOT, src), "-o", obj], obj + ".log"))
        for src, obj in zip(CXX_SOURCES, cxx_objs):
            jobs.append((obj, [cxx, *cxx_flags, "-c", os.path.join(ROOT, src), "-o", obj], obj + ".log"))
        link = (os.path.abspath(out_path), [nvcc, *link_flags, *cu_objs, *cxx_objs, "-o", os.path.abspath(out_path)],
                os.path.join(build_dir, "link.log"))

        self.announce(f"rrd_kernels: building the CUDA extension with {nvcc} for sm_{', sm_'.join(archs)}", level=3)
        ninja = find_ninja()
        if ninja:
            self._run_ninja(ninja, build_dir, jobs, link)
        else:
            self._run_plain(jobs, link)

        log = "".join(open(obj + ".log", encoding="utf-8", errors="replace").read() for obj in cu_objs)
        header = [
            "ptxas resource usage of rrd_kernels._rrd_cuda, regenerated by every build of the extension (setup.py)",
            f"source hash {digest} (csrc: {', '.join(gate.HASHED)})",
            f"nvcc: {version}",
            f"targets: sm_{', sm_'.join(archs)} SASS + compute_{newest} PTX",
            "columns: registers per thread, stack frame bytes, spill store / load bytes, static shared memory bytes",
        ]
        report = ptxas_report(log, header)
        with open(os.path.join(build_dir, "ptxas-report.txt"), "w") as f:
            f.write(report)
        spills = [r for r in gate.parse_ptxas(log) if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
        if spills:
            self.warn(f"rrd_kernels: ptxas reports local-memory spills: {spills}")

    @staticmethod
    def _run_ninja(ninja, build_dir, jobs, link):
        def q(args):  # shell-quoted, with ninja's own '$' escaped
            return " ".join(shlex.quote(a) for a in args).replace("$", "$$")

        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd > $log 2>&1 || (cat $log; exit 1)",
                 "  description = $desc", ""]
        for out, cmd, log in jobs + [link]:
            deps = " ".join(o for o, _, _ in jobs) if (out, cmd, log) == link else ""
            srcs = [c for c in cmd if c.endswith((".cu", ".cpp"))]
            lines.append(f"build {out.replace(':', '$:').replace(' ', '$ ')}: run {' '.join(srcs)} {deps}".rstrip())
            lines.append(f"  cmd = {q(cmd)}")
            lines.append(f"  log = {shlex.quote(log)}")
            lines.append(f"  desc = {os.path.basename(out)}")
            lines.append("")
        path = os.path.join(build_dir, "build.ninja")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        # Always rebuild: header changes are not tracked as ninja dependencies, and a build is ~1 minute.
        subprocess.run([ninja, "-C", build_dir, "-t", "clean"], check=False, capture_output=True)
        subprocess.run([ninja, "-C", build_dir, "-j", str(max(2, os.cpu_count() or 2))], check=True)

    @staticmethod
    def _run_plain(jobs, link):
        procs = []
        for out, cmd, log in jobs:  # the compilations in parallel
            procs.append((cmd, log, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)))
        for cmd, log, p in procs:
            if p.wait() != 0:
                sys.stderr.write(open(log).read())
                raise subprocess.CalledProcessError(p.returncode, cmd)
        out, cmd, log = link
        with open(log, "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


# What `pip install .` brings. numpy: torch warns on every import without it, and Triton's CPU interpreter
# needs it. triton is not listed: every Linux CUDA build of torch already requires the exact triton it was
# built with, and a second requirement here could only conflict with that pin; a CPU-only install has no use
# for it outside the tests (the [test] extra brings it, and backend_status() says when it is missing).
INSTALL_REQUIRES = ["torch>=2.4", "numpy"]
TRAIN = ["tqdm", "scikit-learn", "matplotlib"]  # python/train.py: progress bars, the digits data, the plot
BENCH = ["tqdm", "matplotlib"]  # python -m bench: progress bar, plots
EXTRAS = {
    "triton": ["triton>=3.2"],
    "train": TRAIN,
    "bench": BENCH,
    # The tests run the Triton kernels in triton's CPU interpreter, which fails with numpy >= 2.3 in
    # triton 3.6 (the version the GPU machines run); the pin applies to the test environment only.
    # pytest-xdist: the README's test command spreads the suite over the machine's cores (-n auto).
    "test": ["pytest>=7", "pytest-xdist>=3", "triton>=3.2; platform_system == 'Linux'", "numpy<2.3",
             *sorted(set(TRAIN + BENCH))],
}


def skip_reason() -> str | None:
    if os.environ.get("RRD_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RRD_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (a build requirement; with --no-build-isolation it must be in the environment)"
    return None


_noticed = []


def notice_skip() -> None:
    """Says once per process (setup.py is evaluated several times per pip install) that the extension is
    skipped and why."""
    reason = skip_reason()
    if reason and not _noticed:
        _noticed.append(reason)
        print(f"rrd_kernels: {reason}: installing without the CUDA extension (backend='cuda' will be "
              "unavailable; the torch and triton backends are unaffected)", file=sys.stderr)


class BuildPyWithNotice(build_py):
    def run(self):
        notice_skip()
        super().run()


def extensions():
    return [] if skip_reason() else [CUDAExtension(EXT_NAME, sources=CU_SOURCES + CXX_SOURCES)]


setup(
    name="rrd_kernels",
    version="0.1.0",
    description="Fused GPU kernels for Relational Representation Distillation (RRD) losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rrd_kernels", "rrd_kernels.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=extensions(),
    cmdclass={"build_ext": NvccBuildExt, "build_py": BuildPyWithNotice},
)

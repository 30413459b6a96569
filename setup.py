"""Build rrd_kernels from source. Pure-Python package; the CUDA extension (csrc/) is built when nvcc is found.

The extension rrd_kernels._rrd_cuda is built by driving nvcc directly (no torch.utils.cpp_extension, no torch
headers), so the build needs only nvcc, a host C++ compiler and pybind11, and works without a GPU:
  * nvcc is CUDA_HOME/bin/nvcc (or CUDA_PATH) when set, else nvcc on PATH;
  * RRD_CUDA_ARCHS (default "80;90") lists the SASS targets; PTX is embedded for the newest one;
  * RRD_SKIP_CUDA_BUILD=1 skips the extension (the package then installs without it);
  * the CUDA runtime is linked statically (-cudart static), so the module depends only on the driver;
  * ninja runs the two compilations in parallel when available (the `ninja` build requirement);
  * the ptxas resource report (registers, spills per kernel per arch; csrc/ptxas_report.py) is written to
    <build_temp>/ptxas-report.txt and to csrc/ptxas-report.txt for the default archs, in a fixed order and
    only when its content changes, so an install never leaves the checkout modified.
"""
from __future__ import annotations

import hashlib
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
# Every file whose content changes the compiled module (hashed into BUILD_INFO and the ptxas report).
HASHED = ["rrd_api.h", "rrd_common.cuh", "rrd_kernels.cuh", "rrd_host.inl", "rrd_cuda.cu", "binding.cpp"]


def source_hash() -> str:
    """sha256 (first 16 hex digits) of the sources the extension is built from; tests compare it."""
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


def load_ptxas_report():
    """csrc/ptxas_report.py (parse, format, write-if-changed), loaded by path: csrc is not a package, and a
    PEP 517 build does not put this folder on sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rrd_ptxas_report", os.path.join(CSRC, "ptxas_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CUDAExtension(Extension):
    """Marker: built by NvccBuildExt with nvcc, not by setuptools' compiler."""


class NvccBuildExt(build_ext):
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
        digest = source_hash()
        newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
        build_info = f"source {digest}; archs sm_{' sm_'.join(archs)} + compute_{newest} PTX; {version}"

        nvcc_flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", f"--threads={len(archs) + 1}",
                      "-I" + CSRC] + gencode
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
            "ptxas resource usage of rrd_kernels._rrd_cuda, from a build of the extension (setup.py); rewritten",
            "only when its content changes, kernels sorted by (arch, mangled name) so a rebuild leaves it as it was",
            f"source hash {digest} (csrc: {', '.join(HASHED)})",
            f"nvcc: {version}",
            f"targets: sm_{', sm_'.join(archs)} SASS + compute_{newest} PTX",
            "columns: registers per thread, stack frame bytes, spill store / load bytes, static shared memory bytes",
        ]
        ptxas = load_ptxas_report()
        report = ptxas.format_report(log, header)
        ptxas.write_if_changed(os.path.join(build_dir, "ptxas-report.txt"), report)
        if archs == ["80", "90"]:  # the committed copy describes the default build only
            try:
                ptxas.write_if_changed(os.path.join(CSRC, "ptxas-report.txt"), report)
            except OSError:
                pass  # read-only source tree: the copy in the build directory remains
        spills = [r for r in ptxas.parse_ptxas(log) if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
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
    "test": ["pytest>=7", "triton>=3.2; platform_system == 'Linux'", "numpy<2.3",
             *sorted(set(TRAIN + BENCH))],
}


def skip_reason() -> str | None:
    if os.environ.get("RRD_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RRD_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


class BuildPyWithNotice(build_py):
    """Says once per build (build_py runs once, unlike the setup.py evaluations) when the extension is skipped."""

    def run(self):
        reason = skip_reason()
        if reason:
            print(f"rrd_kernels: {reason}: installing without the CUDA extension (backend='cuda' will be "
                  "unavailable; the torch and triton backends are unaffected)", file=sys.stderr)
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

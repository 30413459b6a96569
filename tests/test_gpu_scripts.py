"""The GPU-only scripts, checked without a GPU so they cannot rot between GPU runs: bench/gpu_run.sh parses
and every Python entry it calls exists and accepts its arguments; csrc/gpu_selfcheck.py and
bench/gpu_small_case.py import, call the backend contract with its current signature, and stop cleanly
without a device."""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_run.sh")


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_commands() -> list[list[str]]:
    """The script's command lines (continuations joined), split into words, variables left as written."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()
            and not line.lstrip().startswith("#") and "$PY" in line and "<<" not in line]


def python_calls() -> list[list[str]]:
    """Arguments after `$PY` in every command line of the script that runs Python."""
    calls = []
    for words in script_commands():
        for i, w in enumerate(words):
            if w == "$PY":
                calls.append(words[i + 1:])
    return calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_run_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_run_python_entries_exist():
    calls = python_calls()
    modules = {c[1] for c in calls if c[:1] == ["-m"]}
    files = {c[0] for c in calls if c and c[0].endswith(".py")}
    assert {"pip", "pytest", "bench", "bench.summary"} <= modules, modules
    assert {"csrc/gpu_selfcheck.py", "bench/gpu_small_case.py", "setup.py"} <= files, files
    for name in modules:
        assert importlib.util.find_spec(name) is not None, f"gpu_run.sh calls python -m {name}: not importable"
    for path in files:
        assert os.path.isfile(os.path.join(ROOT, path)), f"gpu_run.sh calls {path}: missing"


def test_gpu_run_bench_arguments_parse():
    """Each `python -m bench ...` of the script is accepted by the suite's own argument parser."""
    from bench.cli import parser

    runs = [c[2:] for c in python_calls() if c[:2] == ["-m", "bench"]]
    assert len(runs) == 2, runs
    shapes = set()
    for args in runs:
        args = [a for a in args if not a.startswith("${BENCH_ARGS")]
        args = [a.replace('"$WORK', "/tmp/x").replace("$WORK", "/tmp/x").strip('"') for a in args]
        opts = parser().parse_args(args)
        shapes.add((tuple(opts.B), tuple(opts.K), tuple(opts.D), tuple(opts.dtypes)))
        assert opts.no_progress
    assert shapes == {((64,), (16384,), (128,), ("float32",)), ((4096,), (262144,), (128,), ("bfloat16",))}


def test_gpu_quick_selection_covers_both_backends_and_dtypes():
    """`-m gpu_quick` (registered in pyproject.toml) selects tests of both backends in fp32, bf16 and fp16."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu_quick",
                          "-p", "no:cacheprovider", "tests/test_gpu.py"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert "PytestUnknownMarkWarning" not in out.stdout + out.stderr
    for backend in ("triton", "cuda"):
        for dtype in ("fp32", "bf16", "fp16"):
            assert f"tests/test_gpu.py::test_quick_matches_float64[{backend}-{dtype}]" in ids, (backend, dtype, ids)
    assert len(ids) <= 12, ids  # quick: few Triton compilations


def test_gpu_selfcheck_imports_and_uses_the_backend_contract(monkeypatch):
    selfcheck = load("csrc/gpu_selfcheck.py", "gpu_selfcheck")
    from rrd_kernels import backends

    S = torch.randn(4, 8)
    Q = F.normalize(torch.randn(16, 8), dim=1)
    # on CPU tensors the cuda backend cannot run (triton can, under the interpreter the tests switch on)
    names = selfcheck.timing_backends(S, Q)
    assert "cuda" not in names and names[-1] == "torch"
    calls = []

    def fake(*args):
        inspect.signature(backends.unusable_reason).bind(*args)  # the contract's signature, or TypeError
        calls.append(args)
        return None

    monkeypatch.setattr(selfcheck, "unusable_reason", fake)
    assert selfcheck.timing_backends(S, Q) == ["cuda", "triton", "torch"]
    assert [c[0] for c in calls] == ["cuda", "triton"]
    assert calls[0][1:] == (S.device, S.dtype, Q.dtype, 4, 16, 8)
    # the error budgets: positive, looser for coarser types and sharper temperatures
    f32 = selfcheck.tolerances(torch.float32, torch.float32, "highest", 0.1, 0.02)
    tf32 = selfcheck.tolerances(torch.float32, torch.float32, "high", 0.1, 0.02)
    bf16 = selfcheck.tolerances(torch.bfloat16, torch.bfloat16, "highest", 0.1, 0.02)
    mixed = selfcheck.tolerances(torch.float16, torch.bfloat16, "highest", 0.1, 0.02)
    assert 0 < f32[0] < tf32[0] < bf16[0] and 0 < f32[1] < tf32[1] < bf16[1]
    assert mixed[0] == bf16[0]  # a bf16 bank rounds like bf16 embeddings
    assert selfcheck.tolerances(torch.float32, torch.float32, "highest", 0.1, 0.1)[0] < f32[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device exit")
@pytest.mark.parametrize("path", ["csrc/gpu_selfcheck.py", "bench/gpu_small_case.py"])
def test_gpu_scripts_exit_cleanly_without_a_device(path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "no CUDA device" in out.stdout, out.stdout + out.stderr


def test_gpu_small_case_asks_the_contract(monkeypatch):
    """gpu_small_case.run stops with the backend's reason when it cannot run (here: on a CPU-only machine,
    or by a stand-in)."""
    import rrd_kernels.backends as backends

    small = load("bench/gpu_small_case.py", "gpu_small_case")
    seen = []

    def refuse(*args):
        inspect.signature(backends.unusable_reason).bind(*args)
        seen.append(args)
        return "stand-in refusal"

    monkeypatch.setattr(backends, "unusable_reason", refuse)
    assert small.run("cuda") is False
    assert seen and seen[0][0] == "cuda" and seen[0][1] == torch.device("cuda")
    assert re.search(r"\d", str(seen[0][4:]))  # B, K, D passed as numbers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is the CPU stand-in for the GPU one")
def test_gpu_small_case_runs_under_the_triton_interpreter():
    """The sanitizer's small case end to end (padded student rows, fp32 and bf16 with an fp32 bank, CE and
    KL) through the Triton interpreter on the CPU (~15 s), so the script is known to run before a GPU sees it."""
    from conftest import have_triton

    if not have_triton():
        pytest.skip("triton not installed")
    small = load("bench/gpu_small_case.py", "gpu_small_case")
    assert small.run("triton", device="cpu") is True

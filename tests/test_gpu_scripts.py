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


# ------------------------------------------------------------------ the cost model's predictions (bench/predict.py)
def _predict_call() -> list[str]:
    calls = [c for c in python_calls() if c[:2] == ["-m", "bench.predict"]]
    assert len(calls) == 1, calls
    return calls[0]


def test_gpu_run_predicts_every_benchmarked_triton_row():
    """The predict stage covers the (B, K, D, dtype) of both bench runs, runs in the background (CPU only)
    and is waited for before the last summary, which prints the predictions beside the measured rows."""
    from bench import predict
    from bench.cli import parser

    call = _predict_call()
    assert call[-1] == "&", call  # in the background, while the GPU stages run
    args = [a.replace("$PRED", "/tmp/x").strip('"') for a in call[2:-1] if not a.startswith("${PREDICT_ARGS")]
    opts = predict.parser().parse_args(args)
    assert opts.jobs >= 1 and opts.matmul_precision == "highest"  # as the bench runs (no --matmul-precision)
    rows = {tuple(r) for r in opts.row}
    bench_rows = set()
    for c in python_calls():
        if c[:2] == ["-m", "bench"]:
            opts = parser().parse_args([a.replace("$WORK", "/tmp/x").strip('"') for a in c[2:]
                                        if not a.startswith("${BENCH_ARGS")])
            if "triton" in (opts.providers or ["triton"]):
                bench_rows |= {(str(b), str(k), str(d), dt) for b in opts.B for k in opts.K for d in opts.D
                               for dt in opts.dtypes}
    assert rows == bench_rows and len(rows) == 2, (rows, bench_rows)
    text = open(SCRIPT).read()
    assert 'wait "$PREDICT_PID"' in text and "--predictions $PRED" in text
    assert text.index("step predict") < text.index("step install")  # started before any GPU stage


def test_predict_maps_the_device_to_the_models_gpu_and_arch():
    from bench.predict import arch_for, gpu_for

    assert gpu_for("NVIDIA H200") == ("H200", "")
    assert gpu_for("NVIDIA H100 80GB HBM3") == ("H100", "")
    assert gpu_for("NVIDIA A100-SXM4-80GB") == ("A100", "")
    gpu, note = gpu_for("NVIDIA H100 PCIe")
    assert gpu == "H100" and "SXM5" in note
    gpu, note = gpu_for("NVIDIA GeForce RTX 4090")
    assert gpu == "H200" and "RTX 4090" in note and "H200 figures" in note
    assert arch_for(90) == ("sm_90", "") and arch_for(80) == ("sm_80", "") and arch_for(100) == ("sm_100", "")
    arch, note = arch_for(89, 101376, 128)  # an L4 / RTX 40xx: compiled for its plan family's arch
    assert arch == "sm_86" and "sm_86" in note
    assert arch_for(75, 65536, 40)[0] is None


def test_predict_writes_each_row_with_a_triton_cache_of_its_own(monkeypatch, tmp_path):
    """bench.predict calls tools.cost_model.analyse_backend per row and backend (triton and cuda) with the
    device's arch and GPU, in a Triton cache that is not the caller's (the bench's first-call compile times
    must stay real); a failing row is an entry with its error and exit status 1."""
    from bench import predict
    from tools import cost_model

    seen = []

    def fake_analyse(backend, **kw):
        seen.append((backend, kw, os.environ["TRITON_CACHE_DIR"]))
        if kw["D"] == 7:
            raise RuntimeError("no")
        return dict(predicted_ms=1.5, calibrated_ms=3.45, bound="issue", bounds_ms={"issue": 1.5}, gpu="H100 SXM5")

    monkeypatch.setattr(cost_model, "analyse_backend", fake_analyse)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "bench-cache"))
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # restored afterwards
    out = tmp_path / "p.json"
    rc = predict.main(["--out", str(out), "--jobs", "1", "--device-name", "NVIDIA H100 80GB HBM3",
                       "--capability", "90", "--row", "64", "16384", "128", "float32",
                       "--row", "4096", "262144", "128", "bfloat16"])
    assert rc == 0
    doc = __import__("json").loads(out.read_text())
    assert (doc["gpu"], doc["arch"], doc["device"]) == ("H100", "sm_90", "NVIDIA H100 80GB HBM3")
    assert [(r["backend"], r["B"], r["K"], r["D"], r["dtype"], r["precision"]) for r in doc["rows"]] == [
        (be, 64, 16384, 128, "float32", "highest") if b == 64 else (be, 4096, 262144, 128, "bfloat16", None)
        for be in ("triton", "cuda") for b in (64, 4096)]
    assert all(r["predicted_ms"] == 1.5 and r["calibrated_ms"] == 3.45 for r in doc["rows"])
    assert [(be, kw["arch"], kw["gpu"], kw["dtype"], kw["B"]) for be, kw, _ in seen] == [
        (be, "sm_90", "H100", dt, b) for be in ("triton", "cuda") for dt, b in (("float32", 64), ("bfloat16", 4096))]
    assert all(cache != str(tmp_path / "bench-cache") for _, _, cache in seen)
    rc = predict.main(["--out", str(out), "--jobs", "1", "--device-name", "NVIDIA H200", "--capability", "90",
                       "--matmul-precision", "high", "--backends", "triton", "--row", "8", "300", "7", "float32"])
    doc = __import__("json").loads(out.read_text())
    assert rc == 1 and len(doc["rows"]) == 1 and doc["rows"][0]["error"] == "RuntimeError: no"
    assert doc["rows"][0]["precision"] == "high" and doc["note"] == ""
    predict.main(["--out", str(out), "--jobs", "1", "--device-name", "NVIDIA B200", "--capability", "100",
                  "--row", "8", "300", "32", "bfloat16"])
    doc = __import__("json").loads(out.read_text())
    assert (doc["gpu"], doc["arch"]) == ("H200", "sm_100") and "H200 figures" in doc["note"]
    assert "sm_80/sm_86/sm_90 SASS" in doc["note"]
    with pytest.raises(SystemExit):
        predict.main(["--out", str(out), "--backends", "triton,mlx", "--row", "8", "300", "32", "bfloat16"])


def _bench_dir(tmp_path, name, rows, precision="highest"):
    import json

    d = tmp_path / name
    d.mkdir()
    base = dict(provider="triton", mode="fwd+bwd", tau_s=0.1, tau_t=0.02, reason=None, pct_of_floor=None,
                speedup_vs_eager=None, loss_rel_err=None, grad_rel_err=None, fp32_matmul_precision=precision)
    doc = {"meta": {"device": "NVIDIA H200", "torch": "2.11", "git_commit": "abc", "fp32_matmul_precision": precision},
           "rows": [base | r for r in rows]}
    (d / "results.json").write_text(json.dumps(doc))
    return d


def test_summary_prints_each_measured_triton_and_cuda_row_beside_its_prediction(tmp_path, capsys):
    import json

    from bench import summary

    paper = _bench_dir(tmp_path, "paper", [
        dict(B=64, K=16384, D=128, dtype="float32", timing="python", status="ok", median_ms=0.50),
        dict(B=64, K=16384, D=128, dtype="float32", timing="graph", status="ok", median_ms=0.20),
        dict(B=64, K=16384, D=128, dtype="float32", timing="python", status="ok", median_ms=9.0, provider="eager"),
        dict(B=64, K=16384, D=128, dtype="float32", timing="python", status="ok", median_ms=0.80, provider="cuda"),
    ])
    big = _bench_dir(tmp_path, "big", [
        dict(B=4096, K=262144, D=128, dtype="bfloat16", timing="python", status="error", median_ms=None,
             reason="boom"),
    ])
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps({"device": "NVIDIA H200", "gpu": "H200", "arch": "sm_90", "note": "", "rows": [
        dict(B=64, K=16384, D=128, dtype="float32", precision="highest", predicted_ms=0.1, calibrated_ms=0.23,
             bound="issue", error=None),  # no backend field: a document from before the CUDA model, triton
        dict(backend="cuda", B=64, K=16384, D=128, dtype="float32", precision="highest", predicted_ms=0.4,
             calibrated_ms=0.92, bound="issue", error=None),
        dict(backend="triton", B=4096, K=262144, D=128, dtype="bfloat16", precision=None, predicted_ms=7.2,
             calibrated_ms=16.56, bound="issue", error=None),
        dict(backend="triton", B=8, K=300, D=32, dtype="float16", precision=None, predicted_ms=None,
             calibrated_ms=None, error="RuntimeError: no"),
    ]}))
    assert summary.main([str(paper), str(big), "--predictions", str(pred)]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("cost model vs measured"):].splitlines()
    assert "sm_90 on H200" in lines[0] and "device NVIDIA H200" in lines[0]

    def row(*head):
        return next(line for line in lines if line.split()[:5] == list(head)).split()

    fp32 = row("triton", "64", "16384", "128", "float32/highest")
    assert fp32[5:12] == ["ok", "0.5000", "0.2000", "0.1000", "0.2300", "5.0", "2.0"] and fp32[12] == "issue"
    cuda = row("cuda", "64", "16384", "128", "float32/highest")
    assert cuda[5:12] == ["ok", "0.8000", "-", "0.4000", "0.9200", "2.0", "-"]
    bf16 = row("triton", "4096", "262144", "128", "bfloat16")
    assert bf16[5:10] == ["error", "-", "-", "7.2000", "16.5600"]  # failed: no time, the prediction still shown
    lost = " ".join(row("triton", "8", "300", "32", "float16"))
    assert "not run" in lost and "RuntimeError: no" in lost
    assert not any(line.split()[:1] == ["eager"] for line in lines)
    # without the file (the stage did not finish) the table says so and the rest of the summary stands
    assert summary.main([str(paper), "--predictions", str(tmp_path / "missing.json")]) == 0
    assert "cost model: cannot read" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in run")
def test_predict_runs_the_real_cost_model(tmp_path):
    """bench.predict end to end as gpu_run.sh calls it, for the small benchmark row on an H200 (~10 s of
    compiles): the real tools.cost_model.analyse with its current signature."""
    from conftest import have_triton

    if not have_triton():
        pytest.skip("triton not installed")
    out = tmp_path / "p.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    backends = ["triton", "cuda"] if shutil.which("nvcc") else ["triton"]  # the CUDA model compiles with nvcc
    run = subprocess.run([sys.executable, "-m", "bench.predict", "--out", str(out), "--jobs", "1",
                          "--device-name", "NVIDIA H200", "--capability", "90", "--backends", ",".join(backends),
                          "--row", "64", "16384", "128", "float32"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = __import__("json").loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == backends
    for row in rows:
        assert row["error"] is None and 0 < row["predicted_ms"] < row["calibrated_ms"] and row["bound"], row

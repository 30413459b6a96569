"""The CUDA backend without a GPU: build, ptxas report, error behaviour, and the kernels run in host emulation.

* The extension: built for sm_80 and sm_90 (+ PTX), from the current sources, with no local-memory spills.
  Skipped where nvcc is absent (or RRD_SKIP_CUDA_BUILD is set, for the installed-module checks).
* Without a GPU or without the extension: `import rrd_kernels` works and backend="cuda" raises a clear
  RuntimeError.
* The kernels: csrc/emulate.cpp compiles the very kernel source with the host C++ compiler, every CUDA
  thread an OS thread and mma.sync computed from the PTX ISA fragment layouts, and the results are compared
  with the float64 reference (needs only a C++20 compiler, no nvcc).
"""
from __future__ import annotations

import ast
import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import quick_subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = 10  # 4 forward + 4 backward instantiations, merge, finish
ARCHS = ("sm_80", "sm_90")


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump():
    nvcc = find_nvcc()
    candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")] if nvcc else []
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the CUDA extension is not built here")
skip_build = os.environ.get("RRD_SKIP_CUDA_BUILD", "0") not in ("", "0")


def source_hash() -> str:
    """The hash setup.py stamps into the module and the report, computed from setup.py's own file list."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    hashed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "HASHED"
    )
    h = hashlib.sha256()
    for name in hashed:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def parse_ptxas(log: str) -> list[dict]:
    records, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            records.append(cur)
        elif cur is not None:
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m:
                cur["registers"] = int(m.group(1))
    return records


def check_no_spills(records: list[dict]) -> None:
    for arch in ARCHS:
        mine = [r for r in records if r["arch"] == arch]
        assert len(mine) == KERNELS, f"{arch}: expected {KERNELS} kernels in the ptxas output, got {len(mine)}"
        for r in mine:
            assert "registers" in r and "spill_stores" in r, r
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, f"spills: {r}"


# ---- import and error behaviour (always run) ------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter importing torch
def test_import_without_extension():
    """With the extension unimportable, rrd_kernels imports, why_unusable says why, backend='cuda' raises."""
    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "rrd_kernels._rrd_cuda":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, rrd_kernels
        from rrd_kernels import cuda_backend
        S = torch.randn(3, 8); Q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
        reason = cuda_backend.why_unusable(S.device, S.dtype, Q.dtype, 3, 5, 8)
        assert reason and "not built" in reason, reason
        assert "cuda" not in rrd_kernels.available_backends()
        assert "not built" in rrd_kernels.backend_status()["cuda"]
        try:
            rrd_kernels.rrd_loss(S, S, Q, tau_s=0.1, tau_t=0.1, backend="cuda")
        except RuntimeError as e:
            assert "not built" in str(e), e
            print("OK", e)
        else:
            raise SystemExit("no error")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_cuda_backend_on_cpu_tensors_raises_clear_error():
    import rrd_kernels
    from rrd_kernels import cuda_backend

    S = torch.randn(4, 8)
    Q = F.normalize(torch.randn(16, 8), dim=1)
    reason = cuda_backend.why_unusable(S.device, S.dtype, Q.dtype, 4, 16, 8)
    assert isinstance(reason, str) and reason
    with pytest.raises(RuntimeError, match="cuda"):
        rrd_kernels.rrd_loss(S, S, Q, tau_s=0.1, tau_t=0.1, backend="cuda")
    # "auto" on CPU tensors quietly uses the reference
    assert torch.isfinite(rrd_kernels.rrd_loss(S, S, Q, tau_s=0.1, tau_t=0.1, backend="auto"))


# ---- the built extension (needs nvcc) ------------------------------------------------------------------


@needs_nvcc
@pytest.mark.skipif(skip_build, reason="RRD_SKIP_CUDA_BUILD is set")
def test_extension_built_for_sm80_sm90_from_current_sources():
    ext = pytest.importorskip("rrd_kernels._rrd_cuda", reason="extension not built (pip install -e . with nvcc)")
    assert ext.BUILD_INFO.startswith(f"source {source_hash()};"), (
        f"the built module ({ext.BUILD_INFO}) is stale: csrc changed since; rebuild (pip install -e .)"
    )
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA bin or the triton wheel)")
    elf = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", ext.__file__], capture_output=True, text=True, check=True).stdout
    for arch in ARCHS:
        assert f".{arch}.cubin" in elf, elf
    assert re.search(r"\.sm_\d+\.ptx", ptx), ptx  # PTX for the newest arch, for newer GPUs


@needs_nvcc
def test_committed_ptxas_report_is_current_and_has_no_spills():
    report = open(os.path.join(CSRC, "ptxas-report.txt")).read()
    assert f"source hash {source_hash()}" in report, "csrc/ptxas-report.txt is stale: rebuild and commit it"
    check_no_spills(parse_ptxas(report))


@needs_nvcc
@pytest.mark.slow  # a full nvcc compile of both archs
def test_fresh_compile_sm80_sm90_has_no_spills_and_reproduces_the_committed_report(tmp_path):
    """Compile the kernels now (both archs, ~30 s on 2 cores), read ptxas' own report, and check that the
    report setup.py would write from it is the committed file byte for byte (so a build leaves the checkout
    clean) when this is the nvcc the committed report was made with."""
    cmd = [find_nvcc(), "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "--threads=2", "-I" + CSRC,
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-c", os.path.join(CSRC, "rrd_cuda.cu"), "-o", str(tmp_path / "rrd_cuda.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    check_no_spills(parse_ptxas(log))
    committed = open(os.path.join(CSRC, "ptxas-report.txt")).read()
    version = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True).stdout
    version = next((v for v in version.splitlines() if "release" in v), "")
    if f"nvcc: {version}" not in committed or f"source hash {source_hash()}" not in committed:
        pytest.skip("the committed report was made with another nvcc or older sources")
    assert load_report_module().format_report(log, report_header(committed)) == committed


# ---- the committed report is a function of its content (csrc/ptxas_report.py, used by setup.py) ---------


def load_report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rrd_ptxas_report", os.path.join(CSRC, "ptxas_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report_header(report: str) -> list[str]:
    """The header lines of a report, as passed to format_report (up to the first bare '#')."""
    lines = report.splitlines()
    return [line[2:] for line in lines[: lines.index("#")]]


def test_committed_report_is_the_same_whatever_order_ptxas_prints_in():
    """nvcc runs one ptxas per arch in parallel, so the blocks reach the log in any order (the committed file
    used to flip its sm_80 and sm_90 halves on every install). Rebuild the log from the committed raw lines
    with the archs in both orders, the kernels reversed and per-arch noise lines between them: the report
    must come out as the committed file, byte for byte."""
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found: kernel names would stay mangled")
    report_mod = load_report_module()
    committed = open(os.path.join(CSRC, "ptxas-report.txt")).read()
    raw = committed.split("\n# raw ptxas output, per kernel in the order above:\n", 1)[1].splitlines()
    blocks, arch_of = [], []
    for line in raw:
        m = re.search(r"Compiling entry function '[^']+' for '(sm_\w+)'", line)
        if m:
            blocks.append([])
            arch_of.append(m.group(1))
        blocks[-1].append(line)
    assert sorted(set(arch_of)) == list(ARCHS) and len(blocks) == KERNELS * len(ARCHS)
    header = report_header(committed)
    for arch_order in (ARCHS, ARCHS[::-1]):
        log = []
        for arch in arch_order:
            log.append("ptxas info    : 0 bytes gmem")
            for block, a in reversed(list(zip(blocks, arch_of))):
                if a == arch:
                    log.extend(block)
        assert report_mod.format_report("\n".join(log), header) == committed, arch_order


def test_report_is_written_only_when_its_content_changes(tmp_path):
    write_if_changed = load_report_module().write_if_changed
    path = tmp_path / "ptxas-report.txt"
    assert write_if_changed(str(path), "a\n") and path.read_text() == "a\n"
    os.utime(path, ns=(1, 1))  # a marker mtime: a rewrite would change it
    assert not write_if_changed(str(path), "a\n")
    assert path.stat().st_mtime_ns == 1
    assert write_if_changed(str(path), "b\n") and path.read_text() == "b\n"


@needs_nvcc
@pytest.mark.skipif(skip_build, reason="RRD_SKIP_CUDA_BUILD is set")
def test_binding_errors_are_exceptions():
    ext = pytest.importorskip("rrd_kernels._rrd_cuda", reason="extension not built")
    base = dict(student=0, teacher=0, bank=0, ld_s=8, ld_t=8, ld_q=8, B=2, K=3, D=8, emb_dtype=0, bank_dtype=0,
                mode=0, tau_s=0.1, tau_t=0.1, kl=False, num_splits=1, chunk=64, part=0, rows=0, lse_s=0, lse_t=0,
                ref=0, device=0, stream=0)
    with pytest.raises(ValueError, match="null input pointer"):
        ext.forward(**base)
    with pytest.raises(ValueError, match="D must be"):
        ext.forward(**{**base, "student": 8, "teacher": 8, "bank": 8, "D": 513, "ld_s": 513, "ld_q": 513})
    with pytest.raises(ValueError, match="mode"):
        ext.forward(**{**base, "student": 8, "teacher": 8, "bank": 8, "emb_dtype": 2})
    plan = ext.forward_plan(64, 16384, 128, 132)
    assert plan["num_splits"] * plan["chunk"] >= 16384 and plan["chunk"] % 64 == 0
    count, err = ext.runtime_status()
    if err:  # no usable GPU here: a well-formed call reaches the CUDA runtime and comes back as RuntimeError
        good = {**base, "student": 8, "teacher": 8, "bank": 8, "part": 8, "rows": 8, "lse_s": 8, "lse_t": 8,
                "ref": 8}
        with pytest.raises(RuntimeError, match="cuda"):
            ext.forward(**good)


# ---- the kernels in host emulation (needs a C++20 compiler) ------------------------------------------


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host emulation")
    so = str(tmp_path_factory.mktemp("emu") / "rrd_emu.so")
    cmd = [cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC", "-Wall",
           "-Wno-unknown-pragmas", "-o", so, os.path.join(CSRC, "emulate.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "_Float16" in out.stderr:
        pytest.skip("host compiler lacks _Float16")
    assert out.returncode == 0, out.stderr[-4000:]
    lib = ctypes.CDLL(so)
    lib.rrd_emu_forward.restype = ctypes.c_char_p
    lib.rrd_emu_backward.restype = ctypes.c_char_p
    ptr, i, ll, dbl = ctypes.c_size_t, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
    lib.rrd_emu_forward_raw.argtypes = [ptr, ptr, ptr, ll, ll, ll, i, i, i, i, i, i, dbl, dbl, i, i, i,
                                        ptr, ptr, ptr, ptr, ptr]
    lib.rrd_emu_forward_raw.restype = ctypes.c_char_p
    lib.rrd_emu_backward_raw.argtypes = [ptr, ptr, ptr, ll, ll, ll, i, i, i, i, i, i, dbl, dbl, i, i,
                                         ptr, ptr, ptr, ptr, ll, ptr, ptr]
    lib.rrd_emu_backward_raw.restype = ctypes.c_char_p
    return lib


CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_OF = {torch.bfloat16: 3, torch.float16: 2}
# Unit roundoff of the dot products per mode (fp32 FMA, tf32, fp16, bf16); errors of the logits scale with 1/tau.
UNIT = {0: 2.0**-24, 1: 2.0**-11, 2: 2.0**-11, 3: 2.0**-8}


def emu_run(lib, S, T, Q, mode, tau_s, tau_t, kl, num_sms, grad_rows, ld_pad=0):
    """Forward and backward through the emulated kernels; S/T/Q may be row-padded views (ld = D + ld_pad).
    Returns (rows, lse_s, lse_t, grad, ref): LSEs in base 2 (as the kernels keep them), ref the argmax."""
    B, D = S.shape
    K = Q.shape[0]
    c = ctypes.c_void_p
    L = ctypes.c_longlong
    rows, lse_s, lse_t = torch.empty(B), torch.empty(B), torch.empty(B)
    ref = torch.full((B,), -7, dtype=torch.int32)
    err = lib.rrd_emu_forward(c(S.data_ptr()), c(T.data_ptr()), c(Q.data_ptr()), L(S.stride(0)), L(T.stride(0)),
                              L(Q.stride(0)), B, K, D, CODES[S.dtype], CODES[Q.dtype], mode,
                              ctypes.c_double(tau_s), ctypes.c_double(tau_t), int(kl), num_sms,
                              c(rows.data_ptr()), c(lse_s.data_ptr()), c(lse_t.data_ptr()), c(ref.data_ptr()))
    assert err is None, err
    grad = torch.empty(B, D, dtype=S.dtype)
    err = lib.rrd_emu_backward(c(S.data_ptr()), c(T.data_ptr()), c(Q.data_ptr()), L(S.stride(0)), L(T.stride(0)),
                               L(Q.stride(0)), B, K, D, CODES[S.dtype], CODES[Q.dtype], mode,
                               ctypes.c_double(tau_s), ctypes.c_double(tau_t), num_sms, c(lse_s.data_ptr()),
                               c(lse_t.data_ptr()), c(ref.data_ptr()), c(grad_rows.data_ptr()),
                               L(grad_rows.stride(0)), c(grad.data_ptr()))
    assert err is None, err
    return rows, lse_s, lse_t, grad, ref


def padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x as a view with row stride D + pad (garbage in the padding), to exercise ld > D."""
    if pad == 0:
        return x.contiguous()
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


CASES = [
    # B, K, D, emb dtype, bank dtype, mode, tau_s, tau_t, kl, num_sms, ld pad
    (1, 1, 1, torch.float32, torch.float32, 0, 0.1, 0.02, False, 1, 0),
    (5, 7, 3, torch.float32, torch.float32, 0, 0.04, 0.1, True, 1, 0),
    (70, 130, 40, torch.float32, torch.float32, 0, 0.1, 0.02, False, 4, 3),
    (17, 300, 72, torch.float32, torch.bfloat16, 0, 0.04, 0.1, True, 64, 0),
    (70, 130, 40, torch.float32, torch.float32, 1, 0.1, 0.02, False, 4, 0),
    (9, 65, 33, torch.float32, torch.float16, 1, 0.04, 0.1, True, 2, 1),
    (70, 130, 40, torch.bfloat16, torch.bfloat16, 3, 0.1, 0.02, False, 4, 0),
    (3, 200, 100, torch.bfloat16, torch.float32, 3, 0.04, 0.1, True, 100, 2),
    (66, 64, 16, torch.float16, torch.float16, 2, 0.1, 0.02, True, 1, 0),
    (20, 129, 48, torch.float16, torch.bfloat16, 2, 0.04, 0.1, False, 8, 0),
    (2, 70, 512, torch.bfloat16, torch.bfloat16, 3, 0.1, 0.02, False, 1, 0),
    (3, 40, 300, torch.float32, torch.float32, 0, 0.04, 0.1, False, 1, 0),
]


# The quick subset leaves out the four largest cases; every mode, mixed bank dtypes, padded rows and
# many splits stay in it.
CASES_SLOW = [CASES[2], CASES[4], CASES[6], CASES[10]]


@pytest.mark.parametrize("case", quick_subset(
    CASES, [c for c in CASES if c not in CASES_SLOW], unpack=False,
    ids=lambda c: f"B{c[0]}-K{c[1]}-D{c[2]}-{str(c[3])[6:]}-{str(c[4])[6:]}-m{c[5]}"))
def test_emulated_kernels_match_float64_reference(emu, case):
    from rrd_kernels.reference import rrd_reference

    B, K, D, dt, bank_dt, mode, tau_s, tau_t, kl, num_sms, pad = case
    gen = torch.Generator().manual_seed(B * 1000 + K * 7 + D)
    # raw embeddings with row norms over 1e-2 .. 1e2 (the kernels normalise); for fp32, one zero student row
    S = torch.randn(B, D, generator=gen) * 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    T = torch.randn(B, D, generator=gen) * 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    if B > 2 and dt == torch.float32:
        S[1] = 0
    Q = F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    S, T, Q = padded(S.to(dt), pad), padded(T.to(dt), pad), padded(Q.to(bank_dt), pad)
    # upstream weights: an expanded (stride 0) view for one case, else distinct per row
    w = torch.full((1,), 0.5).expand(B) if B == 17 else torch.linspace(0.5, 1.5, B)

    rows, lse_s, lse_t, grad, argmax = emu_run(emu, S, T, Q, mode, tau_s, tau_t, kl, num_sms, w, pad)
    lse_s, lse_t = lse_s.double() * math.log(2), lse_t.double() * math.log(2)  # base 2 -> natural

    S64 = S.double().requires_grad_()
    T64, Q64 = T.double(), Q.double()
    ref = rrd_reference(S64, T64, Q64, tau_s, tau_t, "kl" if kl else "ce", "none")
    (ref * w.double()).sum().backward()
    ref_lse_s = torch.logsumexp(F.normalize(S64, dim=1, eps=1e-12) @ Q64.T / tau_s, 1)
    ref_lse_t = torch.logsumexp(F.normalize(T64, dim=1, eps=1e-12) @ Q64.T / tau_t, 1)

    # error budget: logit error ~ u / tau (u: unit roundoff of the products, incl. a bank cast to the
    # embedding dtype), with room for the sums; gradients relative to their largest entry.
    u = UNIT[mode] if CODES[bank_dt] == 0 or bank_dt == dt else max(UNIT[mode], UNIT[3 if bank_dt == torch.bfloat16 else 2])
    tol = 8 * u / min(tau_s, tau_t) + 2e-5
    assert torch.isfinite(rows).all() and torch.isfinite(grad.float()).all()
    assert (rows.double() - ref.detach()).abs().max().item() <= tol
    assert (lse_s.double() - ref_lse_s.detach()).abs().max().item() <= tol
    assert (lse_t.double() - ref_lse_t.detach()).abs().max().item() <= tol
    # ref: a bank row where the student's logit reaches its maximum, to within the logits' rounding
    logits_s = F.normalize(S64.detach(), dim=1, eps=1e-12) @ Q64.T / tau_s
    assert ((argmax >= 0) & (argmax < K)).all(), argmax
    at_ref = logits_s.gather(1, argmax.long()[:, None])[:, 0]
    assert (logits_s.amax(1) - at_ref).max().item() <= tol
    # Gradients row by row, relative to the row's natural scale w_r / (tau_s max(||S_r||, eps)) (|q - p| <= 1,
    # unit bank rows): exact zeros (K = 1) and the huge gradient of a zero row (1 / eps, as F.normalize) alike.
    g_ref = S64.grad
    natural = w.double() / (tau_s * S64.detach().norm(dim=1).clamp_min(1e-12))
    row_err = (grad.double() - g_ref).abs().amax(dim=1) / natural
    g_tol = 8 * u / tau_s + (2.0**-8 if dt == torch.bfloat16 else 2.0**-11 if dt == torch.float16 else 0) + 2e-5
    assert row_err.max().item() <= g_tol, row_err


STAGING_CASES = [(torch.float32, torch.float32, 0), (torch.float32, torch.bfloat16, 1), (torch.bfloat16, torch.float32, 3),
                 (torch.float16, torch.float16, 2)]


@pytest.mark.parametrize("dtype,bank_dtype,mode", quick_subset(
    STAGING_CASES, [STAGING_CASES[3]], ids=lambda c: f"{str(c[0])[6:]}-{str(c[1])[6:]}-m{c[2]}"))
def test_emulated_vector_and_scalar_staging_agree_bitwise(emu, dtype, bank_dtype, mode):
    """Contiguous inputs with D % 4 == 0 take the 4-element vector loads, row-padded ones (ld % 4 != 0) the
    element-wise path; the arithmetic is the same, so every output must be identical."""
    gen = torch.Generator().manual_seed(11)
    B, K, D = 21, 100, 44
    S = torch.randn(B, D, generator=gen).to(dtype)
    T = torch.randn(B, D, generator=gen).to(dtype)
    Q = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(bank_dtype)
    w = torch.linspace(0.5, 1.5, B)
    vec = [emu.rrd_emu_vector_loads(ctypes.c_void_p(x.data_ptr()), ctypes.c_longlong(x.stride(0)), D, CODES[x.dtype])
           for x in (S, T, Q)]
    assert vec == [1, 1, 1]
    Sp, Tp, Qp = padded(S, 1), padded(T, 1), padded(Q, 1)
    assert emu.rrd_emu_vector_loads(ctypes.c_void_p(Sp.data_ptr()), ctypes.c_longlong(Sp.stride(0)), D, CODES[dtype]) == 0
    out_vec = emu_run(emu, S, T, Q, mode, 0.04, 0.1, True, 2, w)
    out_scalar = emu_run(emu, Sp, Tp, Qp, mode, 0.04, 0.1, True, 2, w)
    for a, b in zip(out_vec, out_scalar):
        assert torch.equal(a, b)


# ---- the Python glue (cuda_backend.py -> op -> autograd -> torch.compile) over the emulated kernels -----


class EmulatedExtension:
    """Stands in for rrd_kernels._rrd_cuda with the same keyword interface; the kernels run in host
    emulation on CPU memory. Everything between rrd_loss and the binding is the real code."""

    BUILD_INFO = "host emulation"

    def __init__(self, lib):
        self.lib = lib  # raw entry points' signatures: set by the emu fixture
        self.calls = []

    def runtime_status(self):
        return 1, ""

    def _plan(self, backward, B, K, D, num_sms):
        out = (ctypes.c_int * 3)()
        ws = ctypes.c_longlong()
        self.lib.rrd_emu_plan(int(backward), B, K, D, num_sms, out, ctypes.byref(ws))
        return {"num_splits": out[0], "chunk": out[1], "num_dslices": out[2], "workspace_floats": ws.value}

    def forward_plan(self, B, K, D, num_sms):
        return self._plan(False, B, K, D, num_sms)

    def backward_plan(self, B, K, D, num_sms):
        return self._plan(True, B, K, D, num_sms)

    def forward(self, *, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                tau_t, kl, num_splits, chunk, part, rows, lse_s, lse_t, ref, device, stream):
        self.calls.append(("forward", mode, ld_s, ld_t, ld_q))
        err = self.lib.rrd_emu_forward_raw(student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype,
                                           mode, tau_s, tau_t, int(kl), num_splits, chunk, part, rows, lse_s, lse_t,
                                           ref)
        if err:
            raise RuntimeError(err.decode())

    def backward(self, *, student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype, bank_dtype, mode, tau_s,
                 tau_t, num_splits, chunk, lse_s, lse_t, ref, grad_rows, grad_stride, gpart, grad_student, device,
                 stream):
        self.calls.append(("backward", mode, grad_stride))
        err = self.lib.rrd_emu_backward_raw(student, teacher, bank, ld_s, ld_t, ld_q, B, K, D, emb_dtype,
                                            bank_dtype, mode, tau_s, tau_t, num_splits, chunk, lse_s, lse_t, ref,
                                            grad_rows, grad_stride, gpart, grad_student)
        if err:
            raise RuntimeError(err.decode())


@pytest.fixture
def emulated_cuda_backend(emu, monkeypatch):
    """backend='cuda' on CPU tensors, with the kernels emulated: only the device plumbing is replaced."""
    import contextlib

    from rrd_kernels import cuda_backend as cb

    fake = EmulatedExtension(emu)
    real_why = cb.why_unusable

    def why_unusable(device, dtype, bank_dtype, B, K, D):
        if device.type == "cpu" and dtype in cb._DTYPE_CODES and bank_dtype in cb._DTYPE_CODES:
            return None if D <= cb.MAX_D else "D too large"
        return real_why(device, dtype, bank_dtype, B, K, D)

    monkeypatch.setattr(cb, "_ext", fake)
    monkeypatch.setattr(cb, "why_unusable", why_unusable)
    monkeypatch.setattr(cb, "_device_index", lambda device: 0)
    monkeypatch.setattr(cb, "_launch_env", lambda index: (contextlib.nullcontext(), 0))
    monkeypatch.setattr(cb, "_num_sms", lambda index: 3)
    precision = torch.get_float32_matmul_precision()
    yield fake
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize(
    "dtype,bank_dtype,precision,objective",
    [(torch.float32, torch.float32, "highest", "ce"), (torch.float32, torch.bfloat16, "high", "kl"),
     (torch.bfloat16, torch.bfloat16, "highest", "ce"), (torch.float16, torch.float32, "highest", "kl")],
)
def test_rrd_loss_cuda_backend_glue_on_emulated_kernels(emulated_cuda_backend, dtype, bank_dtype, precision, objective):
    import rrd_kernels
    from rrd_kernels.reference import rrd_reference

    torch.set_float32_matmul_precision(precision)
    gen = torch.Generator().manual_seed(7)
    B, K, D, tau_s, tau_t = 37, 150, 24, 0.04, 0.1
    # student as a transposed (column-major) view -> copied; teacher with padded rows -> used in place
    S = (torch.randn(D, B, generator=gen) * 3).to(dtype).t()
    T = padded(torch.randn(B, D, generator=gen).to(dtype), 5)
    Q = F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1).to(bank_dtype)
    Sg = S.detach().clone().requires_grad_()
    loss = rrd_kernels.rrd_loss(Sg, T, Q, tau_s=tau_s, tau_t=tau_t, objective=objective, reduction="sum",
                                backend="cuda")
    loss.backward()  # sum: an expanded (stride 0) upstream gradient reaches the backward
    S64 = S.detach().double().requires_grad_()
    ref = rrd_reference(S64, T.double(), Q.double(), tau_s, tau_t, objective, "sum")
    ref.backward()
    mode = {torch.bfloat16: 3, torch.float16: 2}.get(dtype, 0 if precision == "highest" else 1)
    calls = emulated_cuda_backend.calls
    assert [c[:2] for c in calls] == [("forward", mode), ("backward", mode)], calls
    assert calls[0][2] == D and calls[0][3] == D + 5  # student copied to contiguous, teacher kept with its stride
    assert calls[1][2] == 0  # grad_rows passed as the expanded view it is
    assert loss.dtype == torch.float32 and Sg.grad.dtype == dtype
    u = max(UNIT[mode], UNIT[3] if bank_dtype == torch.bfloat16 and dtype != bank_dtype else 0)
    assert abs(loss.item() - ref.item()) <= B * (8 * u / tau_s + 2e-5)
    assert (Sg.grad.double() - S64.grad).abs().max().item() <= (8 * u / tau_s + 2.0**-8) * S64.grad.abs().max().item()


def test_cuda_op_under_torch_compile(emulated_cuda_backend):
    from rrd_kernels.reference import rrd_reference

    torch.set_float32_matmul_precision("highest")
    gen = torch.Generator().manual_seed(3)
    S = torch.randn(9, 16, generator=gen)
    T = torch.randn(9, 16, generator=gen)
    Q = F.normalize(torch.randn(70, 16, generator=gen), dim=1)

    import rrd_kernels

    torch._dynamo.reset()  # the backend choice is evaluated at trace time: no trace cached from other tests

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(s):
        return rrd_kernels.rrd_loss(s, T, Q, tau_s=0.1, tau_t=0.02, backend="cuda") * 2

    Sg = S.clone().requires_grad_()
    step(Sg).backward()
    S64 = S.double().requires_grad_()
    (rrd_reference(S64, T.double(), Q.double(), 0.1, 0.02, "ce", "mean") * 2).backward()
    assert torch.allclose(Sg.grad.double(), S64.grad, rtol=1e-4, atol=1e-6)
    assert [c[0] for c in emulated_cuda_backend.calls] == ["forward", "backward"]


# ---- accuracy for sharp softmaxes: the Triton tests' bounds on the emulated kernels ---------------------


def emu_run_splits(lib, s, t, q, tau_s, tau_t, kls, w, n_splits, mode=0):
    """The emulated kernels with the bank cut into n_splits chunks (as near as whole 64-row tiles allow; 1:
    the unsplit path), through the binding-level entry points with host-allocated, NaN-poisoned workspaces.
    Runs the forward once per objective in kls and the backward once (its gradient is the same for CE and
    KL). Returns ({kl: rows}, grad, ref)."""
    B, D = s.shape
    K = q.shape[0]
    tiles = -(-K // 64)
    per = -(-tiles // n_splits)
    splits, chunk = -(-tiles // per), per * 64
    args = (s.data_ptr(), t.data_ptr(), q.data_ptr(), s.stride(0), t.stride(0), q.stride(0), B, K, D,
            CODES[s.dtype], CODES[q.dtype], mode, tau_s, tau_t)
    lse_s, lse_t = torch.empty(B), torch.empty(B)
    ref = torch.full((B,), -7, dtype=torch.int32)
    out = {}
    for kl in kls:
        part = torch.full((7 * splits * B,), float("nan"))
        rows = torch.empty(B)
        err = lib.rrd_emu_forward_raw(*args, int(kl), splits, chunk, part.data_ptr(), rows.data_ptr(),
                                      lse_s.data_ptr(), lse_t.data_ptr(), ref.data_ptr())
        assert err is None, err
        out[kl] = rows
    gpart = torch.full((splits * B * (D + 1),), float("nan"))
    grad = torch.empty(B, D)
    err = lib.rrd_emu_backward_raw(*args, splits, chunk, lse_s.data_ptr(), lse_t.data_ptr(), ref.data_ptr(),
                                   w.data_ptr(), w.stride(0), gpart.data_ptr(), grad.data_ptr())
    assert err is None, err
    return out, grad, ref


# The grid of test_triton_kernels.py::test_fp32_matches_float64_reference, thinned for the emulator's speed
# on a 2-core machine: every (B, K) pair; for K <= 64 (one bank tile, where split and unsplit are the same
# path) every D; for the multi-tile banks one D per (B, K), each both unsplit and split over 3 chunks.
SHARP_CASES = [(B, K, D, 1) for B in (1, 3, 64) for K in (1, 7) for D in (16, 100, 128)] + [
    (B, K, D, n) for (B, K, D) in ((1, 1000, 100), (1, 4099, 128), (3, 1000, 128), (3, 4099, 16),
                                   (64, 1000, 16), (64, 4099, 100)) for n in (1, 3)
]


# The quick subset: K = 1, a one-tile bank with padded D, a multi-tile bank unsplit, and split.
SHARP_QUICK = [(1, 1, 16, 1), (3, 7, 100, 1), (1, 1000, 100, 1), (1, 1000, 100, 3)]


@pytest.mark.parametrize("B,K,D,n_splits", quick_subset(SHARP_CASES, SHARP_QUICK, ids=str))
def test_emulated_fp32_meets_triton_bounds(emu, gen, B, K, D, n_splits):
    """fp32 "highest" (SIMT FMA) against float64 with test_triton_kernels' bounds (relative fp32 tolerance
    growing as 1/tau below 0.02, plus the reference's own float64 floor): at tau 0.005 with a tiny bank a row's
    CE / KL can be 1e-4..1e-12 and q - p at the argmax is 1 - 1, which only the cancellation-free forward
    state and the backward's rounding guard resolve. Fresh random inputs and per-row weights every run."""
    from conftest import make_inputs
    from test_triton_kernels import TEMPERATURES, assert_close, float64_floors, fp32_tolerances, reference_rows_and_grad

    s, t, q = make_inputs(B, K, D, gen)
    w = torch.rand(B, generator=gen)
    for tau_s, tau_t in TEMPERATURES:
        rows, grad, ref = emu_run_splits(emu, s, t, q, tau_s, tau_t, (False, True), w, n_splits)
        assert ((ref >= 0) & (ref < K)).all(), ref
        loss_floor, grad_floor = float64_floors(s, tau_s, tau_t, w)
        loss_tol, grad_tol = fp32_tolerances(tau_s, tau_t)
        for kl in (False, True):
            ref_rows, ref_grad = reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w)
            case = f"tau=({tau_s},{tau_t}) kl={kl} splits={n_splits}"
            assert_close(rows[kl], ref_rows, loss_tol, loss_floor, f"loss {case}")
            assert_close(grad, ref_grad, grad_tol, grad_floor, f"grad {case}")

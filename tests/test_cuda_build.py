"""The CUDA backend without a GPU: build, ptxas report, error behaviour, and the kernels run in host emulation.

* The compile gate (csrc/resource_gate.py): every kernel compiled for sm_80, sm_86 and sm_90 has no stack
  frame or spills and fits the per-block registers and shared memory; its committed table
  (csrc/ptxas-report.txt) is current and clean. The extension: built for sm_80 and sm_90 (+ PTX) from the
  current sources. Skipped where nvcc is absent (or RRD_SKIP_CUDA_BUILD is set, for the installed module).
* Without a GPU or without the extension: `import rrd_kernels` works and backend="cuda" raises a clear
  RuntimeError.
* The kernels: csrc/emulate.cpp compiles the very kernel source with the host C++ compiler, every CUDA
  thread a fiber and mma.sync computed from the PTX ISA fragment layouts, and the results are compared
  with the float64 reference (needs only a C++20 compiler, no nvcc).
"""
from __future__ import annotations

import ctypes
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
sys.path.insert(0, CSRC)
import resource_gate as gate  # noqa: E402  (csrc/resource_gate.py: not a package)

ARCHS = ("sm_80", "sm_90")  # what the extension ships (the gate compiles sm_86 too)
find_nvcc = gate.find_nvcc


find_cuobjdump = gate.find_cuobjdump

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the CUDA extension is not built here")
skip_build = os.environ.get("RRD_SKIP_CUDA_BUILD", "0") not in ("", "0")



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


class _SmemOnlyExtension:
    """What why_unusable asks the extension: runtime status and each mode's launch shared memory (the
    numbers of csrc/ptxas-report.txt)."""

    SMEM = {0: 35328, 1: 35328, 2: 18944, 3: 18944}

    def runtime_status(self):
        return 1, ""

    def launch_smem(self, mode):
        return {"forward": 0, "merge": 0, "backward": self.SMEM[mode], "finish": 16}


@pytest.mark.parametrize(
    "major,minor,smem,dtype,precision,refused",
    [(9, 0, 49152, torch.float32, "highest", None), (8, 6, 49152, torch.float32, "highest", None),
     (8, 0, 49152, torch.bfloat16, "highest", None), (7, 5, 65536, torch.bfloat16, "highest", "capability"),
     (8, 9, 32768, torch.float32, "highest", "shared memory"), (8, 9, 32768, torch.float32, "high", "shared memory"),
     (8, 9, 32768, torch.float16, "highest", None)],
)
def test_why_unusable_judges_the_device_by_its_properties(monkeypatch, major, minor, smem, dtype, precision, refused):
    """The device part of why_unusable: compute capability and shared memory per block come from the
    tensors' device's properties, and the shared memory needed from the precision mode of the call."""
    import types

    from rrd_kernels import cuda_backend as cb

    props = types.SimpleNamespace(major=major, minor=minor, name="fake GPU", shared_memory_per_block=smem,
                                  multi_processor_count=100)
    asked = []
    monkeypatch.setattr(cb, "_ext", _SmemOnlyExtension())
    monkeypatch.setattr(cb, "_runtime_problem", lambda: None)
    monkeypatch.setattr(cb, "_properties", lambda index: asked.append(index) or props)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    reason = cb.why_unusable(torch.device("cuda", 3), dtype, torch.float32, 64, 16384, 128)
    assert asked == [3]  # the tensors' device, not the current one
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason and "cuda:3" in reason, reason


# ---- the built extension (needs nvcc) ------------------------------------------------------------------


@needs_nvcc
@pytest.mark.skipif(skip_build, reason="RRD_SKIP_CUDA_BUILD is set")
def test_extension_built_for_sm80_sm90_from_current_sources():
    ext = pytest.importorskip("rrd_kernels._rrd_cuda", reason="extension not built (pip install -e . with nvcc)")
    assert ext.BUILD_INFO.startswith(f"source {gate.source_hash()};"), (
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


def test_committed_gate_table_is_current_and_clean():
    """csrc/ptxas-report.txt (the gate's table) was made from these sources and records no violation, for
    every kernel on every gated arch. Needs no nvcc: a stale table fails here, so refresh it with
    `python csrc/resource_gate.py --write` whenever csrc changes."""
    report = open(gate.REPORT).read()
    assert f"source hash {gate.source_hash()}" in report, (
        "csrc/ptxas-report.txt is stale: run `python csrc/resource_gate.py --write` and commit it")
    assert "violations: 0" in report and "FAIL" not in report, report
    rows = [line.split() for line in report.splitlines() if line.startswith("  sm_")]
    for arch in gate.ARCHS:
        mine = [r for r in rows if r[0] == arch]
        assert len(mine) == gate.KERNELS, (arch, mine)
        for r in mine:
            regs, stack, spill_st, spill_ld, smem_st, smem_dyn, limit = map(int, r[1:8])
            assert stack <= gate.MAX_STACK and spill_st == spill_ld == 0, r
            assert smem_st + smem_dyn <= min(limit, gate.SMEM_OPT_IN[arch]), r
            assert regs * gate.THREADS <= gate.REGS_PER_SM, r


def test_gate_flags_what_does_not_fit():
    """The gate's rule itself, on made-up ptxas records: a stack frame, spills, too many registers and
    too much shared memory are each a violation; a clean record is not."""
    def record(arch, key, **over):
        name = {"merge": "_ZN3rrd16rrd_merge_kernelENS_13ForwardParamsE",
                "finish": "_ZN3rrd17rrd_finish_kernelENS_14BackwardParamsE"}.get(key)
        if name is None and key.startswith("gathered "):
            _, kind, dtype, *slots = key.split()
            slot = f"Li{slots[0]}E" if slots else ""
            name = f"_ZN3rrd{len(kind) + 20}rrd_gathered_{kind}_kernelILi{dtype}E{slot}EEvNS_14GatheredParamsE"
        elif name is None:
            kind, mode, *staging = key.split()
            flag = f"Lb{int(staging[0] == 'async')}E" if staging else ""
            name = f"_ZN3rrd{len(kind) + 11}rrd_{kind}_kernelILi{mode}E{flag}EEvNS_13ForwardParamsE"
        return {"name": name, "arch": arch, "registers": 100, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                "static_smem": 0, **over}

    keys = [f"{k} {m}" for k in ("forward", "backward") for m in range(4)] + ["merge", "finish"] + [
        f"{k}_resident {m} {staging}" for k in ("forward", "backward") for m in (2, 3)
        for staging in ("async", "convert")]
    keys += [f"gathered finish {m}" for m in range(3)]
    keys += [f"gathered {k} {m} {slots}" for k in ("forward", "backward") for m in range(3)
             for slots in gate.GATHERED_SLOTS]
    assert len(keys) == gate.KERNELS
    assert {gate.kernel_key(record("sm_86", k)["name"]) for k in keys} == set(keys)
    smem = {k: 1024 for k in keys}
    clean = [record("sm_86", k) for k in keys]
    rows, problems = gate.evaluate(clean, smem, ("sm_86",))
    assert problems == [] and all(r["verdict"] == "ok" for r in rows)
    for bad, what in [({"stack": 16}, "stack"), ({"spill_loads": 4}, "spills"), ({"registers": 255 + 1}, "registers"),
                      ({"static_smem": gate.SMEM_WITHOUT_OPT_IN}, "shared memory")]:
        records = [record("sm_86", k, **(bad if k == "backward 0" else {})) for k in keys]
        rows, problems = gate.evaluate(records, smem, ("sm_86",))
        assert len(problems) == 1 and "backward 0" in problems[0] and what in problems[0], (bad, problems)
    _, problems = gate.evaluate(clean[:-1], smem, ("sm_86",))
    assert any("expected" in p for p in problems)


@needs_nvcc
def test_fresh_compile_gate_every_kernel_fits_sm80_sm86_sm90():
    """Compile every kernel now for sm_80, sm_86 and sm_90 (~50 s on 2 cores), with the dynamic shared memory
    the launches pass (rrd::launch_smem, read by a compiled probe): no compile error, no stack frame or
    spills, registers and shared memory within each arch's per-block limits."""
    text, problems, records = gate.run_gate(threads=2)
    assert problems == [], "\n".join(problems) + "\n" + text
    assert {r["arch"] for r in records} == set(gate.ARCHS)


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


def host_compile(*args):
    """The host C++ compiler ($CXX, else c++ or g++) in C++20 on args; skips the test where there is none or
    it lacks _Float16 (what the emulation needs), fails on any other compile error."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host emulation")
    out = subprocess.run([cxx, "-std=c++20", *args], capture_output=True, text=True)
    if out.returncode != 0 and "_Float16" in out.stderr:
        pytest.skip("host compiler lacks _Float16")
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    so = str(tmp_path_factory.mktemp("emu") / "rrd_emu.so")
    host_compile("-O2", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                 "-o", so, os.path.join(CSRC, "emulate.cpp"))
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
# Unit roundoff of the dot products per mode (3xTF32 at fp32's, tf32, fp16, bf16); errors of the logits scale with
# 1/tau. 3xTF32 drops A_lo B_lo (2^-22 of a product): within the fp32 budget's 8 u / tau + 2e-5.
UNIT = {0: 2.0**-24, 1: 2.0**-11, 2: 2.0**-11, 3: 2.0**-8}


def emu_run(lib, S, T, Q, mode, tau_s, tau_t, kl, num_sms, grad_rows, ld_pad=0):
    """Forward and backward through the emulated kernels; S/T/Q may be row-padded views (ld = D + ld_pad).
    Returns (rows, lse_diff, lse_t, grad, ref): lse_diff = lse_a - lse_b (the kernels' lse_s slot) and lse_t =
    lse_b in base 2 (as the kernels keep them), ref the argmax."""
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
    # the resident 16-bit kernels with flat softmaxes (tau 1 .. 100) and a tail tile (K % 64 != 0): there the
    # coefficients of the zero-filled bank rows past K (2^-lse_a - 2^-lse_b, ~1/K each) would reach sigma
    # unless masked; cp.async and converting paths, KL and CE
    (33, 1000, 64, torch.bfloat16, torch.bfloat16, 3, 1.0, 1.0, True, 3, 0),
    (33, 1000, 128, torch.float16, torch.float16, 2, 4.0, 4.0, False, 3, 0),
    (9, 300, 96, torch.bfloat16, torch.float32, 3, 100.0, 100.0, False, 2, 0),
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

    rows, lse_diff, lse_t, grad, argmax = emu_run(emu, S, T, Q, mode, tau_s, tau_t, kl, num_sms, w, pad)
    lse_diff, lse_t = lse_diff.double() * math.log(2), lse_t.double() * math.log(2)  # base 2 -> natural
    lse_s = lse_diff + lse_t  # the student's LSE, as the backward rebuilds it

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
    assert (lse_s - ref_lse_s.detach()).abs().max().item() <= tol
    assert (lse_t - ref_lse_t.detach()).abs().max().item() <= tol
    assert (lse_diff - (ref_lse_s - ref_lse_t).detach()).abs().max().item() <= tol
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
    if dt != torch.float32 and min(tau_s, tau_t) >= 1:
        # Flat softmaxes: the gradient is a small sum of coefficients of ~1/K, each rounded to 2^-9 (bf16) of
        # itself, so its relative error stays near that (measured 4e-4 .. 2.4e-3 on these cases); the bound
        # above (2^-8 of the natural scale) would not see, e.g., the coefficients of the zero-filled bank rows
        # past K leaking into sigma (1.2e-2 and 2.7e-2 here with that mask removed).
        rel = ((grad.double() - g_ref).norm() / g_ref.norm()).item()
        assert rel <= 5e-3, f"gradient relative error {rel:.3e}"


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


@pytest.mark.parametrize("extra", [0, 1], ids=["vector-loads", "scalar-loads"])
def test_emulated_row_offsets_past_2_31_elements(emu, extra):
    """Row offsets are 64-bit: student, teacher and bank rows 2^30 + 8 (+1) elements apart, so row 2 starts
    past 2^31 elements (an int32 `row * stride` would wrap and read elsewhere). The rows live in one sparse
    4 GiB fp16 buffer (only the pages touched are backed); outputs must equal those of compact copies."""
    B = K = 3
    D = 8
    ld = 2**30 + 8 + extra
    assert (B - 1) * ld > 2**31
    try:
        buf = torch.empty((B - 1) * ld + 3 * D + 8, dtype=torch.float16)
    except RuntimeError as exc:  # no room for the address range on this machine
        pytest.skip(f"cannot reserve a 4 GiB buffer: {exc}")
    S, T, Q = (buf.as_strided((B, D), (ld, 1), storage_offset=k * D) for k in range(3))
    gen = torch.Generator().manual_seed(5)
    S.copy_(torch.randn(B, D, generator=gen))
    T.copy_(torch.randn(B, D, generator=gen))
    Q.copy_(F.normalize(torch.randn(K, D, generator=gen), dim=1))
    w = torch.linspace(0.5, 1.5, B)
    far = emu_run(emu, S, T, Q, 2, 0.04, 0.1, True, 2, w)
    near = emu_run(emu, S.contiguous(), T.contiguous(), Q.contiguous(), 2, 0.04, 0.1, True, 2, w)
    for a, b in zip(far, near):
        assert torch.equal(a, b)


# The harness itself: a kernel missing a barrier must fail under it, not pass by a lucky interleaving.
HARNESS_PROBE = r"""
#include "emulate.h"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char** argv) {
  const int mode = atoi(argv[1]);  // 0: barrier present, 1: barrier missing, 2: a thread skips it
  float out[64];
  rrd_emu::launch(dim3(2, 1, 1), dim3(64, 1, 1), 64 * sizeof(float), [&] {
    RRD_DECLARE_SMEM(smem);
    float* buf = reinterpret_cast<float*>(smem);
    const int i = int(threadIdx.x);
    buf[i] = float(i + 64 * int(blockIdx.x));
    if (mode == 0 || (mode == 2 && i != 5)) __syncthreads();
    float v = buf[(i + 1) % 64];
    for (int m = 1; m < 32; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);  // the warp's sum
    out[i] = v;
  });
  for (int i = 0; i < 64; ++i) printf("%g\n", out[i]);
  return 0;
}
"""


@pytest.mark.slow  # a host compile
def test_emulation_exposes_a_missing_barrier(tmp_path):
    """The fibers run each thread to its next barrier: without the __syncthreads thread 0 reads its neighbour's
    slot before anyone wrote it (the NaN poison of fresh shared memory), and a barrier one thread skips stops
    the run with a message instead of hanging; with the barrier the block's values are exact."""
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(HARNESS_PROBE)
    host_compile("-O1", "-I", CSRC, "-o", str(exe), str(src))

    def run(mode):
        return subprocess.run([str(exe), str(mode)], capture_output=True, text=True, timeout=60)

    good = run(0)
    assert good.returncode == 0, good.stderr
    # block 1 ran last: each warp's sum of its neighbours' values, 65..96 and 97..127 + 64
    assert [float(x) for x in good.stdout.split()] == [2576.0] * 32 + [3536.0] * 32
    missing = run(1)
    assert missing.returncode == 0, missing.stderr
    assert any(x == "nan" or x == "-nan" for x in missing.stdout.split()), missing.stdout
    skipped = run(2)
    assert skipped.returncode != 0 and "cannot complete" in skipped.stderr, skipped.stderr


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


def test_cuda_launches_run_under_the_tensors_device(emulated_cuda_backend, monkeypatch):
    """Every launch happens inside the device context of the tensors' own device (not the current one) and
    on that device's stream: _launch_env gets the tensors' device index, and both entry points are called
    between entering and leaving its context."""
    import contextlib

    from rrd_kernels import cuda_backend as cb

    log = []

    @contextlib.contextmanager
    def device_context(index):
        log.append(("enter", index))
        yield
        log.append(("exit", index))

    fake = emulated_cuda_backend
    for name in ("forward", "backward"):
        real = getattr(fake, name)

        def launch(*args, _real=real, _name=name, **kwargs):
            log.append((_name, kwargs["device"], kwargs["stream"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(fake, name, launch)
    monkeypatch.setattr(cb, "_device_index", lambda device: 3)
    monkeypatch.setattr(cb, "_launch_env", lambda index: (device_context(index), 1000 + index))
    gen = torch.Generator().manual_seed(3)
    S, T = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
    Q = F.normalize(torch.randn(70, 16, generator=gen), dim=1)
    torch.set_float32_matmul_precision("highest")
    rows, lse_s, lse_t, ref = cb.forward(S, T, Q, 0.1, 0.02, False)
    cb.backward(torch.ones(5), S, T, Q, lse_s, lse_t, ref, 0.1, 0.02)
    assert log == [("enter", 3), ("forward", 3, 1003), ("exit", 3), ("enter", 3), ("backward", 3, 1003),
                   ("exit", 3)]


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
        part = torch.full((8 * splits * B,), float("nan"))
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
    """fp32 "highest" (3xTF32 mma) against float64 with test_triton_kernels' bounds (relative fp32 tolerance
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


# ---- every temperature, and non-finite inputs: the Triton backend's two behaviours on the emulated kernels --

# tau_s = tau_t from sharp to nearly uniform, and the mixed extremes (tests/test_nonfinite_and_temperatures.py).
TAUS = [(0.005, 0.005), (0.02, 0.02), (0.1, 0.1), (1.0, 1.0), (4.0, 4.0), (10.0, 10.0), (100.0, 100.0),
        (0.02, 100.0), (100.0, 0.02)]


@pytest.mark.parametrize("taus", TAUS, ids=[f"{a}-{b}" for a, b in TAUS])
def test_emulated_fp32_gradient_bound_holds_for_every_temperature(emu, gen, taus):
    """fp32 "highest" at every temperature against float64: loss rel err <= 1e-5 a, gradient rel err <= 1e-4 a,
    a = max(1, 1 / (50 min tau)). With both softmaxes flat (large tau) q - p is a few ulps of q and p each: the
    backward forms it as p (2^delta - 1) from the forward's cancellation-free lse_a - lse_b, where subtracting
    q and p would lose the gradient's digits (~1e-3 at tau 100). The bank is split in 3 so the merge of split
    states takes part. Fresh random inputs and per-row weights every run."""
    from conftest import make_inputs

    tau_s, tau_t = taus
    B, K, D = 33, 3000, 128
    s, t, q = make_inputs(B, K, D, gen)
    w = torch.rand(B, generator=gen)
    rows, grad, ref = emu_run_splits(emu, s, t, q, tau_s, tau_t, (False,), w, 3)
    assert ((ref >= 0) & (ref < K)).all(), ref
    s64 = s.double().requires_grad_()
    ref_rows = rrd_reference_rows(s64, t, q, tau_s, tau_t)
    (ref_rows * w.double()).sum().backward()
    a = max(1.0, 1.0 / (50.0 * min(tau_s, tau_t)))
    loss_err = ((rows[False].double() - ref_rows.detach()).norm() / ref_rows.detach().norm()).item()
    grad_err = ((grad.double() - s64.grad).norm() / s64.grad.norm()).item()
    assert loss_err <= 1e-5 * a, f"loss rel err {loss_err:.3e}"
    assert grad_err <= 1e-4 * a, f"grad rel err {grad_err:.3e}"


def rrd_reference_rows(s64, t, q, tau_s, tau_t, objective="ce"):
    from rrd_kernels.reference import rrd_reference

    return rrd_reference(s64, t.double(), q.double(), tau_s, tau_t, objective, "none")


@pytest.mark.parametrize("mode,dtype", [(0, torch.float32), (1, torch.float32), (2, torch.float16), (3, torch.bfloat16)],
                         ids=["fp32", "tf32", "fp16", "bf16"])
@pytest.mark.parametrize("where", ["student", "teacher", "bank", "student_inf"])
def test_emulated_non_finite_input_gives_nan_rows(emu, gen, where, mode, dtype):
    """A NaN (or inf) in a student row, a teacher row or a bank row: exactly the rows that meet it (every row
    for a bank row) get NaN loss, NaN saved LSE slots and a NaN gradient row; every other row stays finite,
    and the argmax stays a valid bank row. GPUs' fmaxf drops NaN, so the kernels mask non-finite logits out
    of the maxima and sums and carry the NaN in the row's count n_a, through the lanes' shuffles and the merge
    of the bank splits (2 splits with num_sms 1, 4 with num_sms 2 and KL)."""
    from conftest import make_inputs

    B, K, D = 5, 200, 24
    s, t, q = make_inputs(B, K, D, gen, dtype=dtype)
    # (tensor, row, feature) poisoned; bank row 130 lies in a later split than the first
    target, r, d = {"student": (s, 2, 3), "student_inf": (s, 2, 3), "teacher": (t, 2, 3), "bank": (q, 130, 0)}[where]
    target[r, d] = float("inf") if where == "student_inf" else float("nan")
    nan_rows = list(range(B)) if where == "bank" else [2]
    w = torch.rand(B, generator=gen) + 0.5
    for num_sms, kl in ((1, False), (2, True)):
        rows, lse_diff, lse_t, grad, ref = emu_run(emu, s, t, q, mode, 0.1, 0.05, kl, num_sms, w)
        assert ((ref >= 0) & (ref < K)).all(), ref
        for i in range(B):
            case = f"row {i}, num_sms {num_sms}, kl {kl}"
            if i in nan_rows:
                assert torch.isnan(rows[i]) and torch.isnan(lse_diff[i]) and torch.isnan(lse_t[i]), case
                assert torch.isnan(grad[i]).all(), (case, grad[i])
            else:
                assert torch.isfinite(rows[i]) and torch.isfinite(lse_diff[i]) and torch.isfinite(lse_t[i]), case
                assert torch.isfinite(grad[i]).all(), (case, grad[i])

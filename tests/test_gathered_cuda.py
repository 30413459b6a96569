"""The CUDA C++ gathered-memory kernels (csrc/rrd_gathered.cuh) in host emulation (csrc/emulate.cpp: the same
kernel source, every CUDA thread a fiber; tests/test_cuda_build.py builds it) against the float64
statement of the gathered loss (rrd_kernels.gathered.gathered_reference): loss rows and the student's
gradient, fp32 / fp16 / bf16 memories, odd shapes (B = 1, K + 1 and D neither powers of two nor multiples of
4 or 8: the scalar path), both load paths, split columns, duplicate indices, tau 0.005 to 100, both
objectives, NaN rows, indices outside the memory; then the Python glue (rrd_kernels.cuda_backend) and
RRDMomentumLoss(backend="cuda") on the emulated kernels. Needs a C++20 host compiler only.

Bounds: the FIFO kernels' fp32 ones (tests/test_triton_kernels.py: fp32_tolerances, 1e-5 loss and 1e-4
gradient relative, growing as 1 / min(tau) below 0.02), as the Triton gathered kernels are held to: the
dots are fp32 FMA sums of D terms (relative error ~D 2^-24 of |s| |m| ~ 1e-5 at D 512, times 1/tau in the
logits), the state, merge and coefficients are the FIFO kernels' rules (rrd_common.cuh). Half memories need
no wider bound: the kernels convert each stored element exactly to fp32, and the reference is given the
same stored (rounded) rows, so only the fp32 arithmetic differs. At tau 100 the gradient bound is 3x (flat
softmaxes: docs/math.md section 6), and KL is checked only at the sharper pairs (there it is ~1e-6 = CE - H
with both ~log K: an absolute, not relative, fp32 accuracy), as for the Triton kernels. With
test_gathered_triton.assert_gathered_close's allowances for tiny banks at tau 0.005 (a KL judged relative to
its CE, the gradient's cancellation of its two halves, the float64 floors).
"""
from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

import test_cuda_build
from conftest import quick_subset, rel_err
from test_gathered_triton import assert_gathered_close, follows_torch_module, student_half_norm
from test_triton_kernels import fp32_tolerances

emu = test_cuda_build.emu  # the module-scoped fixture that compiles csrc/emulate.cpp

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def gemu(emu):
    P, I, L, Dd = ctypes.c_size_t, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
    emu.rrd_emu_gathered.argtypes = [P, P, P, P, P, L, L, L, L, I, I, I, L, I, Dd, Dd, I, I, I, P, P, P]
    emu.rrd_emu_gathered.restype = ctypes.c_char_p
    emu.rrd_emu_gathered_plan.argtypes = [I, I, I, I, ctypes.POINTER(I), ctypes.POINTER(L)]
    emu.rrd_emu_gathered_plan.restype = None
    return emu


def cover(K1, n_splits):
    """(num_splits, chunk) covering K1 columns with no empty split, as cuda_backend forms them."""
    chunk = -(-K1 // min(n_splits, K1))
    return -(-K1 // chunk), chunk


def raw_call(lib, s, t, ms, mt, idx, tau_s, tau_t, kl, num_splits, chunk, need_grad=True):
    """The emulated kernels on CPU tensors: (rows, ref, grad or None), or the error text."""
    B, D = s.shape
    rows = torch.full((B,), -7.0)
    ref = torch.full((B,), -7, dtype=torch.int32)
    grad = torch.full((B, D), -7.0) if need_grad else None
    err = lib.rrd_emu_gathered(s.data_ptr(), t.data_ptr(), ms.data_ptr(), mt.data_ptr(), idx.data_ptr(), s.stride(0),
                               t.stride(0), ms.stride(0), idx.stride(0), B, idx.shape[1], D, ms.shape[0],
                               CODES[ms.dtype], tau_s, tau_t, int(kl), num_splits, chunk, rows.data_ptr(),
                               ref.data_ptr(), grad.data_ptr() if grad is not None else 0)
    return err.decode() if err else (rows, ref, grad)


def emu_gathered(lib, s, t, ms, mt, idx, tau_s, tau_t, kl, n_splits=1, need_grad=True):
    out = raw_call(lib, s, t, ms, mt, idx, tau_s, tau_t, kl, *cover(idx.shape[1], n_splits), need_grad=need_grad)
    assert not isinstance(out, str), out
    return out


def make_case(gen, B, K1, D, N=60, memory_dtype=torch.float32, ld_pad=0):
    """Raw embeddings with row norms 1e-2..1e2, unit memory rows stored in memory_dtype (optionally as views
    with row stride D + ld_pad, NaN in the padding), uniform indices (with repeats)."""
    scale = 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    s = torch.randn(B, D, generator=gen) * scale
    t = torch.randn(B, D, generator=gen) * scale.flip(0)

    def memory():
        m = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(memory_dtype)
        if ld_pad == 0:
            return m
        buf = torch.full((N, D + ld_pad), float("nan"), dtype=memory_dtype)
        buf[:, :D] = m
        return buf[:, :D]

    ms, mt = memory(), memory()
    idx = torch.randint(0, N, (B, K1), generator=gen)
    return s, t, ms, mt, idx


def reference(s, t, ms, mt, idx, tau_s, tau_t, objective):
    """(rows, grad) of the float64 reference; grad for upstream weight 1 per row, as the kernels give it."""
    from rrd_kernels.gathered import gathered_reference

    s64 = s.double().requires_grad_()
    rows, _ = gathered_reference(s64, t.double(), ms.double(), mt.double(), idx, tau_s, tau_t, objective)
    (grad,) = torch.autograd.grad(rows.sum(), s64)
    return rows.detach(), grad


def assert_matches(got, ref, inputs, tau_s, tau_t, case, ce_rows=None):
    """test_gathered_triton's rule for the kernels' rows and gradient (upstream weight 1 per row) against
    the float64 reference; inputs: (s, t, ms, mt, idx) of the call; ce_rows: the CE reference rows of a KL
    call (the KL's scale)."""
    s, _, _, mt, idx = inputs
    rows, _, grad = got
    w = torch.ones(s.shape[0])
    assert_gathered_close(rows, grad, ref, ref[0] if ce_rows is None else ce_rows, s,
                          student_half_norm(s, mt, idx, tau_s, w), tau_s, tau_t, w, case)


CASES = [
    # B, K1, D, memory dtype, n_splits, memory row padding
    (1, 1, 16, torch.float32, 1, 0),
    (1, 5, 13, torch.float32, 1, 0),          # D odd: scalar path
    (3, 70, 24, torch.float32, 2, 0),
    (5, 300, 128, torch.float32, 3, 0),
    (4, 129, 100, torch.bfloat16, 2, 0),      # D % 8 != 0: 16-bit scalar path
    (2, 40, 512, torch.float16, 2, 0),        # every slot of a lane
    (3, 77, 37, torch.bfloat16, 4, 0),
    (2, 66, 64, torch.float32, 1, 3),         # row stride D + 3: scalar path on an aligned D
    (6, 33, 96, torch.float16, 5, 0),
    (2, 30, 130, torch.float32, 2, 0),        # D > 128: the backward's D <= 512 instantiation, scalar path
    (2, 21, 136, torch.bfloat16, 1, 0),       # D > 128, 16-byte loads
]


# `pytest -m "not slow"` keeps one case of each path: B = 1 / K + 1 = 1, fp32 16-byte loads with splits,
# 16-bit scalar loads, the D <= 512 backward with 16-bit 16-byte loads, a padded row stride.
CASES_QUICK = [CASES[0], CASES[3], CASES[4], CASES[7], CASES[10]]


@pytest.mark.parametrize("B,K1,D,mdt,n_splits,pad", quick_subset(
    CASES, CASES_QUICK, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{str(c[3])[6:]}-{c[4]}-{c[5]}"))
def test_emulated_gathered_kernels_match_float64(gemu, gen, B, K1, D, mdt, n_splits, pad):
    s, t, ms, mt, idx = make_case(gen, B, K1, D, memory_dtype=mdt, ld_pad=pad)
    for tau_s, tau_t in ((0.1, 0.05), (0.005, 0.01), (100.0, 50.0)):
        for objective in ("ce", "kl") if tau_s < 100 else ("ce",):
            got = emu_gathered(gemu, s, t, ms, mt, idx, tau_s, tau_t, objective == "kl", n_splits)
            ref = reference(s, t, ms, mt, idx, tau_s, tau_t, objective)
            if objective == "ce":
                ce_rows = ref[0]
            assert_matches(got, ref, (s, t, ms, mt, idx), tau_s, tau_t, f"tau=({tau_s},{tau_t}) {objective}",
                           ce_rows)


TAUS = [(0.005, 0.005), (0.02, 0.02), (0.1, 0.1), (1.0, 1.0), (4.0, 4.0), (10.0, 10.0), (100.0, 100.0),
        (0.02, 100.0), (100.0, 0.02)]


@pytest.mark.parametrize("taus", quick_subset(TAUS, [TAUS[0], TAUS[6], TAUS[7]], ids=lambda c: f"{c[0]}-{c[1]}",
                                               unpack=False))
def test_emulated_gathered_every_temperature(gemu, gen, taus):
    """tau 0.005 to 100 (equal and mixed) on a larger K + 1, with splits: the flat cases are where the
    x = z_a - z_b sum of the state and the p (2^delta - 1) coefficients matter."""
    tau_s, tau_t = taus
    s, t, ms, mt, idx = make_case(gen, 3, 1000, 64, N=500)
    got = emu_gathered(gemu, s, t, ms, mt, idx, tau_s, tau_t, False, 3)
    assert_matches(got, reference(s, t, ms, mt, idx, tau_s, tau_t, "ce"), (s, t, ms, mt, idx), tau_s, tau_t, taus)


def test_emulated_gathered_duplicate_indices_and_own_row(gemu, gen):
    """Repeated memory rows in a sample's columns (one row everywhere, one row twice, column 0 its own
    index as the module builds them) count once per column, as the reference's gather does."""
    s, t, ms, mt, idx = make_case(gen, 4, 45, 40, N=10)
    idx[0] = 3                      # every column the same row: a uniform softmax, loss log(45)
    idx[1, 20:] = idx[1, :25].clone()  # the first 25 columns repeated
    idx[2, ::2] = 7
    got = emu_gathered(gemu, s, t, ms, mt, idx, 0.1, 0.05, False, 2)
    ref = reference(s, t, ms, mt, idx, 0.1, 0.05, "ce")
    assert_matches(got, ref, (s, t, ms, mt, idx), 0.1, 0.05, "duplicates")
    assert abs(got[0][0].item() - torch.log(torch.tensor(45.0)).item()) <= 1e-5
    assert int(got[1][0]) == 3  # the argmax row of an all-equal row is that memory row


def test_emulated_gathered_splits_and_load_paths_agree(gemu, gen):
    """Any split of the columns gives the same rows and gradient to fp32 rounding (the merge is exact up
    to it); the 16-byte and the element-by-element loads are the same arithmetic, bit for bit."""
    s, t, ms, mt, idx = make_case(gen, 3, 257, 64, N=100)
    base = emu_gathered(gemu, s, t, ms, mt, idx, 0.07, 0.04, True, 1)
    for n_splits in (2, 5, 257):
        other = emu_gathered(gemu, s, t, ms, mt, idx, 0.07, 0.04, True, n_splits)
        assert rel_err(other[0], base[0]) <= 1e-5 and rel_err(other[2], base[2]) <= 1e-5, n_splits
    for dtype in (torch.float32, torch.bfloat16):
        a, b = ms.to(dtype), mt.to(dtype)
        pad = torch.zeros(a.shape[0], 72, dtype=dtype)
        sa, sb = pad.clone(), pad.clone()
        sa[:, :64], sb[:, :64] = a, b
        vec = emu_gathered(gemu, s, t, a, b, idx, 0.07, 0.04, False, 3)
        scalar = emu_gathered(gemu, s, t, sa[:, :64], sb[:, :64], idx, 0.07, 0.04, False, 3)  # stride 72 % 8 = 0
        assert torch.equal(vec[0], scalar[0]) and torch.equal(vec[2], scalar[2])
        odd = torch.zeros(a.shape[0], 67, dtype=dtype)
        oa, ob = odd.clone(), odd.clone()
        oa[:, :64], ob[:, :64] = a, b
        scalar = emu_gathered(gemu, s, t, oa[:, :64], ob[:, :64], idx, 0.07, 0.04, False, 3)  # stride 67: scalar
        assert torch.equal(vec[0], scalar[0]) and torch.equal(vec[2], scalar[2]), dtype


def test_emulated_gathered_nan_rows_and_indices_outside_the_memory(gemu, gen):
    """A NaN in a student row, a NaN memory row one sample uses, and an index -1 or N: exactly those rows
    come back NaN (loss and gradient), the others match the reference; the argmax rows stay in [0, N)."""
    N = 30
    s, t, ms, mt, idx = make_case(gen, 6, 50, 24, N=N)
    s[1, 3] = float("nan")
    mt[N - 1] = float("nan")
    idx[idx == N - 1] = 0
    idx[2, 7] = N - 1               # only row 2 meets the NaN memory row
    idx[3, 0] = -1
    idx[4, 49] = N
    rows, ref, grad = emu_gathered(gemu, s, t, ms, mt, idx, 0.1, 0.05, False, 3)
    bad = [1, 2, 3, 4]
    assert torch.isnan(rows[bad]).all() and torch.isnan(grad[bad]).all()
    keep = [0, 5]
    assert torch.isfinite(rows[keep]).all() and torch.isfinite(grad[keep]).all()
    assert ((ref >= 0) & (ref < N)).all()
    ref_rows, ref_grad = reference(s[keep], t[keep], ms, mt, idx[keep], 0.1, 0.05, "ce")
    assert_matches((rows[keep], None, grad[keep]), (ref_rows, ref_grad), (s[keep], t[keep], ms, mt, idx[keep]), 0.1,
                   0.05, "finite rows")


def test_emulated_gathered_loss_only_and_argument_checks(gemu, gen):
    """grad = 0 gives the same rows without the gradient pass; the host checks refuse what the kernels rely
    on, before any launch."""
    s, t, ms, mt, idx = make_case(gen, 3, 20, 16)
    full = emu_gathered(gemu, s, t, ms, mt, idx, 0.1, 0.05, False, 2)
    rows, _, grad = emu_gathered(gemu, s, t, ms, mt, idx, 0.1, 0.05, False, 2, need_grad=False)
    assert grad is None and torch.equal(rows, full[0])
    for splits_chunk, what in (((3, 10), "cover"), ((1, 19), "cover"), ((0, 20), "cover")):
        assert what in raw_call(gemu, s, t, ms, mt, idx, 0.1, 0.05, False, *splits_chunk), splits_chunk
    assert "temperatures" in raw_call(gemu, s, t, ms, mt, idx, 0.0, 0.05, False, 1, 20)
    wide = torch.zeros(3, 513)
    assert "D must be" in raw_call(gemu, wide, wide, torch.zeros(5, 513), torch.zeros(5, 513), idx, 0.1, 0.1, False,
                                   1, 20)


def test_gathered_plan_covers_every_column(gemu):
    """The plan: no empty split, >= 64 columns per split where there are enough, more splits for small B."""
    out, ws = (ctypes.c_int * 2)(), ctypes.c_longlong()
    for B, K1, D, sms in ((1, 1, 16, 132), (64, 16385, 128, 132), (1024, 16385, 128, 132), (3, 100, 7, 1)):
        gemu.rrd_emu_gathered_plan(B, K1, D, sms, out, ctypes.byref(ws))
        splits, chunk = out[0], out[1]
        assert (splits - 1) * chunk < K1 <= splits * chunk, (B, K1)
        assert splits == 1 or chunk >= 64
        assert ws.value == splits * B * (8 + D + 1)
        if (B, K1) == (64, 16385):
            assert splits >= 16  # 4224 warps wanted on 132 SMs: the rows alone are 64


# ---- the Python glue on the emulated kernels ------------------------------------------------------------


class EmulatedGatheredExtension:
    """Stands in for rrd_kernels._rrd_cuda's gathered entry points (same keywords) over the emulation."""

    BUILD_INFO = "host emulation"

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def runtime_status(self):
        return 1, ""

    def gathered_smem(self):
        return {"forward": 16384, "backward": 16384, "finish": 0}

    def gathered_plan(self, B, K1, D, num_sms):
        out, ws = (ctypes.c_int * 2)(), ctypes.c_longlong()
        self.lib.rrd_emu_gathered_plan(B, K1, D, num_sms, out, ctypes.byref(ws))
        return {"num_splits": out[0], "chunk": out[1], "num_dslices": 1, "workspace_floats": ws.value}

    def gathered(self, *, student, teacher, memory_s, memory_t, index, ld_s, ld_t, ld_m, ld_idx, B, K1, D, N,
                 mem_dtype, tau_s, tau_t, kl, num_splits, chunk, workspace, rows, ref, grad, device, stream):
        self.calls.append((num_splits, chunk, ld_m, grad != 0))
        err = self.lib.rrd_emu_gathered(student, teacher, memory_s, memory_t, index, ld_s, ld_t, ld_m, ld_idx, B,
                                        K1, D, N, mem_dtype, tau_s, tau_t, int(kl), num_splits, chunk, rows, ref,
                                        grad)
        if err:
            raise ValueError(err.decode())


@pytest.fixture
def emulated_cuda(gemu, monkeypatch):
    """backend='cuda' for the gathered memory on CPU tensors, the kernels emulated: only the device plumbing
    (extension, device index, stream, SM count, the CUDA-tensor check) is replaced."""
    import contextlib

    from rrd_kernels import cuda_backend as cb

    fake = EmulatedGatheredExtension(gemu)
    real = cb.gathered_unusable

    def gathered_unusable(device, memory_dtype, B, K1, D, N):
        if device.type == "cpu":
            return None if memory_dtype in cb._DTYPE_CODES and D <= cb.MAX_D else "not on the emulation"
        return real(device, memory_dtype, B, K1, D, N)

    monkeypatch.setattr(cb, "_ext", fake)
    monkeypatch.setattr(cb, "gathered_unusable", gathered_unusable)
    monkeypatch.setattr(cb, "_device_index", lambda device: 0)
    monkeypatch.setattr(cb, "_launch_env", lambda index: (contextlib.nullcontext(), 0))
    monkeypatch.setattr(cb, "_num_sms", lambda index: 2)
    return fake


def test_gathered_rrd_rows_backend_cuda_on_emulated_kernels(emulated_cuda, gen):
    """gathered_rrd_rows(backend='cuda') -> autograd -> cuda_backend -> the kernels: rows and the student's
    gradient with per-row upstream weights against float64; rows marked invalid are NaN; a transposed
    student and padded bf16 memories are taken as they are or copied as needed."""
    from rrd_kernels.gathered import gathered_reference, gathered_rrd_rows

    B, K1, D = 7, 90, 40
    s, t, ms, mt, idx = make_case(gen, B, K1, D, memory_dtype=torch.bfloat16, ld_pad=8)
    s = s.t().contiguous().t()  # column-major: copied by the glue
    w = torch.rand(B, generator=gen)
    valid = torch.ones(B, dtype=torch.bool)
    valid[4] = False
    for objective in ("ce", "kl"):
        sg = s.clone().requires_grad_()
        rows, z = gathered_rrd_rows(sg, t, ms, mt, idx, tau_s=0.08, tau_t=0.04, objective=objective,
                                    valid=valid, backend="cuda")
        assert z is None and torch.isnan(rows[4])
        keep = valid.nonzero().squeeze(1)
        (rows[keep] * w[keep]).sum().backward()
        assert torch.isnan(sg.grad[4]).all()
        s64 = s.double().requires_grad_()
        ref, _ = gathered_reference(s64, t.double(), ms.double(), mt.double(), idx, 0.08, 0.04, objective)
        (ref[keep] * w[keep].double()).sum().backward()
        loss_tol, grad_tol = fp32_tolerances(0.08, 0.04)
        assert rel_err(rows[keep], ref[keep]) <= loss_tol
        assert rel_err(sg.grad[keep], s64.grad[keep]) <= grad_tol
    assert emulated_cuda.calls and all(c[3] for c in emulated_cuda.calls)


def test_gathered_cuda_refuses_clearly(emulated_cuda, gen):
    """What backend 'cuda' cannot or will not run: an error naming the reason or the argument, and 'auto'
    never picks cuda for CPU tensors."""
    from rrd_kernels import cuda_backend as cb
    from rrd_kernels.gathered import gathered_rrd_rows, resolve_gathered_backend

    s, t, ms, mt, idx = make_case(gen, 3, 20, 16)
    z = torch.full((2,), -1.0)
    with pytest.raises(ValueError, match="similarity"):
        gathered_rrd_rows(s, t, ms, mt, idx, tau_s=0.1, tau_t=0.1, scores="faithful", z=z, backend="cuda")
    with pytest.raises(ValueError, match="float32 embeddings"):
        gathered_rrd_rows(s.double(), t.double(), ms, mt, idx, tau_s=0.1, tau_t=0.1, backend="cuda")
    assert resolve_gathered_backend("auto", s, ms, idx, False) == "torch"
    with pytest.raises(TypeError, match="index"):
        cb.gathered_rows_and_grad(s, t, ms, mt, idx.int(), 0.1, 0.1, False)
    with pytest.raises(ValueError, match="index"):
        cb.gathered_rows_and_grad(s, t, ms, mt, idx[:2], 0.1, 0.1, False)
    with pytest.raises(ValueError, match="memory_t"):
        cb.gathered_rows_and_grad(s, t, ms, mt[:, :8], idx, 0.1, 0.1, False)
    with pytest.raises(TypeError, match="memory_t"):
        cb.gathered_rows_and_grad(s, t, ms, mt.half(), idx, 0.1, 0.1, False)
    with pytest.raises(ValueError, match="n_splits"):
        cb.gathered_rows_and_grad(s, t, ms, mt, idx, 0.1, 0.1, False, n_splits=0)


def test_gathered_cuda_refuses_cpu_tensors_without_emulation():
    """The real glue: CPU tensors (or no extension) are refused with the reason, never launched."""
    from rrd_kernels import cuda_backend as cb
    from rrd_kernels.gathered import cuda_unusable

    s, ms = torch.randn(3, 16), torch.randn(10, 16)
    idx = torch.zeros(3, 5, dtype=torch.int64)
    reason = cuda_unusable(s, ms, idx, False)
    assert reason and ("CUDA tensors" in reason or "not built" in reason), reason
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
        cb.gathered_rows_and_grad(s, s, ms, ms, idx, 0.1, 0.1, False)


def test_momentum_module_on_emulated_cuda_matches_torch(emulated_cuda, gen):
    """RRDMomentumLoss(backend='cuda') follows the torch module over three steps: losses, head gradients
    and both memories (fp32 both; the memories move by the same unit embeddings)."""
    from rrd_kernels import RRDMomentumLoss

    kw = dict(s_dim=12, t_dim=10, feat_dim=24, n_data=80, nce_k=50, tau_s=0.1, tau_t=0.05, generator=7)
    torch.manual_seed(0)
    a = RRDMomentumLoss(**kw, backend="torch")
    b = RRDMomentumLoss(**kw, backend="cuda")
    follows_torch_module(a, b, gen, "cpu")


def test_auto_resolution_checks_each_fused_backend_once(monkeypatch):
    """backend 'auto' for CUDA tensors: triton, then cuda, else torch, each backend's check evaluated once
    per call (the chosen impl does not check again); an explicit backend that cannot run is a ValueError
    with its reason. The tensors are stand-ins: only their device is read."""
    import types

    from rrd_kernels import gathered

    calls = []

    def check(name, reason):
        return lambda *args: calls.append(name) or reason

    student = types.SimpleNamespace(device=torch.device("cuda", 0))
    for triton_reason, cuda_reason, expected in ((None, None, "triton"), ("no", None, "cuda"), ("no", "no", "torch")):
        monkeypatch.setattr(gathered, "FUSED_UNUSABLE", {"triton": check("triton", triton_reason),
                                                         "cuda": check("cuda", cuda_reason)})
        calls.clear()
        assert gathered.resolve_gathered_backend("auto", student, None, None, False) == expected
        assert calls == (["triton"] if expected == "triton" else ["triton", "cuda"])
    calls.clear()
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call: no"):
        gathered.resolve_gathered_backend("cuda", student, None, None, False)
    assert calls == ["cuda"]
    assert gathered.resolve_gathered_backend("torch", student, None, None, False) == "torch"

"""fp32 "highest" on fp16 tensor cores: operands as two fp16 planes (rrd_kernels/triton_kernels/planes.py).

The split itself is checked against an independent statement of it (the scale from the largest element's
exponent, hi + lo = x 2^e to 2^-22 of the row's largest element), and the kernels that use it against the
float64 reference where the planes' scaling is what keeps them right: rows and banks far from unit size,
and coefficients that grow along the bank (the backward's per-row scale of c comes from the forward's bound
on them, which the merge kernel writes and a test here checks against float64).
"""
import math

import pytest
import torch

from conftest import have_triton, make_inputs, rel_err

pytestmark = pytest.mark.skipif(not have_triton(), reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def expected_exponent(amax: torch.Tensor) -> torch.Tensor:
    """e with amax 2^e in [2^14, 2^15), clamped to [-126, 126]; 0 and subnormals take 126."""
    e = torch.full_like(amax, 126.0, dtype=torch.float64)
    normal = amax >= 2.0 ** -126
    e[normal] = 14 - torch.floor(torch.log2(amax[normal].double()))
    return e.clamp(-126, 126)


def _highest():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    return old


@pytest.mark.parametrize("D", [1, 37, 128])
def test_split_rows_reconstructs_scaled_rows(gen, D):
    from rrd_kernels.triton_kernels.planes import FACTOR_FLOOR, split_bank, split_rows

    B = 9
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    x *= torch.tensor([1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e4, 1e18, 1e30, 1.0], dtype=torch.float64)[:, None]
    x[8] = 0.0
    x = x.float().to(DEVICE)
    bank = torch.nn.functional.normalize(torch.randn(5, D, generator=gen), dim=1).to(DEVICE) * 3.0
    d_pad = max(16, 1 << (D - 1).bit_length())
    _, _, amax, unscale = split_bank(bank, d_pad)
    hi, lo, factor = split_rows(x, 2.0, amax, d_pad)
    assert hi.shape == (B, d_pad) and hi.dtype == torch.float16
    assert (hi[:, D:] == 0).all() and (lo[:, D:] == 0).all()
    e = expected_exponent(x.abs().amax(dim=1).double().cpu())
    scaled = x.double().cpu() * torch.exp2(e)[:, None]
    got = hi.double().cpu()[:, :D] + lo.double().cpu()[:, :D]
    err = (got - scaled).abs().amax(dim=1)
    assert (err <= 2.0 ** -22 * scaled.abs().amax(dim=1) + 2.0 ** -25).all(), err
    assert scaled.abs().amax() < 2.0 ** 15  # hi never overflows fp16
    e_q = expected_exponent(bank.abs().amax().double().cpu().reshape(1))
    assert unscale.item() == 2.0 ** -e_q.item()
    # factor = scale / max(||x||, eps) 2^-e 2^-e_q: a product of planes times it is the logit.
    norm = x.double().cpu().norm(dim=1).clamp_min(1e-12)
    want = 2.0 / norm * torch.exp2(-e) * torch.exp2(-e_q)
    # Rows this tiny (the 1e-30 row, the zero row) take the floor (planes.split_rows says why).
    want = want.clamp_min(FACTOR_FLOOR)
    assert torch.allclose(factor.double().cpu(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("K,D", [(2048, 32), (2049, 32), (1024, 20)])
def test_split_bank_reconstructs_scaled_bank(gen, K, D):
    """The bank's planes, on whole blocks of rows with D a power of two (the unmasked EVEN variant: in the
    interpreter a block is 1024 rows) and on a partial block or a padded D (masked)."""
    from rrd_kernels.triton_kernels.planes import split_bank

    bank = torch.randn(K, D, generator=gen, dtype=torch.float64)
    bank *= torch.exp2(torch.randint(-20, 20, (K, 1), generator=gen)).double()
    bank = bank.float().to(DEVICE)
    d_pad = max(16, 1 << (D - 1).bit_length())
    hi, lo, amax, unscale = split_bank(bank, d_pad)
    assert hi.shape == (K, d_pad) and (hi[:, D:] == 0).all() and (lo[:, D:] == 0).all()
    assert amax.item() == bank.abs().amax().item()
    e_q = expected_exponent(bank.abs().amax().double().cpu().reshape(1))
    assert unscale.item() == 2.0 ** -e_q.item()
    scaled = bank.double().cpu() * 2.0 ** e_q.item()
    got = hi.double().cpu()[:, :D] + lo.double().cpu()[:, :D]
    # One scale for the whole bank: each element to 2^-22 of itself while lo is a normal fp16, and to lo's
    # subnormal step (2^-25, half of 2^-24) below.
    assert ((got - scaled).abs() <= 2.0 ** -22 * scaled.abs() + 2.0 ** -25).all()
    assert scaled.abs().amax() < 2.0 ** 15


@pytest.mark.parametrize("tau_s,tau_t", [(0.02, 0.01), (0.1, 0.5), (5.0, 100.0)])
def test_merge_bounds_every_coefficient(gen, tau_s, tau_t):
    """The lse_t slot's second half, the bound the planes backward scales c by: every |q_ik - p_ik| of a row
    is at most it (float64 reference), and it is within 1.01 x of the row's top probability under either
    softmax (a bound, not a loose one)."""
    from rrd_kernels import triton_kernels as tk

    B, K, D = 37, 500, 24
    s, t, q = make_inputs(B, K, D, gen, device=DEVICE)
    q[:B] = torch.nn.functional.normalize(s, dim=1)  # some rows sharp
    _, _, lse_t, _ = tk.forward(s, t, q, tau_s, tau_t, False, n_splits=3)
    assert lse_t.shape == (tk.LSE_T_ROWS * B,)
    bound = lse_t[B:].double().cpu()
    n = torch.nn.functional.normalize
    qd = q.double().cpu()
    prob_s = torch.softmax(n(s.double().cpu(), dim=1) @ qd.T / tau_s, dim=1)
    prob_t = torch.softmax(n(t.double().cpu(), dim=1) @ qd.T / tau_t, dim=1)
    c_max = (prob_s - prob_t).abs().amax(dim=1)
    top = torch.maximum(prob_s.amax(dim=1), prob_t.amax(dim=1))
    assert (c_max <= bound * (1 + 1e-5)).all()
    assert (bound <= top * 1.01).all() and (bound >= top * 0.99).all()


# Rows up to 1e15, not beyond: the backward's finish kernel (shared by every path) takes the rows' norms as
# fp32 sums of squares, which overflow near 1e19; rows below ~1e-13 meet the eps of the normalisation.
@pytest.mark.parametrize("bank_scale,row_scale", [(2.0 ** -40, 1.0), (1e3, 1.0), (1.0, 1e15), (1.0, 1e-8)])
def test_planes_hold_fp32_bounds_far_from_unit_size(gen, bank_scale, row_scale):
    """The kernels use the bank as given (the reference too) and normalise the rows: scaled banks and rows
    change the planes' exponents, not the answer's accuracy (tau scales with the bank, so the logits do not
    change)."""
    from rrd_kernels import rrd_reference
    from rrd_kernels import triton_kernels as tk

    s, t, q = make_inputs(6, 150, 40, gen, device=DEVICE)
    q = q * bank_scale
    s = s * row_scale
    w = torch.rand(6, generator=gen).to(DEVICE)
    old = _highest()
    try:
        plan = tk.make_plan(6, 150, 40, torch.float32)
        assert plan.planes
        rows, lse_s, lse_t, ref = tk.forward(s, t, q, 0.1 * bank_scale, 0.05 * bank_scale, False)
        grad = tk.backward(w, s, t, q, lse_s, lse_t, ref, 0.1 * bank_scale, 0.05 * bank_scale)
    finally:
        torch.set_float32_matmul_precision(old)
    s64 = s.detach().double().requires_grad_()
    ref_rows = rrd_reference(s64, t.double(), q.double(), 0.1 * bank_scale, 0.05 * bank_scale, "ce", "none")
    (ref_grad,) = torch.autograd.grad((ref_rows * w.double()).sum(), s64)
    assert rel_err(rows, ref_rows) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


def test_coefficients_growing_along_the_bank(gen):
    """Each row's nearest bank rows come last, so the largest |q - p| of a row arrives in its last tile; the
    sharp temperatures make the early tiles' coefficients tiny, below fp16's normal range without the
    per-row scale (the merge's bound on |q - p|, known before the first tile)."""
    from rrd_kernels import rrd_reference
    from rrd_kernels import triton_kernels as tk

    B, K, D = 5, 300, 48
    s, t, q = make_inputs(B, K, D, gen, device=DEVICE)
    q[K - B:] = torch.nn.functional.normalize(s, dim=1)
    q[K - 2 * B:K - B] = torch.nn.functional.normalize(t, dim=1)
    w = torch.rand(B, generator=gen).to(DEVICE)
    old = _highest()
    try:
        rows, lse_s, lse_t, ref = tk.forward(s, t, q, 0.02, 0.01, False, n_splits=1)
        grad = tk.backward(w, s, t, q, lse_s, lse_t, ref, 0.02, 0.01, n_splits=1)
    finally:
        torch.set_float32_matmul_precision(old)
    s64 = s.detach().double().requires_grad_()
    ref_rows = rrd_reference(s64, t.double(), q.double(), 0.02, 0.01, "ce", "none")
    (ref_grad,) = torch.autograd.grad((ref_rows * w.double()).sum(), s64)
    amplification = max(1.0, 1.0 / (50.0 * 0.01))
    assert rel_err(rows, ref_rows) <= 1e-5 * amplification
    assert rel_err(grad, ref_grad) <= 1e-4 * amplification


def test_which_plans_take_planes(monkeypatch):
    """sm_90 at "highest" and D <= 256: the planes; beyond, other modes and other families: not."""
    from rrd_kernels.triton_kernels import make_plan

    old = _highest()
    try:
        monkeypatch.setenv("RRD_TRITON_ARCH", "sm_90")
        assert make_plan(33, 300, 128, torch.float32).planes
        assert make_plan(33, 300, 100, torch.float32, bank_dtype=torch.bfloat16).planes
        assert make_plan(33, 300, 200, torch.float32).tiles.walk_dk  # D 256 class: the planes walked
        assert not make_plan(33, 300, 257, torch.float32).planes  # past 256: the chunked FMA kernels
        assert not make_plan(33, 300, 128, torch.bfloat16).planes
        for family in ("sm_80", "sm_86", "sm_100", "sm_120"):
            monkeypatch.setenv("RRD_TRITON_ARCH", family)
            assert not make_plan(33, 300, 128, torch.float32).planes, family
        torch.set_float32_matmul_precision("high")
        monkeypatch.setenv("RRD_TRITON_ARCH", "sm_90")
        assert not make_plan(33, 300, 128, torch.float32).planes
    finally:
        torch.set_float32_matmul_precision(old)


if have_triton():
    import triton
    import triton.language as tl

    from rrd_kernels.triton_kernels.planes import plane_exponent, pow2

    @triton.jit
    def _probe_exponents(X, E, P):
        i = tl.arange(0, 8)
        e = plane_exponent(tl.load(X + i))
        tl.store(E + i, e)
        tl.store(P + i, pow2(tl.minimum(tl.maximum(e - 100, -126), 126)))


def test_pow2_and_exponent_edges():
    """The exact powers of two and the exponent rule at 0, subnormals, the largest finite, inf and NaN."""
    x = torch.tensor([0.0, 1e-40, 2.0 ** -126, 1.0, 3.0, 3.4e38, math.inf, math.nan], device=DEVICE)
    e = torch.empty(8, dtype=torch.int32, device=DEVICE)
    p = torch.empty(8, dtype=torch.float32, device=DEVICE)
    _probe_exponents[(1,)](x, e, p)
    assert e.tolist() == [126, 126, 126, 14, 13, 14 - 127, 14 - 128, 14 - 128]
    want = [2.0 ** max(-126, min(126, v - 100)) for v in e.tolist()]
    assert p.tolist() == want

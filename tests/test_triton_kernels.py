"""Triton kernels against the float64 reference (on the CPU through Triton's interpreter, or on a GPU).

Kernel level: per-row CE and KL and the student gradient for random per-row upstream weights (every
reduction is such a weighting), on both the unsplit and the split-bank paths.

Tolerances (fp32): the reference is float64 on the same fp32 inputs, so what is left is the fp32 rounding
of the dot products, which a logit multiplies by 1/tau: a logit's resolution is ~eps32 L with L = 1/min(tau).
For tau >= 0.02 (L <= 50) the bounds are 1e-5 (loss) and 1e-4 (gradient); observed errors are ~1e-6, so a
wrong term (a missing rescale, a dropped tile: >= 1e-3) cannot pass. Below, they grow with L/50: at tau
0.005, 4e-5 and 4e-4. There the worst of 3200 sharp, tiny-K rows was 1.4e-5 (loss) and 1.5e-5 (gradient),
while the same function computed by the reference in fp32 was off by up to 1e-1: no fp32 computation of
the logits does 1e-5 at tau 0.005, and these kernels stay at the fp32 resolution of the logits.

The float64 reference has limits of its own: where both softmaxes are one-hot to within 1e-15 (tau 0.005,
tiny K) its q - p and log q at the argmax cancel in float64 too (1 - (1 - 5.8e-15) is off by 1%), while the
kernels' cancellation-free form is right. So each comparison allows, besides the relative tolerance, the
float64 resolution of the reference: an absolute floor of 64 eps64 L per row for the loss (L = the largest
possible |logit|, 1/min(tau)) and 64 eps64 L w_i / ||S_i|| per row for the gradient. The floor is ~1e-12
and only matters for losses or gradients below ~1e-7.
"""
import pytest
import torch

from conftest import have_triton, make_inputs, quick_subset, rel_err
from rrd_kernels import rrd_reference

pytestmark = pytest.mark.skipif(not have_triton(), reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEMPERATURES = [(0.04, 0.1), (0.1, 0.02), (0.005, 0.005)]


def fp32_tolerances(tau_s, tau_t):
    """(loss, gradient) relative tolerances for fp32 inputs (see the module docstring)."""
    amplification = max(1.0, 1.0 / (50.0 * min(tau_s, tau_t)))
    return 1e-5 * amplification, 1e-4 * amplification



def run_kernels(s, t, q, tau_s, tau_t, kl, w, n_splits):
    from rrd_kernels import triton_kernels as tk

    rows, lse_s, lse_t, ref = tk.forward(s, t, q, tau_s, tau_t, kl, n_splits=n_splits)
    grad = tk.backward(w, s, t, q, lse_s, lse_t, ref, tau_s, tau_t, n_splits=n_splits)
    return rows, grad


EPS64 = torch.finfo(torch.float64).eps


def float64_floors(s, tau_s, tau_t, w):
    """Absolute float64 resolution of the reference's per-row loss and of its gradient (see module doc)."""
    L = 1.0 / min(tau_s, tau_t)
    loss_floor = 64 * EPS64 * L * s.shape[0] ** 0.5
    grad_floor = (64 * EPS64 * L * w.double() / s.double().norm(dim=1)).norm().item()
    return loss_floor, grad_floor


def assert_close(out, ref, tol, floor, what):
    diff = (out.detach().double() - ref.detach().double()).norm().item()
    bound = tol * ref.detach().double().norm().item() + floor
    assert diff <= bound, f"{what}: |out - ref| = {diff:.3e} > {bound:.3e} (rel {rel_err(out, ref):.3e})"


def reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w):
    s64 = s.detach().double().requires_grad_()
    rows = rrd_reference(s64, t.double(), q.double(), tau_s, tau_t, "kl" if kl else "ce", "none")
    (grad,) = torch.autograd.grad((rows * w.double()).sum(), s64)
    return rows.detach(), grad


FP32_GRID = [(B, K, D, n) for B in (1, 3, 64) for K in (1, 7, 1000, 4099) for D in (16, 100, 128) for n in (1, 3)]
# The quick subset: K = 1; a one-tile bank with a full 64-row block; a multi-tile bank split in 3 (each
# program walks several tiles, then the merge kernel).
FP32_QUICK = [(1, 1, 16, 1), (64, 7, 128, 1), (3, 1000, 100, 3)]


@pytest.mark.parametrize("B,K,D,n_splits", quick_subset(
    FP32_GRID, FP32_QUICK, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'split' if c[3] > 1 else 'unsplit'}"))
def test_fp32_matches_float64_reference(gen, B, K, D, n_splits):
    s, t, q = make_inputs(B, K, D, gen, device=DEVICE)
    w = torch.rand(B, generator=gen).to(DEVICE)
    with _highest_precision():
        for tau_s, tau_t in TEMPERATURES:
            for kl in (False, True):
                rows, grad = run_kernels(s, t, q, tau_s, tau_t, kl, w, n_splits)
                ref_rows, ref_grad = reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w)
                case = f"tau=({tau_s},{tau_t}) kl={kl}"
                assert rows.dtype == torch.float32 and grad.dtype == torch.float32
                loss_floor, grad_floor = float64_floors(s, tau_s, tau_t, w)
                loss_tol, grad_tol = fp32_tolerances(tau_s, tau_t)
                assert_close(rows, ref_rows, loss_tol, loss_floor, f"loss {case}")
                assert_close(grad, ref_grad, grad_tol, grad_floor, f"grad {case}")


def test_split_actually_splits():
    from rrd_kernels.triton_kernels import make_plan

    plan = make_plan(64, 4099, 128, torch.float32, n_splits=3)
    assert plan.n_splits == 3
    assert make_plan(3, 7, 16, torch.float32, n_splits=3).n_splits == 1  # one tile: nothing to split
    # Every split's chunk starts inside the bank (no empty chunk, so no -inf state to merge).
    for K in (65, 129, 1000, 4099):
        for n in (2, 3, 7, 50):
            p = make_plan(5, K, 32, torch.float32, n_splits=n)
            assert (p.n_splits - 1) * p.tiles_per_split * p.tiles.block_k < K


def test_expanded_upstream_gradient_and_strided_inputs(gen):
    """Upstream grads of a mean are stride-0 views; embeddings may be column slices of a wider tensor."""
    wide = torch.randn(5, 40, generator=gen).to(DEVICE)
    s, t = wide[:, :17], wide[:, 20:37]
    q = torch.nn.functional.normalize(torch.randn(33, 17, generator=gen), dim=1).to(DEVICE)
    w = torch.full((1,), 0.2, device=DEVICE).expand(5)
    rows, grad = run_kernels(s, t, q, 0.1, 0.02, False, w, 1)
    ref_rows, ref_grad = reference_rows_and_grad(s, t, q, 0.1, 0.02, False, w)
    assert rel_err(rows, ref_rows) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-4


def test_zero_student_row_follows_f_normalize(gen):
    """A zero row normalises to 0 (eps clamp); its gradient is then w g / eps, as F.normalize's."""
    s, t, q = make_inputs(4, 50, 16, gen, device=DEVICE)
    s[2] = 0.0
    w = torch.rand(4, generator=gen).to(DEVICE)
    rows, grad = run_kernels(s, t, q, 0.1, 0.1, False, w, 1)
    ref_rows, ref_grad = reference_rows_and_grad(s, t, q, 0.1, 0.1, False, w)
    assert rel_err(rows, ref_rows) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


HALF_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
              (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)]
HALF_GRID = [(dt, bank, n) for dt, bank in HALF_PAIRS for n in (1, 4)]
# The quick subset: each product dtype (bf16 split, fp16, fp32 products with a bf16 bank) once.
HALF_QUICK = [(torch.bfloat16, torch.bfloat16, 4), (torch.float16, torch.float16, 1), (torch.float32, torch.bfloat16, 1)]


@pytest.mark.parametrize("dtype,bank_dtype,n_splits", quick_subset(
    HALF_GRID, HALF_QUICK, ids=lambda c: f"{str(c[0])[6:]}-{str(c[1])[6:]}-{'split' if c[2] > 1 else 'unsplit'}"))
def test_half_precision_no_worse_than_reference_in_same_dtype(gen, dtype, bank_dtype, n_splits):
    """Rule for fp16/bf16 embeddings: error vs float64 at most 2x the error of the reference computed in the
    embeddings' dtype. Products run in the embeddings' dtype when it is fp16/bf16 (bank tiles are cast to
    it; documented), so the float64 oracle gets the same rounded inputs: the bank rounded to that dtype.
    Both errors are dominated by rounding the embeddings and products to 8 (bf16) or 11 (fp16) bits; the
    kernels accumulate and normalise in fp32, the reference's softmax and sums run in the low dtype, so the
    kernels should be at least as good.

    fp32 embeddings with a low-precision bank run fp32 products on the bank as stored: that is the fp32 case
    on a bank that happens to be rounded, so the fp32 bounds hold against float64 on the same bank. (The
    "2x the same-dtype reference" rule does not fit it: that reference is fp32 and nearly exact, and twice
    a near-zero error failed at random.)"""
    B, K, D = 33, 777, 72
    s, t, q = make_inputs(B, K, D, gen, dtype=dtype, bank_dtype=bank_dtype, device=DEVICE)
    q_as_used = q.to(dtype).to(bank_dtype) if dtype != torch.float32 else q
    w = torch.rand(B, generator=gen).to(DEVICE)
    for tau_s, tau_t in TEMPERATURES[:2]:
        with _highest_precision():
            rows, grad = run_kernels(s, t, q, tau_s, tau_t, False, w, n_splits)
        ref_rows, ref_grad = reference_rows_and_grad(s, t, q_as_used, tau_s, tau_t, False, w)
        assert grad.dtype == dtype
        if dtype == torch.float32:
            loss_tol, grad_tol = fp32_tolerances(tau_s, tau_t)
            assert rel_err(rows, ref_rows) <= loss_tol
            assert rel_err(grad, ref_grad) <= grad_tol
            continue
        low = s.detach().clone().requires_grad_()
        low_rows = rrd_reference(low, t, q, tau_s, tau_t, "ce", "none")
        (low_grad,) = torch.autograd.grad((low_rows * w.to(dtype)).sum(), low)
        assert rel_err(rows, ref_rows) <= 2 * rel_err(low_rows, ref_rows)
        assert rel_err(grad, ref_grad) <= 2 * rel_err(low_grad, ref_grad)


class _highest_precision:
    """fp32 products at fp32 accuracy whatever the session's default is."""

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of GPU tiles")
@pytest.mark.parametrize("family,dtype,precision", quick_subset(
    [(f, d, p) for f in ("sm_80", "sm_86", "sm_90")
     for d, p in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"))],
    [("sm_90", torch.float32, "highest"), ("sm_90", torch.bfloat16, "highest")],
    ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}",
))
def test_gpu_family_tiles_match_float64(gen, monkeypatch, family, dtype, precision):
    """The tile plans a GPU of each family gets (run here by the interpreter): odd B, K and D so that every
    mask, feature chunk, output slice and split boundary is partial."""
    monkeypatch.setenv("RRD_TRITON_ARCH", family)
    s, t, q = make_inputs(33, 300, 100, gen, dtype=dtype)
    w = torch.rand(33, generator=gen)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        rows, grad = run_kernels(s, t, q, 0.04, 0.1, False, w, 3)
    finally:
        torch.set_float32_matmul_precision(old)
    ref_rows, ref_grad = reference_rows_and_grad(s, t, q, 0.04, 0.1, False, w)
    if dtype == torch.float32:  # the interpreter computes tf32 dots as fp32: the fp32 bounds hold
        assert rel_err(rows, ref_rows) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-4
    else:
        # bf16 rows and bank are the operands as given (exact products, fp32 sums): the loss is fp32-exact;
        # the gradient is rounded to bf16 twice (q - p as a product operand, then the output): 2^-9 each.
        assert rel_err(rows, ref_rows) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-2


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of GPU tiles")
@pytest.mark.parametrize("B,K,D,n_splits", [(130, 300, 200, 3), (3, 129, 256, 3), (70, 1000, 256, None)])
def test_sm90_walked_planes_hold_fp32_bounds(gen, monkeypatch, B, K, D, n_splits):
    """fp32 "highest" on sm_90 at D 129-256: the planes walked in feature chunks by the forward, the
    transposed backward (planes_backward.py, 32-row blocks), held to the fp32 grid's bounds at every
    temperature pair, CE and KL, with row blocks of both passes partial, a partial last bank tile and a
    split bank, or a one-tile split; with the default split (None) the backward splits the bank its own way."""
    from rrd_kernels.triton_kernels import make_plan

    monkeypatch.setenv("RRD_TRITON_ARCH", "sm_90")
    s, t, q = make_inputs(B, K, D, gen)
    w = torch.rand(B, generator=gen)
    with _highest_precision():
        plan = make_plan(B, K, D, torch.float32, n_splits=n_splits)
        assert plan.planes and plan.tiles.walk_dk and plan.tiles.bwd_transposed
        if n_splits is None:
            assert plan.bwd_n_splits != plan.n_splits
        for tau_s, tau_t in TEMPERATURES:
            for kl in (False, True):
                rows, grad = run_kernels(s, t, q, tau_s, tau_t, kl, w, n_splits)
                ref_rows, ref_grad = reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w)
                case = f"D={D} tau=({tau_s},{tau_t}) kl={kl}"
                loss_floor, grad_floor = float64_floors(s, tau_s, tau_t, w)
                loss_tol, grad_tol = fp32_tolerances(tau_s, tau_t)
                assert_close(rows, ref_rows, loss_tol, loss_floor, f"loss {case}")
                assert_close(grad, ref_grad, grad_tol, grad_floor, f"grad {case}")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of GPU tiles")
@pytest.mark.parametrize("D,dtype,bank_dtype,slices", [
    (200, torch.bfloat16, torch.bfloat16, 1), (300, torch.bfloat16, torch.bfloat16, 0),
    (512, torch.bfloat16, torch.bfloat16, 2), (448, torch.float16, torch.float32, 2)])
def test_sm90_half_size_classes_match_float64(gen, monkeypatch, D, dtype, bank_dtype, slices):
    """sm_90's fp16/bf16 plans by size class of D: the resident D-256 tiles (D 200 pads to 256), the resident
    D-512 tiles with their backward in two output slices (D 512; D 448, padded, with an fp32 bank), and the
    chunked kernels (slices 0: D 300, rows not 16-aligned), against float64 with a ragged B, K and split,
    CE and KL."""
    from rrd_kernels.triton_kernels import make_plan

    monkeypatch.setenv("RRD_TRITON_ARCH", "sm_90")
    plan = make_plan(33, 300, D, dtype, bank_dtype=bank_dtype)
    assert plan.resident == (slices > 0) and (not plan.resident or plan.n_dslices == slices)
    s, t, q = make_inputs(33, 300, D, gen, dtype=dtype)
    q = q.to(bank_dtype)  # (an fp32 bank of 16-bit values: the operands as given, the same bounds)
    w = torch.rand(33, generator=gen)
    for kl in (False, True):
        rows, grad = run_kernels(s, t, q, 0.04, 0.1, kl, w, 3)
        ref_rows, ref_grad = reference_rows_and_grad(s, t, q, 0.04, 0.1, kl, w)
        # As in test_gpu_family_tiles_match_float64: exact 16-bit products, fp32 sums; the gradient rounded
        # to bf16 twice (measured 2.2-2.5e-3 at D 512 over three seeds; fp16 3e-4).
        assert rel_err(rows, ref_rows) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-2, kl


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of GPU tiles")
def test_sm90_unaligned_rows_leave_the_d512_tiles(gen, monkeypatch):
    """The resident D-512 tiles serve 16-aligned rows only (plans.py: others spill there): a 512-wide view with
    a row stride of 520 takes the chunked kernels, with the same result as its contiguous copy."""
    from rrd_kernels.triton_kernels import launch

    monkeypatch.setenv("RRD_TRITON_ARCH", "sm_90")
    s, t, q = make_inputs(9, 70, 520, gen, dtype=torch.bfloat16)
    s, t = s[:, :512], t[:, :512]
    q = q[:, :512]
    assert not launch.plan_for(s, t, q).resident
    assert launch.plan_for(s.contiguous(), t.contiguous(), q.contiguous()).resident
    w = torch.rand(9, generator=gen)
    rows, grad = run_kernels(s, t, q, 0.04, 0.1, True, w, 2)
    ref_rows, ref_grad = run_kernels(s.contiguous(), t.contiguous(), q.contiguous(), 0.04, 0.1, True, w, 2)
    assert rel_err(rows, ref_rows) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-2


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tiles")
@pytest.mark.parametrize("family", ["interpreter", "sm_90"])
def test_argmax_kernel_takes_the_first_of_equal_rows(gen, monkeypatch, family):
    """rrd_argmax_kernel: each row's largest s . Q_k within the tile the forward recorded, the first of two
    bank rows with equal products (a row duplicated), written to every split; D not a multiple of its
    feature chunk, the rows' tiles in different splits."""
    from rrd_kernels.triton_kernels import launch

    monkeypatch.setenv("RRD_TRITON_ARCH", family)
    B, K, D = 5, 700, 200
    s, t, q = make_inputs(B, K, D, gen)
    best = [3, 140, 333, 520, 698]
    for i, k in enumerate(best):
        q[k] = s[i] / s[i].norm()
        q[k + 1] = q[k]
    with _highest_precision(), launch._on(s.device):
        plan = launch.plan_for(s, t, q, n_splits=3)
        _, part_idx = launch.forward_states(s, t, q, 0.05, 0.1, plan)
    assert part_idx.shape[0] == plan.n_splits > 1
    assert all(part_idx[j].tolist() == best for j in range(plan.n_splits))

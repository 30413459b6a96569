"""The fused gathered-memory kernels (rrd_kernels/triton_kernels/gathered.py) against the float64 statement
of the gathered loss (rrd_kernels.gathered.gathered_reference): loss rows and the student's gradient, odd
shapes (B = 1, K + 1 not a multiple of the step, D not a power of two), split columns, tau 0.005 to 100,
both objectives, NaN rows, and RRDMomentumLoss on them against the torch path over several steps.

Tolerances as the FIFO kernels' fp32 ones (tests/test_triton_kernels.py: fp32_tolerances, which grow as
1 / min(tau) below 0.02): the products here are fp32 FMA sums of D terms, the state and coefficients the
same code as the resident kernels'; with the float64 floors and two allowances for tiny banks at tau 0.005
(assert_gathered_close says which and why).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import have_triton, rel_err
from test_triton_kernels import assert_close, float64_floors, fp32_tolerances

pytestmark = pytest.mark.skipif(not have_triton(), reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(gen, B, K1, D, N=60, memory_dtype=torch.float32):
    scale = 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    s = (torch.randn(B, D, generator=gen) * scale).to(DEVICE)
    t = (torch.randn(B, D, generator=gen) * scale.flip(0)).to(DEVICE)
    ms = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(DEVICE, memory_dtype)
    mt = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(DEVICE, memory_dtype)
    idx = torch.randint(0, N, (B, K1), generator=gen).to(DEVICE)
    return s, t, ms, mt, idx


def _reference(s, t, ms, mt, idx, tau_s, tau_t, objective, w):
    from rrd_kernels.gathered import gathered_reference

    s64 = s.detach().double().requires_grad_()
    rows, _ = gathered_reference(s64, t.double(), ms.double(), mt.double(), idx, tau_s, tau_t, objective)
    (grad,) = torch.autograd.grad((rows * w.double()).sum(), s64)
    return rows.detach(), grad


def student_half_norm(s, mt, idx, tau_s, w):
    """||sum_i w_i d lse_a(s_i) / ds_i|| in float64: the size of the student half of the gradient (the
    q-weighted rows of mt, the memory the student is compared with, through the normalisation); the gradient
    is it minus the teacher half."""
    from rrd_kernels.gathered import NORM_EPS

    s64 = s.detach().double().requires_grad_()
    a = torch.einsum("bd,bkd->bk", F.normalize(s64, dim=1, eps=NORM_EPS), mt.double()[idx]) / tau_s
    (g,) = torch.autograd.grad((torch.logsumexp(a, dim=1) * w.double()).sum(), s64)
    return g.norm().item()


def assert_gathered_close(rows, grad, ref, ce_rows, s, student_half, tau_s, tau_t, w, case):
    """The FIFO kernels' fp32 rule (fp32_tolerances relative, plus the float64 reference's own resolution,
    float64_floors) with the two allowances that a tiny per-row bank (K + 1 = 6) at tau 0.005 reaches often
    enough to make the plain rule fail one run in ~15:
    - a KL row is CE - H: with both near log 2 (student and teacher split alike between two rows) the KL is
      1e-4 while fp32 forms it to ~1e-7 of CE, so the loss is judged relative to the CE rows (ce_rows; for
      CE, the rows themselves);
    - the gradient is the student half (student_half: its norm) minus the teacher half; where the two
      softmaxes nearly agree it is small against either, and each half is formed to fp32's relative
      accuracy of the rows (the loss tolerance), so that much of the student half is allowed besides.
    Where both softmaxes are one-hot on the same row, loss (1e-19) and gradient (1e-20) lie below the
    float64 reference's resolution, which the floors cover."""
    ref_rows, ref_grad = ref
    loss_tol, grad_tol = fp32_tolerances(tau_s, tau_t)
    if max(tau_s, tau_t) >= 100:  # flat softmaxes: the gradient's fp32 error grows with tau (docs/math.md 6)
        grad_tol *= 3
    loss_floor, grad_floor = float64_floors(s, tau_s, tau_t, w)
    assert_close(rows, ref_rows, 0.0, loss_tol * ce_rows.double().norm().item() + loss_floor, f"loss {case}")
    if grad is not None:
        assert_close(grad, ref_grad, grad_tol, loss_tol * student_half + grad_floor, f"grad {case}")


CASES = [(1, 1, 16, None), (1, 5, 13, None), (3, 70, 24, None), (5, 300, 128, 3), (4, 129, 100, 2), (2, 40, 512, 2)]


@pytest.mark.parametrize("B,K1,D,n_splits", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_gathered_kernels_match_float64(gen, B, K1, D, n_splits):
    from rrd_kernels.triton_kernels.gathered import gathered_rows_and_grad

    s, t, ms, mt, idx = _case(gen, B, K1, D)
    w = torch.rand(B, generator=gen).to(DEVICE)
    for tau_s, tau_t in ((0.1, 0.05), (0.005, 0.01), (100.0, 50.0)):
        # KL at tau 100 is ~1e-6 = CE - H with both ~log K: its fp32 accuracy there is absolute (as the FIFO
        # kernels', whose tests also hold KL only at the sharper pairs), so the flat pair checks CE.
        student_half = student_half_norm(s, mt, idx, tau_s, w)
        for objective in ("ce", "kl") if tau_s < 100 else ("ce",):
            rows, grad = gathered_rows_and_grad(s, t, ms, mt, idx, tau_s, tau_t, objective == "kl", n_splits=n_splits)
            ref = _reference(s, t, ms, mt, idx, tau_s, tau_t, objective, w)
            if objective == "ce":
                ce_rows = ref[0]
            assert_gathered_close(rows, grad * w[:, None], ref, ce_rows, s, student_half, tau_s, tau_t, w,
                                  f"tau=({tau_s},{tau_t}) {objective}")


# The interpreter's argmax of the NaN row's logits is numpy's, which warns (a GPU's does not).
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_gathered_kernels_half_memories_and_nan_rows(gen):
    """bf16 memories are read as stored (the reference gets the same rounded rows); a NaN in a student row
    makes that row's loss and gradient NaN and leaves the others finite."""
    from rrd_kernels.triton_kernels.gathered import gathered_rows_and_grad

    s, t, ms, mt, idx = _case(gen, 4, 50, 40, memory_dtype=torch.bfloat16)
    s[1, 3] = float("nan")
    rows, grad = gathered_rows_and_grad(s, t, ms, mt, idx, 0.1, 0.05, False)
    assert torch.isnan(rows[1]) and torch.isnan(grad[1]).all()
    keep = [0, 2, 3]
    ref_rows, ref_grad = _reference(s[keep], t[keep], ms, mt, idx[keep], 0.1, 0.05, "ce", torch.ones(3))
    assert rel_err(rows[keep], ref_rows) <= 1e-5 and rel_err(grad[keep], ref_grad) <= 1e-4


def test_momentum_module_on_triton_matches_torch(gen):
    """Same seed, same batches: the triton module's losses, head gradients and memories follow the torch
    module's over three steps (fp32 both; the memories move by the same unit embeddings)."""
    from rrd_kernels import RRDMomentumLoss

    kw = dict(s_dim=12, t_dim=10, feat_dim=24, n_data=80, nce_k=50, tau_s=0.1, tau_t=0.05, generator=7)
    torch.manual_seed(0)
    a = RRDMomentumLoss(**kw, backend="torch").to(DEVICE)
    b = RRDMomentumLoss(**kw, backend="triton").to(DEVICE)
    follows_torch_module(a, b, gen, DEVICE)


def follows_torch_module(a, b, gen, device):
    """Module b (a fused backend) against module a (torch), both fp32 from a's state, over three steps."""
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        f_s = torch.randn(6, 12, generator=gen).to(device)
        f_t = torch.randn(6, 10, generator=gen).to(device)
        idx = torch.randperm(80, generator=gen)[:6]
        losses = []
        for m in (a, b):
            m.zero_grad()
            loss = m(f_s, f_t, idx)
            loss.backward()
            losses.append(loss.detach())
        assert rel_err(losses[1], losses[0]) <= 1e-5
        assert rel_err(b.embed_s.weight.grad, a.embed_s.weight.grad) <= 1e-4
        assert torch.allclose(b.memory_s, a.memory_s, atol=1e-6) and torch.allclose(b.memory_t, a.memory_t, atol=1e-6)

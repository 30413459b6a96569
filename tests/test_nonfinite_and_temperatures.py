"""Non-finite inputs give NaN (never an exception or a hang), on every backend; and the fp32 gradient holds
its bound across the whole range of temperatures, including the flat softmaxes of large ones."""
import math

import pytest
import torch

from conftest import have_triton, make_inputs, quick_subset
from rrd_kernels import RRDLoss, rrd_loss, rrd_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if have_triton() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher", "bank", "student_inf"])
def test_non_finite_input_gives_nan_loss_and_gradient(gen, backend, where):
    s, t, q = make_inputs(5, 70, 24, gen, device=DEVICE)
    bad = float("inf") if where == "student_inf" else float("nan")
    if where.startswith("student"):
        s[2, 3] = bad
    elif where == "teacher":
        t[2, 3] = bad
    else:
        q[40, 0] = bad
    s.requires_grad_()
    rows = rrd_loss(s, t, q, tau_s=0.1, tau_t=0.05, reduction="none", backend=backend)
    rows.sum().backward()
    nan_rows = [2] if where != "bank" else list(range(5))  # a bad bank row meets every sample
    for i in range(5):
        if i in nan_rows:
            assert torch.isnan(rows[i]), f"row {i}: {rows[i]}"
            assert torch.isnan(s.grad[i]).all(), f"grad row {i}: {s.grad[i]}"
        else:
            assert torch.isfinite(rows[i]) and torch.isfinite(s.grad[i]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_nan_features_gives_nan_not_an_error(gen, backend):
    crit = RRDLoss(s_dim=12, t_dim=10, feat_dim=16, bank_size=64, backend=backend).to(DEVICE)
    f_s = torch.randn(4, 12, generator=gen).to(DEVICE)
    f_t = torch.randn(4, 10, generator=gen).to(DEVICE)
    f_s[1, 0] = float("nan")
    loss = crit(f_s.requires_grad_(), f_t)
    loss.backward()
    assert torch.isnan(loss)


# tau_s = tau_t from sharp to nearly uniform, and the two published mixed settings' extremes.
TAUS = [(0.005, 0.005), (0.02, 0.02), (0.1, 0.1), (1.0, 1.0), (4.0, 4.0), (10.0, 10.0), (100.0, 100.0),
        (0.02, 100.0), (100.0, 0.02)]


# The torch backend is PyTorch's own fp32 softmax: ~1e-5 up to tau 10, but ~1e-4 at tau 100 (1.1e-4 seen),
# so it is held to the bound up to 10; the kernels are held to it everywhere (worst seen: 0.38 of it, tau 100).
CASES = [(b, t) for b in BACKENDS for t in TAUS if b != "torch" or max(t) <= 10.0]


@pytest.mark.parametrize("backend,taus", quick_subset(
    CASES,
    [c for c in CASES if c[1] in ((0.005, 0.005), (100.0, 100.0), (10.0, 10.0)) and (c[0] != "torch" or c[1][0] == 10.0)],
    ids=lambda c: f"{c[0]}-{c[1][0]}-{c[1][1]}",
))
def test_fp32_gradient_bound_holds_for_every_temperature(gen, backend, taus):
    """The fp32 bounds of tests/test_triton_kernels.py (1e-5 loss, 1e-4 gradient, relative, growing as
    1/(50 tau) below tau 0.02) at every temperature: with both softmaxes flat, q - p is a few ulps of q and p
    each, and a backward that subtracts them loses the gradient's digits (1.9e-4 at tau 4, growing with tau)."""
    tau_s, tau_t = taus
    s, t, q = make_inputs(33, 3000, 128, gen, device=DEVICE)
    w = torch.rand(33, generator=gen).to(DEVICE)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        student = s.clone().requires_grad_()
        rows = rrd_loss(student, t, q, tau_s=tau_s, tau_t=tau_t, reduction="none", backend=backend)
        (rows * w).sum().backward()
    finally:
        torch.set_float32_matmul_precision(old)
    s64 = s.double().requires_grad_()
    ref = rrd_reference(s64, t.double(), q.double(), tau_s, tau_t, "ce", "none")
    (ref * w.double()).sum().backward()
    amplification = max(1.0, 1.0 / (50.0 * min(tau_s, tau_t)))
    grad_err = ((student.grad.double() - s64.grad).norm() / s64.grad.norm()).item()
    loss_err = ((rows.double() - ref).norm() / ref.norm()).item()
    assert loss_err <= 1e-5 * amplification, f"loss rel err {loss_err:.3e}"
    assert grad_err <= 1e-4 * amplification, f"grad rel err {grad_err:.3e}"
    assert math.isfinite(grad_err)


def test_temperatures_beyond_the_tested_range_warn(gen):
    s, t, q = make_inputs(3, 20, 8, gen)
    with pytest.warns(UserWarning, match="tau_t=1000.0 > 100"):
        rrd_loss(s, t, q, tau_s=0.1, tau_t=1000.0, backend="torch")

"""The reference is the oracle: check it against independent formulations of docs/math.md in float64."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_inputs, rel_err
from rrd_kernels import rrd_reference


def test_ce_matches_authors_formulation(gen):
    s, t, q = make_inputs(6, 50, 16, gen, dtype=torch.float64)
    tau_s, tau_t = 0.04, 0.1
    s_n, t_n = F.normalize(s, dim=1), F.normalize(t, dim=1)
    p = torch.softmax(t_n @ q.T / tau_t, dim=1)
    expected = -(p * torch.log_softmax(s_n @ q.T / tau_s, dim=1)).sum(1).mean()
    assert rel_err(rrd_reference(s, t, q, tau_s, tau_t), expected) < 1e-12


def test_kl_matches_kl_div_and_shares_the_gradient(gen):
    s, t, q = make_inputs(5, 40, 12, gen, dtype=torch.float64)
    s.requires_grad_()
    tau_s, tau_t = 0.1, 0.02
    log_q = torch.log_softmax(F.normalize(s, dim=1) @ q.T / tau_s, dim=1)
    log_p = torch.log_softmax(F.normalize(t, dim=1) @ q.T / tau_t, dim=1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1)
    kl = rrd_reference(s, t, q, tau_s, tau_t, "kl", "none")
    assert rel_err(kl, expected) < 1e-12
    (g_kl,) = torch.autograd.grad(kl.sum(), s)
    (g_ce,) = torch.autograd.grad(rrd_reference(s, t, q, tau_s, tau_t, "ce", "sum"), s)
    assert rel_err(g_kl, g_ce) < 1e-12


def test_gradient_matches_the_closed_form(gen):
    """dL/dS_i = w_i (g_i - s_i (s_i . g_i)) / ||S_i||, g_i = (1/tau_s) sum_k (q_ik - p_ik) Q_k."""
    s, t, q = make_inputs(7, 30, 10, gen, dtype=torch.float64)
    s.requires_grad_()
    tau_s, tau_t = 0.04, 0.1
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((rrd_reference(s, t, q, tau_s, tau_t, reduction="none") * w).sum(), s)
    s_hat = F.normalize(s.detach(), dim=1)
    qq = torch.softmax(s_hat @ q.T / tau_s, 1)
    p = torch.softmax(F.normalize(t, dim=1) @ q.T / tau_t, 1)
    g = (qq - p) @ q / tau_s
    expected = w[:, None] * (g - s_hat * (s_hat * g).sum(1, keepdim=True)) / s.detach().norm(dim=1, keepdim=True)
    assert rel_err(grad, expected) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(gen, reduction):
    s, t, q = make_inputs(4, 9, 8, gen, dtype=torch.float64)
    rows = rrd_reference(s, t, q, 0.1, 0.1, reduction="none")
    out = rrd_reference(s, t, q, 0.1, 0.1, reduction=reduction)
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    assert out.shape == expected.shape and torch.equal(out, expected)

"""RRDLoss against an independent re-implementation of the authors' module (heads + FIFO queue)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import have_triton
from rrd_kernels import RRDLoss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if have_triton() else [])


class AuthorsStyleRRD(nn.Module):
    """The authors' formulation written independently: normalise both heads' outputs, softmax of the teacher's
    similarities to the queue, log-softmax of the student's, soft cross-entropy; the queue is a Python-side
    FIFO written one row at a time (the authors assert K % B == 0; this one wraps, as RRDLoss does)."""

    def __init__(self, embed_s, embed_t, queue, tau_s, tau_t, enqueue):
        super().__init__()
        self.embed_s, self.embed_t = embed_s, embed_t
        self.queue = queue.clone()
        self.ptr = 0
        self.tau_s, self.tau_t, self.enqueue = tau_s, tau_t, enqueue

    def _push(self, keys):
        for row in keys:
            self.queue[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.queue.shape[0]

    def forward(self, f_s, f_t):
        s = F.normalize(self.embed_s(f_s), dim=1)
        t = F.normalize(self.embed_t(f_t), dim=1)
        if self.enqueue == "before":
            self._push(t.detach())
        queue = self.queue.clone()
        p = torch.softmax(t.detach() @ queue.T / self.tau_t, dim=1)
        loss = -(p * torch.log_softmax(s @ queue.T / self.tau_s, dim=1)).sum(1).mean()
        if self.enqueue == "after":
            self._push(t.detach())
        return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enqueue,tau_s,tau_t", [("after", 0.04, 0.1), ("before", 0.1, 0.02)])
def test_matches_authors_module_step_for_step(backend, enqueue, tau_s, tau_t):
    """Same losses, bank, pointer and trained weights as the authors' formulation, step for step. The weights
    are compared with a float64 run of the authors' module: after 7 SGD steps at lr 0.5 two fp32 runs that
    round differently (the kernels scale raw products per row; the authors normalise, then multiply) drift
    apart by ~1e-6, a draw of fp32 rounding; so ours must stay as close to the float64 trajectory as the fp32
    authors' module does (2x its distance, plus 1e-6). A semantic difference (enqueue order, a wrong bank row,
    a missing term) moves the weights by > 1e-3."""
    torch.manual_seed(0)
    s_dim, t_dim, feat, K, B = 20, 28, 16, 100, 24  # 24 does not divide 100: the FIFO wraps mid-batch
    ours = RRDLoss(s_dim, t_dim, feat_dim=feat, bank_size=K, tau_s=tau_s, tau_t=tau_t, enqueue=enqueue,
                   backend=backend).to(DEVICE)
    theirs = AuthorsStyleRRD(copy.deepcopy(ours.embed_s), copy.deepcopy(ours.embed_t), ours.bank, tau_s, tau_t,
                             enqueue)
    exact = AuthorsStyleRRD(copy.deepcopy(ours.embed_s).double(), copy.deepcopy(ours.embed_t).double(),
                            ours.bank.double(), tau_s, tau_t, enqueue)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs, exact)]
    for step in range(7):
        f_s = torch.randn(B, s_dim, device=DEVICE)
        f_t = torch.randn(B, t_dim, device=DEVICE)
        loss_ours = ours(f_s, f_t)
        loss_theirs = theirs(f_s, f_t)
        loss_exact = exact(f_s.double(), f_t.double())
        assert abs(loss_ours.item() - loss_theirs.item()) <= 1e-6 * max(1.0, abs(loss_theirs.item())), step
        torch.testing.assert_close(ours.bank, theirs.queue, rtol=0, atol=1e-6)
        assert int(ours.bank_ptr) == theirs.ptr == exact.ptr
        for opt, loss in zip(opts, (loss_ours, loss_theirs, loss_exact)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        w_exact = exact.embed_s.weight.detach()
        ours_off = (ours.embed_s.weight.detach().double() - w_exact).abs().max().item()
        theirs_off = (theirs.embed_s.weight.detach().double() - w_exact).abs().max().item()
        assert ours_off <= 2 * theirs_off + 1e-6, f"step {step}: ours {ours_off:.2e}, authors' fp32 {theirs_off:.2e}"
        # The teacher head gets no gradient from RRD (the authors detach the teacher side).
        assert ours.embed_t.weight.grad is None or ours.embed_t.weight.grad.abs().sum() == 0


def test_init_state_and_state_dict():
    m = RRDLoss(8, 12, feat_dim=10, bank_size=50)
    assert isinstance(m.embed_s, nn.Linear) and isinstance(m.embed_t, nn.Linear)
    assert m.embed_s.in_features == 8 and m.embed_t.in_features == 12 and m.embed_s.out_features == 10
    torch.testing.assert_close(m.bank.norm(dim=1), torch.ones(50))
    assert m.bank_ptr.dtype == torch.long and int(m.bank_ptr) == 0
    state = m.state_dict()
    assert "bank" in state and "bank_ptr" in state
    m(torch.randn(7, 8), torch.randn(7, 12))
    other = RRDLoss(8, 12, feat_dim=10, bank_size=50)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.bank, m.bank) and int(other.bank_ptr) == 7


def test_fifo_wraps_and_any_batch_up_to_the_bank():
    m = RRDLoss(4, 4, feat_dim=6, bank_size=10)
    for b, expected_ptr in [(7, 7), (7, 4), (10, 4), (1, 5)]:
        f_t = torch.randn(b, 4)
        m(torch.randn(b, 4), f_t)
        keys = F.normalize(m.embed_t(f_t), dim=1).detach()
        written = (torch.arange(b) + (expected_ptr - b)) % 10
        torch.testing.assert_close(m.bank[written], keys)
        assert int(m.bank_ptr) == expected_ptr


def test_pooled_feature_maps_are_flattened():
    m = RRDLoss(8, 12, feat_dim=6, bank_size=20)
    loss = m(torch.randn(5, 8, 1, 1), torch.randn(5, 12, 1, 1))
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "f_s,f_t,error,pattern",
    [
        (torch.randn(21, 8), torch.randn(21, 12), ValueError, r"^batch of 21 is larger than the bank \(bank_size=20\)$"),
        (torch.randn(5, 9), torch.randn(5, 12), ValueError, r"f_s must be \(B, 8\) or \(B, 8, 1, 1\).*got shape \(5, 9\)$"),
        (torch.randn(5, 8), torch.randn(5, 11), ValueError, r"f_t must be \(B, 12\).*got shape \(5, 11\)$"),
        # an unpooled map: the error names the shape as passed, what is expected, and what to do
        (torch.randn(5, 8, 4, 4), torch.randn(5, 12), ValueError,
         r"f_s must be \(B, 8\) or \(B, 8, 1, 1\).*got shape \(5, 8, 4, 4\); pool the feature map first"),
        (torch.randn(5, 8), torch.randn(4, 12), ValueError, "same batch size"),
        (torch.randn(8), torch.randn(5, 12), ValueError, r"f_s must be \(B, 8\).*got shape \(8,\), which is not a batch"),
        (torch.randn(0, 8), torch.randn(0, 12), ValueError, "empty batch"),
        ([1.0] * 8, torch.randn(5, 12), TypeError, "f_s must be a torch.Tensor"),
        (torch.randn(5, 8), torch.randn(5, 12, dtype=torch.float64), TypeError, "f_t has dtype torch.float64"),
        (torch.randn(5, 8, device="meta"), torch.randn(5, 12), ValueError, "f_s is on meta"),
    ],
)
def test_failed_call_leaves_the_bank_unchanged(f_s, f_t, error, pattern):
    for enqueue in ("after", "before"):
        m = RRDLoss(8, 12, feat_dim=6, bank_size=20, enqueue=enqueue)
        m(torch.randn(3, 8), torch.randn(3, 12))
        bank, ptr = m.bank.clone(), m.bank_ptr.clone()
        with pytest.raises(error, match=pattern):
            m(f_s, f_t)
        assert torch.equal(m.bank, bank) and torch.equal(m.bank_ptr, ptr)


def test_batch_larger_than_the_bank_under_ranks_names_them(monkeypatch):
    """With W ranks every rank's keys are gathered into the bank, so the message counts them (checked before
    any collective, so a fake world size is enough here)."""
    import rrd_kernels.nn as rrd_nn

    m = RRDLoss(8, 12, feat_dim=6, bank_size=20)
    monkeypatch.setattr(rrd_nn, "distributed_world", lambda: 2)
    with pytest.raises(ValueError, match=r"^batch of 11 x 2 ranks \(= 22 keys per step, all-gathered\) is larger "
                                         r"than the bank \(bank_size=20\)$"):
        m(torch.randn(11, 8), torch.randn(11, 12))
    m_local = RRDLoss(8, 12, feat_dim=6, bank_size=20, gather_distributed=False)  # local banks: no ranks counted
    with pytest.raises(ValueError, match=r"^batch of 21 is larger than the bank \(bank_size=20\)$"):
        m_local(torch.randn(21, 8), torch.randn(21, 12))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(tau_s=0.0), "tau_s"),
        (dict(tau_t=-0.1), "tau_t"),
        (dict(enqueue="during"), "enqueue"),
        (dict(objective="mse"), "objective"),
        (dict(backend="jax"), "backend"),
        (dict(bank_size=0), "bank_size"),
        (dict(feat_dim=2.5), "feat_dim"),
    ],
)
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RRDLoss(8, 12, **kwargs)


def test_kl_objective_has_the_ce_gradient():
    torch.manual_seed(1)
    a = RRDLoss(6, 6, feat_dim=8, bank_size=32, objective="ce")
    b = copy.deepcopy(a)
    b.objective = "kl"
    f_s, f_t = torch.randn(5, 6), torch.randn(5, 6)
    la, lb = a(f_s, f_t), b(f_s, f_t)
    la.backward()
    lb.backward()
    assert lb.item() < la.item()  # KL = CE - H(p), H > 0
    torch.testing.assert_close(a.embed_s.weight.grad, b.embed_s.weight.grad)


def test_autocast_bf16_on_cpu():
    m = RRDLoss(8, 12, feat_dim=16, bank_size=64, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(torch.randn(9, 8), torch.randn(9, 12))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert m.bank.dtype == torch.float32 and torch.isfinite(m.bank).all()

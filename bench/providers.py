"""The implementations being compared. Each provider builds, for one configuration, a function
``loss_fn(student, teacher, bank) -> scalar loss`` whose gradient flows to ``student`` only.

eager   the authors' formulation in eager PyTorch (below): B x K logits, softmax, log_softmax.
compile the same function under torch.compile (fullgraph, static shapes; dynamo caches reset per config).
torch   rrd_kernels.rrd_loss(backend="torch"): the package's plain-PyTorch path.
triton  rrd_kernels.rrd_loss(backend="triton").
cuda    rrd_kernels.rrd_loss(backend="cuda").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config


def rrd_eager(student, teacher, bank, tau_s: float, tau_t: float):
    """RRD loss written the way the authors' training code writes it: normalise both embeddings, one bank
    matmul each, softmax of the teacher's similarities, log_softmax of the student's, soft cross-entropy
    averaged over the batch. Teacher and bank are detached (no gradient reaches them)."""
    teacher = teacher.detach()
    bank = bank.detach()
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    sim_s = torch.mm(s, bank.t()) / tau_s
    sim_t = torch.mm(t, bank.t()) / tau_t
    p = F.softmax(sim_t, dim=1)
    log_q = F.log_softmax(sim_s, dim=1)
    return -(p * log_q).sum(dim=1).mean()


def _build_eager(cfg: Config):
    tau_s, tau_t = cfg.tau_s, cfg.tau_t

    def loss_fn(student, teacher, bank):
        return rrd_eager(student, teacher, bank, tau_s, tau_t)

    return loss_fn


def _build_compile(cfg: Config):
    import torch._dynamo

    # One compiled graph per configuration: reset so that the recompile limit (8 per code object by default)
    # is never hit over a sweep, which would silently fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(rrd_eager, fullgraph=True, dynamic=False)
    tau_s, tau_t = cfg.tau_s, cfg.tau_t

    def loss_fn(student, teacher, bank):
        return compiled(student, teacher, bank, tau_s, tau_t)

    return loss_fn


def _build_backend(name: str):
    def build(cfg: Config):
        import rrd_kernels

        tau_s, tau_t = cfg.tau_s, cfg.tau_t

        def loss_fn(student, teacher, bank):
            return rrd_kernels.rrd_loss(student, teacher, bank, tau_s=tau_s, tau_t=tau_t, backend=name)

        return loss_fn

    return build


BUILDERS = {
    "eager": _build_eager,
    "compile": _build_compile,
    "torch": _build_backend("torch"),
    "triton": _build_backend("triton"),
    "cuda": _build_backend("cuda"),
}


def build(provider: str, cfg: Config):
    return BUILDERS[provider](cfg)

"""The implementations being compared. Each provider builds, for one configuration, a function
``loss_fn(student, teacher, bank) -> scalar loss`` whose gradient flows to ``student`` only.

eager   the authors' formulation in eager PyTorch (below): B x K logits, softmax, log_softmax.
compile the same function under torch.compile (fullgraph, static shapes; dynamo caches reset per config).
torch   rrd_kernels.rrd_loss(backend="torch"): the package's plain-PyTorch path.
triton  rrd_kernels.rrd_loss(backend="triton").
cuda    rrd_kernels.rrd_loss(backend="cuda").

For a momentum-memory configuration (cfg.memory == "momentum") the same names build
``loss_fn(student, teacher, memory)`` with memory a bench.inputs.GatheredMemory:

eager   the authors' momentum-memory formulation in eager PyTorch (momentum_eager below): gathers the two
        B x (K+1) x D row tensors, bmm, exp / Z or the plain scores, softmax cross-entropy.
compile the same function under torch.compile.
torch   rrd_kernels.gathered_rrd_rows(backend="torch"): RRDMomentumLoss's functional core (chunked, never
        holds the B x (K+1) x D rows).
triton  gathered_rrd_rows(backend="triton"): the fused gathered kernels (scores "similarity" and fp32 only;
        other configurations are recorded as unavailable).
cuda    gathered_rrd_rows(backend="cuda"): the CUDA C++ gathered kernels, with the same limits.
The memory update after the loss (index_copy_ of B rows, the same in both) is not timed.
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


def momentum_eager(student, teacher, memory, tau_s: float, tau_t: float, scores: str = "similarity",
                   nce_t: float = 0.07):
    """The momentum-memory RRD loss written the way the authors' code writes it (their ContrastMemory and
    RRD_MomentumMemory_Loss, restated): normalise both embeddings; index_select each memory's rows at the
    flattened B x (K+1) indices and view them as B x (K+1) x D (detached: the memory gets no gradient); bmm
    with the embedding: the student against the teacher memory's rows, the teacher against the student
    memory's; for "faithful" exp(score / nce_t) divided by the fixed Z (a Python float); then the softmax of
    the teacher's values over tau_t (detached) against the log_softmax of the student's over tau_s, summed
    over the K+1 rows and averaged over the batch."""
    B, k1 = memory.index.shape
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.detach(), dim=1)
    flat = memory.index.view(-1)
    rows_t = torch.index_select(memory.memory_t, 0, flat).detach().view(B, k1, -1)
    rows_s = torch.index_select(memory.memory_s, 0, flat).detach().view(B, k1, -1)
    out_s = torch.bmm(rows_t, s.view(B, -1, 1)).squeeze(2)
    out_t = torch.bmm(rows_s, t.view(B, -1, 1)).squeeze(2)
    if scores == "faithful":
        z_s, z_t = memory.z_floats
        out_s = torch.exp(out_s / nce_t) / z_s
        out_t = torch.exp(out_t / nce_t) / z_t
    p = F.softmax(out_t.detach() / tau_t, dim=1)
    return -(p * F.log_softmax(out_s / tau_s, dim=1)).sum(dim=1).mean()


def _momentum_eager(cfg: Config, compiled: bool = False):
    from .config import NCE_T

    fn = momentum_eager
    if compiled:
        import torch._dynamo

        torch._dynamo.reset()
        fn = torch.compile(momentum_eager, fullgraph=True, dynamic=False)
    tau_s, tau_t, scores = cfg.tau_s, cfg.tau_t, cfg.scores

    def loss_fn(student, teacher, memory):
        return fn(student, teacher, memory, tau_s, tau_t, scores, NCE_T)

    return loss_fn


def _momentum_backend(name: str):
    def build(cfg: Config):
        import rrd_kernels.gathered as gathered

        from .config import NCE_T

        if name not in gathered.GATHERED_BACKENDS:
            raise RuntimeError(f"cannot run this call: no {name!r} backend for the gathered memory (rrd_kernels."
                               f"gathered.GATHERED_BACKENDS has {sorted(gathered.GATHERED_BACKENDS)})")
        tau_s, tau_t, scores = cfg.tau_s, cfg.tau_t, cfg.scores

        def loss_fn(student, teacher, memory):
            if name in gathered.FUSED_UNUSABLE:  # a refusal is "unavailable" in the report, not an error
                reason = gathered.fused_unusable(name, student, memory.memory_s, memory.index, scores == "faithful")
                if reason is not None:
                    raise RuntimeError(f"cannot run this call: {reason}")
            rows, _ = gathered.gathered_rrd_rows(
                student, teacher, memory.memory_s, memory.memory_t, memory.index, tau_s=tau_s, tau_t=tau_t,
                scores=scores, nce_t=NCE_T, z=memory.z if scores == "faithful" else None, backend=name)
            return rows.mean()

        return loss_fn

    return build


MOMENTUM_BUILDERS = {
    "eager": _momentum_eager,
    "compile": lambda cfg: _momentum_eager(cfg, compiled=True),
    "torch": _momentum_backend("torch"),
    "triton": _momentum_backend("triton"),
    "cuda": _momentum_backend("cuda"),
}

BUILDERS = {
    "eager": _build_eager,
    "compile": _build_compile,
    "torch": _build_backend("torch"),
    "triton": _build_backend("triton"),
    "cuda": _build_backend("cuda"),
}


def build(provider: str, cfg: Config):
    if cfg.memory == "momentum":
        return MOMENTUM_BUILDERS[provider](cfg)
    return BUILDERS[provider](cfg)

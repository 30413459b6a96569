"""RRDLoss: the authors' module (projection heads + FIFO memory bank), on top of rrd_loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_rrd_inputs, check_temperature
from .backends import BACKENDS
from .bank import distributed_world, enqueue_, gather_keys, random_unit_rows
from .functional import rrd_loss
from .reference import NORM_EPS, OBJECTIVES

ENQUEUE_ORDERS = ("after", "before")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _features(x, name: str, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    expected = f"{name} must be (B, {dim}) or (B, {dim}, 1, 1), i.e. {dim} features per sample"
    if x.dim() < 2:
        raise ValueError(f"{expected}; got shape {tuple(x.shape)}, which is not a batch")
    flat = x.flatten(1)  # as the authors' Embed: (B, C, 1, 1) pooled maps are accepted
    if flat.shape[1] != dim:
        # Name the shape as passed (not the flattened one) and, for a map, say what to do about it.
        hint = "; pool the feature map first (e.g. adaptive_avg_pool2d to 1 x 1)" if x.dim() > 2 else ""
        raise ValueError(f"{expected}; got shape {tuple(x.shape)}{hint}")
    x = flat
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0)")
    return x


class RRDLoss(nn.Module):
    """Relational Representation Distillation loss with projection heads and a FIFO memory bank.

    ``forward(f_s, f_t)`` projects the student and teacher features (``embed_s``, ``embed_t``: nn.Linear to
    ``feat_dim``), computes the RRD loss of the student's embeddings against the bank, and enqueues the
    teacher's normalised embeddings (detached) into the bank, overwriting the oldest rows.

    enqueue:
        "after"  -- similarities use the bank before this batch is enqueued (the paper's tables, the authors'
                    2024 code; use with tau_s 0.04, tau_t 0.1).
        "before" -- this batch's teacher keys are enqueued first, so each sample also sees its own teacher key
                    (the authors' 2025 code; use with tau_s 0.1, tau_t 0.02).
    gather_distributed: when torch.distributed is initialised, all ranks' teacher keys are all-gathered
        (in rank order) before the enqueue so every rank holds the same bank; the loss uses the local batch.
        Every rank must then use the same batch size.

    Buffers ``bank`` (bank_size x feat_dim, random unit rows at init) and ``bank_ptr`` (the next row to
    write, a device tensor) are saved in the state_dict.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        feat_dim: int = 128,
        bank_size: int = 16384,
        tau_s: float = 0.04,
        tau_t: float = 0.1,
        enqueue: str = "after",
        objective: str = "ce",
        backend: str = "auto",
        gather_distributed: bool = True,
    ):
        super().__init__()
        self.s_dim = _positive_int(s_dim, "s_dim")
        self.t_dim = _positive_int(t_dim, "t_dim")
        self.feat_dim = _positive_int(feat_dim, "feat_dim")
        self.bank_size = _positive_int(bank_size, "bank_size")
        self.tau_s = check_temperature(tau_s, "tau_s")
        self.tau_t = check_temperature(tau_t, "tau_t")
        check_choice(enqueue, "enqueue", ENQUEUE_ORDERS)
        check_choice(objective, "objective", OBJECTIVES)
        check_choice(backend, "backend", BACKENDS)
        self.enqueue, self.objective, self.backend = enqueue, objective, backend
        self.gather_distributed = bool(gather_distributed)
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.register_buffer("bank", random_unit_rows(bank_size, feat_dim))
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"bank_size={self.bank_size}, feat_dim={self.feat_dim}, tau_s={self.tau_s}, tau_t={self.tau_t}, "
            f"enqueue={self.enqueue!r}, objective={self.objective!r}, backend={self.backend!r}"
        )

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s = _features(f_s, "f_s", self.s_dim)
        f_t = _features(f_t, "f_t", self.t_dim)
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"f_s and f_t must have the same batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
        world = distributed_world() if self.gather_distributed else 1
        if f_s.shape[0] * world > self.bank_size:
            raise ValueError(
                f"batch of {f_s.shape[0]} x {world} rank(s) is larger than the bank (bank_size={self.bank_size})"
            )
        for name, f, head in (("f_s", f_s, self.embed_s), ("f_t", f_t, self.embed_t)):
            if f.dtype != head.weight.dtype and not torch.is_autocast_enabled(f.device.type):
                raise TypeError(f"{name} has dtype {f.dtype} but the {name[-1]} head's weights are {head.weight.dtype}")
            if f.device != head.weight.device:
                raise ValueError(f"{name} is on {f.device} but the module is on {head.weight.device}")
        student = self.embed_s(f_s)
        teacher = self.embed_t(f_t)
        # Everything that can fail is checked before the bank is touched, so a failed call leaves it as it was.
        check_rrd_inputs(student, teacher, self.bank, self.tau_s, self.tau_t, self.objective)

        keys = F.normalize(teacher.detach(), dim=1, eps=NORM_EPS)
        if world > 1:
            keys = gather_keys(keys)
        if self.enqueue == "before":
            enqueue_(self.bank, self.bank_ptr, keys)
            bank = self.bank
        else:
            # The backward still needs the bank as it was; the enqueue below writes into it in place.
            bank = self.bank.clone() if torch.is_grad_enabled() and student.requires_grad else self.bank
        loss = rrd_loss(
            student,
            teacher,
            bank,
            tau_s=self.tau_s,
            tau_t=self.tau_t,
            objective=self.objective,
            backend=self.backend,
        )
        if self.enqueue == "after":
            enqueue_(self.bank, self.bank_ptr, keys)
        return loss

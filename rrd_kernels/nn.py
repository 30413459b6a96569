"""RRDLoss: the authors' module (projection heads + FIFO memory bank), on top of rrd_loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

from ._validate import check_choice, check_rrd_inputs, check_temperature
from .backends import BACKENDS, sharded_backend
from .bank import distributed_world, enqueue_, gather_keys, random_unit_rows
from .functional import loss_dtype, rrd_loss
from .reference import NORM_EPS, OBJECTIVES, reduce_rows
from .shard_bank import SHARD_KEY, ShardLayout, enqueue_sharded_, gather_shards, random_unit_rows_range
from .sharded_loss import all_gather_rows, check_peers, sharded_rrd_rows

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

    shard_bank: under an initialised process group of W > 1 ranks (at construction), each rank stores only
        its contiguous shard of the global bank_size-row FIFO (sizes differ by at most one row) and every step
        is the computation of gather_distributed=True against the whole bank (docs/sharded-bank.md). Needs
        gather_distributed=True and the same batch size on every rank; the backward is a collective. Without
        a process group, or with W = 1, the module is the unsharded one.

    Buffers ``bank`` (bank_size x feat_dim, random unit rows at init; this rank's rows when sharded) and
    ``bank_ptr`` (the next row to write, global, a device tensor) are saved in the state_dict; a sharded
    module also saves ``bank_shard_range`` ([lo, hi, K]) and loads unsharded state_dicts (keeping its rows).
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
        shard_bank: bool = False,
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
        if shard_bank and not gather_distributed:
            raise ValueError("shard_bank=True needs gather_distributed=True: a sharded bank is one global FIFO "
                             "that every rank's keys go into")
        self.shard_bank = bool(shard_bank)
        # The layout is fixed at construction: the buffer's size depends on it.
        world = distributed_world() if shard_bank else 1
        self.layout = ShardLayout(bank_size, world, dist.get_rank()) if world > 1 else None
        if self.layout is not None:
            if bank_size < world:
                raise ValueError(f"bank_size={bank_size} is smaller than the {world} ranks it is sharded over")
            # One seed from the global RNG (the same on every rank seeded alike) fixes the whole bank.
            seed = int(torch.randint(0, 2**62, (1,)))
            bank = random_unit_rows_range(bank_size, feat_dim, self.layout.lo, self.layout.hi, seed)
        else:
            bank = random_unit_rows(bank_size, feat_dim)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def bank_is_sharded(self) -> bool:
        return self.layout is not None

    def extra_repr(self) -> str:
        return (
            f"bank_size={self.bank_size}, feat_dim={self.feat_dim}, tau_s={self.tau_s}, tau_t={self.tau_t}, "
            f"enqueue={self.enqueue!r}, objective={self.objective!r}, backend={self.backend!r}"
            + (f", shard_bank rows [{self.layout.lo}, {self.layout.hi}) of {self.layout.world} ranks"
               if self.layout is not None else "")
        )

    def gather_bank(self) -> torch.Tensor:
        """The full bank_size x feat_dim bank (a copy). For a sharded bank this is a collective: every rank
        must call it, and every rank gets the whole bank."""
        if self.layout is None:
            return self.bank.detach().clone()
        return gather_shards(self.bank.detach(), self.layout)

    def full_state_dict(self) -> dict:
        """state_dict with the full bank (collective when sharded): what an unsharded module, or a sharded one
        with any number of ranks, loads."""
        state = self.state_dict()
        if self.layout is not None:
            state.pop(SHARD_KEY)
            state["bank"] = self.gather_bank()
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout is not None:
            destination[prefix + SHARD_KEY] = torch.tensor([self.layout.lo, self.layout.hi, self.bank_size])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict passes its own shallow copy of the caller's dict: replacing entries is safe.
        shard_range = state_dict.pop(prefix + SHARD_KEY, None)
        bank = state_dict.get(prefix + "bank")
        lo, hi = (self.layout.lo, self.layout.hi) if self.layout is not None else (0, self.bank_size)
        if shard_range is not None:
            saved = tuple(int(v) for v in shard_range)
            if saved != (lo, hi, self.bank_size):
                error_msgs.append(
                    f"{prefix}bank holds rows [{saved[0]}, {saved[1]}) of a {saved[2]}-row sharded bank, this "
                    f"module needs rows [{lo}, {hi}) of {self.bank_size}: merge the per-rank state_dicts with "
                    f"rrd_kernels.merge_bank_shards(...) (or save full_state_dict()) and load that"
                )
                # Nothing of the bank's state loads (the pointer belongs with the rows): it stays as it was.
                state_dict[prefix + "bank"] = self.bank
                state_dict[prefix + "bank_ptr"] = self.bank_ptr
        elif bank is not None and self.layout is not None and bank.shape[0] == self.bank_size:
            state_dict[prefix + "bank"] = bank[lo:hi]  # an unsharded bank: keep this rank's rows
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s = _features(f_s, "f_s", self.s_dim)
        f_t = _features(f_t, "f_t", self.t_dim)
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"f_s and f_t must have the same batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
        world = distributed_world() if self.gather_distributed else 1
        if self.shard_bank and self.layout is None and world > 1:
            raise RuntimeError("RRDLoss(shard_bank=True) was built without a process group of more than one rank; "
                               "build it after torch.distributed.init_process_group")
        if self.layout is not None and world != self.layout.world:
            raise RuntimeError(f"RRDLoss(shard_bank=True) was built for {self.layout.world} ranks, the process group "
                               f"now has {world}")
        if self.layout is None and f_s.shape[0] * world > self.bank_size:
            batch = f_s.shape[0]
            if world > 1:  # every rank's keys are gathered and enqueued: the bank must hold all of them
                raise ValueError(f"batch of {batch} x {world} ranks (= {batch * world} keys per step, all-gathered) "
                                 f"is larger than the bank (bank_size={self.bank_size})")
            raise ValueError(f"batch of {batch} is larger than the bank (bank_size={self.bank_size})")
        for name, f, head in (("f_s", f_s, self.embed_s), ("f_t", f_t, self.embed_t)):
            if f.dtype != head.weight.dtype and not torch.is_autocast_enabled(f.device.type):
                raise TypeError(f"{name} has dtype {f.dtype} but the {name[-1]} head's weights are {head.weight.dtype}")
            if f.device != head.weight.device:
                raise ValueError(f"{name} is on {f.device} but the module is on {head.weight.device}")
        student = self.embed_s(f_s)
        teacher = self.embed_t(f_t)
        # Everything that can fail is checked before the bank is touched, so a failed call leaves it as it was.
        check_rrd_inputs(student, teacher, self.bank, self.tau_s, self.tau_t, self.objective)

        if self.layout is not None:
            return self._sharded_forward(student, teacher)

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

    def _sharded_forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        check_peers(student.shape[0], self.bank_size, self.feat_dim, layout)
        # Same choice on every rank (same config and shapes): an error is raised by all ranks together.
        _, pieces = sharded_backend(self.backend, student, self.bank, student.shape[0] * layout.world, self.bank_size)
        # One all-gather of [S | T] serves the loss (all N = B W rows against this shard) and the enqueue.
        st = all_gather_rows(torch.cat([student.detach(), teacher.detach()], dim=1))
        s_all, t_all = st[:, : self.feat_dim], st[:, self.feat_dim :]
        keys = F.normalize(t_all, dim=1, eps=NORM_EPS)  # row-wise: the rows gather_keys would have gathered
        if self.enqueue == "before":
            enqueue_sharded_(self.bank, self.bank_ptr, keys, layout.lo, self.bank_size)
            shard = self.bank
        else:
            # The backward still needs the shard as it was; the enqueue below writes into it in place.
            shard = self.bank.clone() if torch.is_grad_enabled() and student.requires_grad else self.bank
        rows = sharded_rrd_rows(student, s_all, t_all, shard, layout, pieces, self.tau_s, self.tau_t,
                                self.objective == "kl")
        if self.enqueue == "after":
            enqueue_sharded_(self.bank, self.bank_ptr, keys, layout.lo, self.bank_size)
        return reduce_rows(rows.to(loss_dtype(student.dtype)), "mean")

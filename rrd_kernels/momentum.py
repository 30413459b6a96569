"""RRDMomentumLoss: the authors' momentum-memory RRD module (heads + two per-sample memories + sampler)."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_temperature
from .functional import loss_dtype
from .gathered import SCORES, clamp_index, gathered_rrd_rows
from .momentum_memory import momentum_rows, uniform_memory
from .bank import distributed_world
from .nn import _features, _positive_int
from .reference import NORM_EPS, OBJECTIVES
from .sampler import UniformSampler, make_generator, rank_generator, to_device
from .sharded_loss import all_gather_rows
from .sharded_momentum import (MEMORY_SHARD_KEY, draw_owned, exchange, fit_state_dict, memory_layout,
                               owned_entries, share_generator, shared_seed, sharded_step, uniform_memory_range)

MOMENTUM_BACKENDS = ("auto", "torch", "triton", "cuda")  # rrd_kernels/gathered.py: GATHERED_BACKENDS
# Index dtypes that convert to int64 exactly (uint16/32/64 may not, bool is not an index).
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _momentum(value) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"nce_m must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < 1.0):  # 1 would never move the memory; NaN fails here too
        raise ValueError(f"nce_m (the memory momentum) must be in [0, 1), got {value}")
    return value


def _gather_update(y, s_unit, t_unit, valid, z_used, z, world: int):
    """Every rank's update inputs, concatenated in rank order: two all-gathers, W B int64 indices (an index
    whose sample is invalid travels as -1) and W B x 2D embeddings; in "faithful" mode one all-reduce of the
    2 Z constants, of which only the entries still unset take the ranks' mean. On the device, no sync."""
    code = y if valid is None else torch.where(valid, y, torch.full_like(y, -1))
    code = all_gather_rows(code)
    st = all_gather_rows(torch.cat([s_unit, t_unit], dim=1))
    d = s_unit.shape[1]
    valid_all = None if valid is None else code >= 0
    if z_used is not None:
        mean = z_used.clone()
        torch.distributed.all_reduce(mean)
        z_used = torch.where(z < 0, mean / world, z_used)
    return code.clamp_min(0), st[:, :d], st[:, d:], valid_all, z_used


class RRDMomentumLoss(nn.Module):
    """Relational Representation Distillation with the authors' momentum memory (their
    RRD_MomentumMemory_Loss with its ContrastMemory, CRD-style).

    ``forward(f_s, f_t, idx, contrast_idx=None)``: f_s, f_t are B x s_dim / B x t_dim features (or pooled
    B x C x 1 x 1 maps), idx the B dataset indices of the samples. The heads ``embed_s``, ``embed_t``
    (nn.Linear to feat_dim) give embeddings s_i, t_i, unit-normalised. Each sample meets K+1 = nce_k + 1
    memory rows: its own, idx_i, first, then nce_k rows drawn uniformly with replacement from [0, n_data)
    (or the caller's ``contrast_idx``). Scores are cross-view: the student against the teacher memory, the
    teacher against the student memory; the loss is the mean over the batch of the soft cross-entropy of the
    student's softmax (tau_s) to the teacher's (tau_t). Then, under no_grad, the rows idx_i of both memories
    move toward the batch's unit embeddings with momentum nce_m and are renormalised (memory_s toward s_i,
    memory_t toward t_i). The loss uses the memories as they were before this update.

    scores="similarity" (default): logits are the scores themselves over the temperatures, the function
        the paper writes down.
    scores="faithful": the authors' code exactly: each score becomes exp(score / nce_t) / Z, then is divided
        by tau_s or tau_t inside the softmax. Z (one per view) is fixed on the first call to
        n_data * mean exp(score / nce_t) over that batch, as theirs, but on the device (no .item()): the
        buffer ``z`` holds (Z_s, Z_t), -1 until set, and is saved in the state_dict.

    Gradients, as the authors': only the student head (and f_s) learns. The teacher's scores are detached
    (embed_t gets no gradient) and the memories are buffers. objective="kl" subtracts the teacher's entropy
    (same gradient). Every call updates the memories, in training or eval mode, as theirs does.

    Defaults follow the authors' train_student.py where they have one: feat_dim 128, nce_k 16384, nce_t
    0.07, nce_m 0.5. tau_s 0.04, tau_t 0.1 are the paper's (as RRDLoss); their script's defaults are tau_s
    0.1, tau_t 0.02. n_data (the training set size: one memory row per sample) has no default. nce_k + 1 may
    exceed n_data (draws are with replacement).

    idx: B integers (int64, int32, int16, int8 or uint8), on the CPU or the module's device. contrast_idx:
    B x (nce_k + 1) with the sample's own index first, as the authors' data sets return it (used as given,
    column 0 is not overwritten), or B x nce_k, the negatives only (idx is put in front, as the sampler
    does). An index outside [0, n_data) is never read or written out of bounds: on the CPU (a data loader's
    usual output) it is a ValueError, checked for free; on a GPU it is not checked (that would synchronise
    with the device): it is clamped on the device, that sample's loss row and gradient row are NaN (so the
    returned mean is NaN), it does not count towards Z, and its memory row is not written.

    State: buffers ``memory_s`` (student embeddings, their memory_v1), ``memory_t`` (teacher, memory_v2),
    both n_data x feat_dim, uniform in [-stdv, stdv] with stdv = 1 / sqrt(feat_dim / 3) at init, and ``z``;
    the sampler's generator state as the module's extra state. A resumed run draws the same indices.
    generator: None (a CPU generator seeded from torch's global generator), an int seed, or a CPU
    torch.Generator. A call that raises leaves memories, z and the sampler as they were.

    backend: "auto" or "torch": the chunked torch path (rrd_kernels/gathered.py) that never holds the
    B x (K+1) x D gathered rows. backend "triton" or "cuda": the fused gathered kernels of Triton or CUDA
    C++ (scores "similarity", fp32; "auto" takes triton, then cuda, for CUDA tensors they can run, else
    torch).

    gather_distributed (default True): under an initialised torch.distributed process group of W > 1 ranks,
    the memory update sees every rank's batch: the B indices and the B x D unit embeddings of both views are
    all-gathered in rank order and every rank applies the update of the concatenated W B samples, so every
    rank holds the same memories (as one process running the concatenated batch's update). A sample index
    met more than once in that batch takes its last occurrence's update in rank order (within a rank, batch
    order), the single-process rule. The loss uses the local batch against the memories before the update.
    Every rank must pass the same batch size (as RRDLoss; the all-gather fails otherwise). In "faithful"
    mode, the Z still unset are set on each rank from its local batch for that call's loss, then averaged
    over the ranks, so every rank keeps the same z (that of the concatenated batch when all rows are
    valid). False: each rank updates its memories with its own batch only.
    Draws under a process group (at construction): with generator None or an int seed, rank r draws from a
    generator whose seed is mixed with r (rank 0 keeps the seed as given, the single-process draws), so the
    ranks' negatives do not coincide; a torch.Generator passed in is used as given on every rank (seed it
    per rank yourself). The state_dict holds this rank's sampler state: save and restore it per rank.

    shard_memory (default False): the memories sharded across the ranks of an initialised process group of W
    ranks (built after init_process_group; needs gather_distributed=True and n_data >= W): rank r stores rows
    [lo_r, hi_r) of memory_s and memory_t (``layout``: contiguous, the torch.tensor_split sizes), scores the
    entries of the global batch's index that it owns, and the per-row softmax states are merged across the
    ranks exactly; each step is that of one process running the concatenated global batch (W B rows, rank
    order) with the same memory rows per sample: per-rank loss and gradient of its rows, the memory update, Z from the W B x (nce_k + 1) scores.
    Drawn negatives: uniform with replacement as unsharded, but drawn per slice (how many of each row's
    nce_k fall in each slice, from one generator shared by all ranks, then each rank its own rows), so no
    rank draws the whole global batch's; they are not the unsharded sampler's numbers. The generator must be
    the same on every rank (None: rank 0's seed; an int or a torch.Generator: checked at construction).
    idx and contrast_idx must be CPU tensors (a given contrast_idx is all-gathered and each rank finds the
    entries it owns on the host). Backend torch only. The state_dict holds this rank's rows and
    ``memory_shard_range`` [lo, hi, n_data]; it loads full memories (keeping its rows) and
    rrd_kernels.reshard_memory_state turns the per-rank state_dicts into those of any other W (or one
    process). docs/momentum-memory.md ("Sharded memories").
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        feat_dim: int = 128,
        n_data: int | None = None,
        nce_k: int = 16384,
        tau_s: float = 0.04,
        tau_t: float = 0.1,
        nce_m: float = 0.5,
        nce_t: float = 0.07,
        scores: str = "similarity",
        objective: str = "ce",
        backend: str = "auto",
        generator=None,
        gather_distributed: bool = True,
        shard_memory: bool = False,
    ):
        super().__init__()
        self.s_dim = _positive_int(s_dim, "s_dim")
        self.t_dim = _positive_int(t_dim, "t_dim")
        self.feat_dim = _positive_int(feat_dim, "feat_dim")
        if n_data is None:
            raise ValueError("n_data is required: the number of training samples (one memory row each)")
        self.n_data = _positive_int(n_data, "n_data")
        self.nce_k = _positive_int(nce_k, "nce_k")
        self.tau_s = check_temperature(tau_s, "tau_s")
        self.tau_t = check_temperature(tau_t, "tau_t")
        self.nce_t = check_temperature(nce_t, "nce_t")
        self.nce_m = _momentum(nce_m)
        check_choice(scores, "scores", SCORES)
        check_choice(objective, "objective", OBJECTIVES)
        if backend not in MOMENTUM_BACKENDS:
            raise ValueError(f"backend must be one of {list(MOMENTUM_BACKENDS)} for RRDMomentumLoss, got {backend!r}")
        if backend in ("triton", "cuda") and scores == "faithful":
            raise ValueError(f"backend={backend!r} computes scores='similarity' only: use backend='auto' or "
                             "'torch' for scores='faithful'")
        self.scores, self.objective, self.backend = scores, objective, backend
        self.gather_distributed = bool(gather_distributed)
        # The layout is fixed at construction: the buffers' sizes depend on it.
        self.layout = memory_layout(self.n_data, self.gather_distributed, backend) if shard_memory else None
        if self.layout is not None:
            self.sampler = UniformSampler(self.n_data, self.nce_k, make_generator(generator))
            share_generator(self.sampler.generator, given=generator is not None)
        else:
            world = distributed_world()
            rank = torch.distributed.get_rank() if world > 1 else 0
            self.sampler = UniformSampler(self.n_data, self.nce_k, rank_generator(generator, rank))
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        for name in ("memory_s", "memory_t"):
            if self.layout is None:
                self.register_buffer(name, uniform_memory(self.n_data, feat_dim))
            else:  # one seed (rank 0's) fixes both global memories, whatever W; no rank forms n_data x D
                rows = uniform_memory_range(self.n_data, feat_dim, self.layout.lo, self.layout.hi, shared_seed())
                self.register_buffer(name, rows)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t), "faithful" only; < 0: not set yet

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, tau_s={self.tau_s}, "
                f"tau_t={self.tau_t}, nce_m={self.nce_m}, nce_t={self.nce_t}, scores={self.scores!r}, "
                f"objective={self.objective!r}, backend={self.backend!r}, gather_distributed={self.gather_distributed}"
                + (f", shard_memory rows [{self.layout.lo}, {self.layout.hi}) of {self.layout.world} ranks"
                   if self.layout is not None else ""))

    @property
    def memory_is_sharded(self) -> bool:
        return self.layout is not None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout is not None:
            destination[prefix + MEMORY_SHARD_KEY] = torch.tensor([self.layout.lo, self.layout.hi, self.n_data])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict passes its own shallow copy of the caller's dict: replacing entries is safe.
        fit_state_dict(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self):
        return {"sampler_state": self.sampler.get_state()}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "sampler_state" not in state:
            raise ValueError("extra state of RRDMomentumLoss must be a dict with 'sampler_state'")
        self.sampler.set_state(state["sampler_state"])

    def sample_contrast_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """The B x (nce_k + 1) memory rows forward would use without contrast_idx: idx first, then nce_k
        uniform draws. Advances the sampler (the next forward draws the next ones)."""
        if self.layout is not None:
            raise ValueError("sample_contrast_idx: with shard_memory=True the draws cover the whole global batch "
                             "and are made inside forward (pass contrast_idx to forward to choose them)")
        y, _ = self._index(idx, "idx", (None,), self.memory_s.device)
        return torch.cat([y[:, None], self.sampler.draw(y.shape[0], y.device)], dim=1)

    def _index(self, x, name: str, shape, device):
        """x as int64 on device; True when its values were checked (a CPU tensor), False when they will be
        clamped and masked on the device. ``shape`` entries None match any size."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer indices, got {type(x).__name__}")
        if x.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} must be an integer tensor {INDEX_DTYPES}, got {x.dtype}")
        if x.dim() != len(shape) or any(w is not None and w != d for w, d in zip(shape, x.shape)):
            want = "(" + ", ".join("B" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (B = 0)")
        if x.device.type == "cpu":
            lo, hi = int(x.min()), int(x.max())  # host tensor: no device involved
            if lo < 0 or hi >= self.n_data:
                raise ValueError(f"{name} holds indices outside [0, n_data={self.n_data}): min {lo}, max {hi}")
            return to_device(x.to(torch.int64), device), True
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}; it must be on the CPU or on the module's device {device}")
        return x.to(torch.int64), False

    def _contrast(self, contrast_idx, y, batch: int, device):
        """The B x (nce_k + 1) rows from the caller's contrast_idx: as given, or idx put before negatives."""
        k = self.nce_k
        shape = tuple(contrast_idx.shape) if isinstance(contrast_idx, torch.Tensor) else None
        if shape == (batch, k):
            negatives, checked = self._index(contrast_idx, "contrast_idx", (batch, k), device)
            return torch.cat([y[:, None], negatives], dim=1), checked
        if shape is not None and len(shape) == 2 and shape != (batch, k + 1):
            raise ValueError(f"contrast_idx must be (B, nce_k + 1) = ({batch}, {k + 1}) with the sample's own "
                             f"index first, or (B, nce_k) = ({batch}, {k}), negatives only; got {shape}")
        return self._index(contrast_idx, "contrast_idx", (batch, k + 1), device)

    def _features(self, f_s, f_t):
        f_s = _features(f_s, "f_s", self.s_dim)
        f_t = _features(f_t, "f_t", self.t_dim)
        if f_t.shape[0] != f_s.shape[0]:
            raise ValueError(f"f_s and f_t must have the same batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
        for name, f, head in (("f_s", f_s, self.embed_s), ("f_t", f_t, self.embed_t)):
            if f.dtype != head.weight.dtype and not torch.is_autocast_enabled(f.device.type):
                raise TypeError(f"{name} has dtype {f.dtype} but the {name[-1]} head's weights are {head.weight.dtype}")
            if f.device != head.weight.device:
                raise ValueError(f"{name} is on {f.device} but the module is on {head.weight.device}")
        return f_s, f_t

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout is not None:
            return self._sharded_forward(f_s, f_t, idx, contrast_idx)
        f_s, f_t = self._features(f_s, f_t)
        batch = f_s.shape[0]
        device = self.memory_s.device
        y, y_checked = self._index(idx, "idx", (batch,), device)
        valid = None  # per sample: every index it uses was in range (only tracked for unchecked device ones)
        if not y_checked:
            y, valid = clamp_index(y, self.n_data)
        index, index_checked = None, True
        if contrast_idx is not None:
            index, index_checked = self._contrast(contrast_idx, y, batch, device)
            if not index_checked:
                index, ok = clamp_index(index, self.n_data)
                valid = ok if valid is None else valid & ok

        student = self.embed_s(f_s)
        teacher = self.embed_t(f_t)
        # From here on nothing is refused: the draws advance the sampler, then the memories and z are written
        # last. Should anything still raise, the sampler is put back, so a failed call leaves no trace.
        state = self.sampler.get_state()
        try:
            if index is None:
                index = torch.cat([y[:, None], self.sampler.draw(batch, device)], dim=1)
            rows, z_used = gathered_rrd_rows(
                student, teacher, self.memory_s, self.memory_t, index, tau_s=self.tau_s, tau_t=self.tau_t,
                objective=self.objective, scores=self.scores, nce_t=self.nce_t,
                z=self.z if self.scores == "faithful" else None, valid=valid, backend=self.backend)
            loss = rows.to(loss_dtype(student.dtype)).mean()
            with torch.no_grad():
                dtype = self.memory_s.dtype
                s_unit = F.normalize(student.detach().to(dtype), dim=1, eps=NORM_EPS)
                t_unit = F.normalize(teacher.detach().to(dtype), dim=1, eps=NORM_EPS)
                world = distributed_world() if self.gather_distributed else 1
                if world > 1:
                    y, s_unit, t_unit, valid, z_used = _gather_update(y, s_unit, t_unit, valid, z_used,
                                                                      self.z, world)
                # A sample with any out-of-range index (device inputs only) does not write its row.
                new_s = momentum_rows(self.memory_s, y, s_unit, self.nce_m, valid)
                new_t = momentum_rows(self.memory_t, y, t_unit, self.nce_m, valid)
        except BaseException:
            self.sampler.set_state(state)
            raise
        self._write(y, new_s, new_t, z_used)
        return loss

    @torch.no_grad()
    def _write(self, rows, new_s, new_t, z_used) -> None:
        """The step's only writes, after everything that can fail: memory rows, then z."""
        self.memory_s.index_copy_(0, rows, new_s)
        self.memory_t.index_copy_(0, rows, new_t)
        if z_used is not None:
            self.z.copy_(z_used)

    def _sharded_forward(self, f_s, f_t, idx, contrast_idx) -> torch.Tensor:
        """shard_memory=True (rrd_kernels/sharded_momentum.py). A rank whose inputs are refused tells the
        others in the step's header exchange, so every rank raises together and none is left waiting."""
        if distributed_world() != self.layout.world:
            raise RuntimeError(f"RRDMomentumLoss(shard_memory=True) was built for {self.layout.world} ranks, the "
                               f"process group now has {distributed_world()}")
        cpu = torch.device("cpu")
        error = y = index = student = teacher = None
        batch, need_grad = 0, False
        try:
            f_s, f_t = self._features(f_s, f_t)
            batch = f_s.shape[0]
            for name, x in (("idx", idx), ("contrast_idx", contrast_idx)):
                if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                    raise ValueError(f"{name} must be a CPU tensor with shard_memory=True, got one on {x.device}: "
                                     f"each rank finds the global batch's entries it owns on the host (free there; "
                                     f"on the device it would synchronise)")
            y, _ = self._index(idx, "idx", (batch,), cpu)
            if contrast_idx is not None:
                index, _ = self._contrast(contrast_idx, y, batch, cpu)
            student = self.embed_s(f_s)
            teacher = self.embed_t(f_t)
            need_grad = torch.is_grad_enabled() and student.requires_grad
        except (TypeError, ValueError, RuntimeError) as e:
            error = e
        y_all, index_all = exchange(self, batch, y, index, need_grad, error)
        state = self.sampler.get_state()
        try:
            if index_all is None:
                row, local = draw_owned(self.sampler.generator, self.layout, y_all, self.nce_k)
            else:
                row, local = owned_entries(index_all, self.layout)
            rows, z_used, target, new_s, new_t = sharded_step(self, student, teacher, y_all, row, local, need_grad)
            loss = rows.to(loss_dtype(student.dtype)).mean()
        except BaseException:
            self.sampler.set_state(state)
            raise
        self._write(target, new_s, new_t, z_used)
        return loss

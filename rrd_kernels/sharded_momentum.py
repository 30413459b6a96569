"""RRDMomentumLoss(shard_memory=True): the two momentum memories sharded across the ranks of a process group.

Layout: rank r of W holds rows [lo_r, hi_r) of both memory_s and memory_t (ShardLayout of shard_bank.py,
the torch.tensor_split layout: contiguous, the first n_data mod W ranks one row more). Every step is the
step of one process running the concatenated global batch (W B rows, rank order) against the whole memories,
with the same memory rows per sample.

Per step, on every rank (N = W B rows, K1 = nce_k + 1 columns; docs/momentum-memory.md has the bytes):

    host    all-gather a header (shapes, options, refusals) and the indices: W B idx, or the W B x K1
            contrast_idx when the caller gives it (over gloo, host tensors: no device sync)
            this rank's entries (global row, row of the slice): drawn, the rows' own indices in [lo, hi)
            and the negatives that fall in the slice (draw_owned: counts per slice from the generator all
            ranks share, then each rank its own rows); given, the contrast_idx entries in [lo, hi)
    device  all-gather the raw embeddings [s | t] of the N rows                                   O(B W D)
            scores of this rank's entries only; "faithful": all-reduce the 2 sums of exp(score / nce_t)
            per-row partial softmax state over these entries (lse_a, lse_b, u, v); all-to-all to the
            rows' owners; merged exactly                                                           O(B W)
            gradient: all-gather the merged LSEs; partial sums of (q - p) da/dS memory_t rows for all N
            rows; reduce-scatter to the owners                                                     O(B W D)
            update: each rank writes the rows of the global batch's samples that lie in [lo, hi)

No B x K1 x D tensor is formed and no memory row moves between ranks: the traffic does not grow with K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .gathered import compute_dtype
from .momentum_memory import momentum_rows
from .reference import NORM_EPS
from .sampler import to_device
from .shard_bank import ShardLayout, check_tiling, seeded_rows_range
from .sharded_loss import _host_group, all_gather_rows, all_to_all_rows, reduce_scatter_rows
from .sharded_reference import merge_row_states

MEMORY_SHARD_KEY = "memory_shard_range"  # state_dict entry of a sharded module: int64 [lo, hi, n_data]
MEMORY_NAMES = ("memory_s", "memory_t")
# Elements of one gathered E_c x D slice of a memory (as gathered.GATHER_ELEMENTS: 16 MiB in fp32).
ENTRY_ELEMENTS = 1 << 22


def uniform_memory_range(n: int, dim: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Rows [lo, hi) of an n x dim memory uniform in [-stdv, stdv], stdv = 1 / sqrt(dim / 3) (the authors'
    law, as uniform_memory), fixed by ``seed`` alone: the same global memory for any number of ranks."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return seeded_rows_range(n, dim, lo, hi, seed,
                             lambda rows, d, g: torch.rand(rows, d, generator=g).mul_(2 * stdv).add_(-stdv))


def _world() -> tuple[int, int] | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(), dist.get_rank()


def memory_layout(n_data: int, gather_distributed: bool, backend: str) -> ShardLayout:
    """The layout of a module built with shard_memory=True, or a ValueError naming what forbids it."""
    if not gather_distributed:
        raise ValueError("shard_memory=True needs gather_distributed=True: each rank's memory rows take the "
                         "updates of every rank's batch")
    if backend == "triton":
        raise ValueError("backend='triton' has no sharded path: shard_memory=True runs on backend 'torch' "
                         "(or 'auto')")
    group = _world()
    if group is None:
        raise ValueError("shard_memory=True needs an initialised torch.distributed process group: call "
                         "init_process_group before building RRDMomentumLoss")
    world, rank = group
    if n_data < world:
        raise ValueError(f"n_data={n_data} is smaller than the {world} ranks the memories are sharded over "
                         f"(shard_memory=True): every rank must hold at least one row")
    return ShardLayout(n_data, world, rank)


def share_generator(generator: torch.Generator, given: bool) -> None:
    """Make the sampler's generator the same on every rank (a collective, at construction): the negatives
    of the whole global batch are drawn on every rank alike. generator None (given False): every rank takes
    rank 0's state. An int seed or a torch.Generator (given True): every rank must already agree."""
    state = generator.get_state()
    table = all_gather_rows(state[None], _host_group())
    if not given:
        generator.set_state(table[0].clone())
        return
    differ = [r for r in range(table.shape[0]) if not torch.equal(table[r], table[0])]
    if differ:
        raise ValueError(f"generator: with shard_memory=True every rank draws the same global negatives, so the "
                         f"generator must be the same on every rank (the same int seed, or generators in the "
                         f"same state); ranks {differ} differ from rank 0")


def shared_seed() -> int:
    """One number from torch's global generator, rank 0's on every rank (a collective)."""
    mine = torch.randint(0, 2**62, (1,))
    return int(all_gather_rows(mine[None], _host_group())[0, 0])


# ------------------------------------------------------------------------------------ the per-step exchange

HEADER = ("batch size", "contrast_idx given (1) or drawn (0)", "n_data", "feat_dim", "nce_k", "scores",
          "objective", "gradient needed (grad enabled and f_s requiring grad)", "world size at construction")


def exchange(module, batch: int, y, index, need_grad: bool, error):
    """Every rank's header and indices (host tensors, gloo). All ranks see the same table, so a mismatch or
    a rank's refusal (``error``: the exception its local checks raised, or None) is raised by every rank
    together, before any rank touches its memories or draws. Returns (y_all, index_all or None)."""
    layout = module.layout
    row = [batch, int(index is not None), module.n_data, module.feat_dim, module.nce_k,
           int(module.scores == "faithful"), int(module.objective == "kl"), int(need_grad), layout.world]
    group = _host_group()
    table = all_gather_rows(torch.tensor([[int(error is not None)] + row], dtype=torch.int64), group).tolist()
    refused = [r for r, t in enumerate(table) if t[0]]
    if refused:
        if error is not None:
            raise error
        raise ValueError(f"shard_memory=True: rank(s) {refused} refused their inputs this step (their errors say "
                         f"why); no rank drew or touched its memories")
    for col, what in enumerate(HEADER):
        values = [t[col + 1] for t in table]
        if len(set(values)) > 1:
            raise ValueError(f"shard_memory=True: ranks passed different {what}: {values} (rank order); every "
                             f"rank must pass the same in each step")
    payload = y[:, None] if index is None else index
    gathered = all_gather_rows(payload, group)
    return gathered[:, 0].contiguous(), (None if index is None else gathered)


def owned_entries(index_all: torch.Tensor, layout: ShardLayout):
    """(row, local) of the entries of the N x K1 host index that this rank holds, row-major: the global row
    each belongs to and its row in this rank's slice. Host work, O(N K1)."""
    owned = (index_all >= layout.lo) & (index_all < layout.hi)
    return owned.nonzero()[:, 0].contiguous(), index_all[owned] - layout.lo


def shard_counts(generator: torch.Generator, n_rows: int, k: int, layout: ShardLayout) -> torch.Tensor:
    """n_rows x W: how many of each row's k uniform draws over [0, n_data) fall in each rank's slice, a
    multinomial over the slices (weights size_r / n_data) drawn as a chain of binomials: W - 1 binomials
    per row, the same on every rank (the generator is shared)."""
    remaining = torch.full((n_rows,), float(k), dtype=torch.float64)
    left, counts = layout.K, []
    for r in range(layout.world - 1):
        size = layout.of_rank(r).size
        c = torch.binomial(remaining, torch.full_like(remaining, size / left), generator=generator)
        counts.append(c)
        remaining = remaining - c
        left -= size
    counts.append(remaining)
    return torch.stack(counts, dim=1).to(torch.int64)


def draw_owned(generator: torch.Generator, layout: ShardLayout, y_all: torch.Tensor, k: int):
    """(row, local) of this rank's entries of the global batch with drawn negatives: the rows' own indices
    y_all that lie in this slice, then the draws that fall in it. The k negatives of each of the N rows are
    uniform over [0, n_data) with replacement, as the unsharded sampler's, drawn per slice: the counts per
    slice from the shared generator (shard_counts), then one seed per rank from it, and rank r draws its
    count of rows uniformly in its slice from a generator with its seed. Every rank advances the shared
    generator alike, so the sampler state stays the same on every rank; host work O(N W + B k) per rank,
    not O(N k). The N x (k + 1) index is not the unsharded sampler's draw (the same law, other numbers)."""
    n_rows = y_all.shape[0]
    counts = shard_counts(generator, n_rows, k, layout)[:, layout.rank]
    seeds = torch.randint(0, 2**62, (layout.world,), generator=generator)
    own = (y_all >= layout.lo) & (y_all < layout.hi)
    local_gen = torch.Generator().manual_seed(int(seeds[layout.rank]))
    drawn = torch.randint(0, layout.size, (int(counts.sum()),), generator=local_gen)
    row = torch.cat([own.nonzero()[:, 0], torch.repeat_interleave(torch.arange(n_rows), counts)])
    return row, torch.cat([y_all[own] - layout.lo, drawn])


# ------------------------------------------------------------------------------------ the loss over entries

@dataclass(frozen=True)
class StepOptions:
    tau_s: float
    tau_t: float
    kl: bool
    faithful: bool
    nce_t: float
    n_data: int
    n_cols: int  # K1: the columns of the global index (Z's mean runs over N x K1 scores)
    need_grad: bool


def _entry_dots(memory, local, emb, row, dtype):
    """emb[row_e] . memory[local_e] for each entry, chunk by chunk (one E_c x D slice of each alive)."""
    out = torch.empty(local.shape[0], dtype=dtype, device=emb.device)
    step = max(1, ENTRY_ELEMENTS // max(1, emb.shape[1]))
    for c0 in range(0, local.shape[0], step):
        c1 = min(c0 + step, local.shape[0])
        out[c0:c1] = (memory.index_select(0, local[c0:c1]).to(dtype) * emb.index_select(0, row[c0:c1])).sum(1)
    return out


def _row_lse(x, row, n):
    """Per row, log-sum-exp of the entries x_e with row_e == row (-inf for a row with none here)."""
    top = x.new_full((n,), float("-inf")).scatter_reduce(0, row, x, "amax")
    total = x.new_zeros(n).index_add_(0, row, torch.exp(x - top[row]))
    return top + total.log()


class _ShardedGatheredRRD(torch.autograd.Function):
    """This rank's B loss rows of the global batch against memories sharded over the ranks. As in
    gathered._GatheredRRD, the gradient with respect to the unit student rows is formed in the forward (the
    module overwrites memory rows right after the loss); so the backward is local, no collective."""

    @staticmethod
    def forward(ctx, s, s_all, t_all, memory_s, memory_t, row, local, z, opts: StepOptions):
        dtype = s.dtype
        N, B = s_all.shape[0], s.shape[0]
        S = _entry_dots(memory_t, local, s_all, row, dtype)  # student against the teacher memory
        T = _entry_dots(memory_s, local, t_all, row, dtype)
        z_used = s.new_empty(0)
        if opts.faithful:
            S, T = torch.exp(S / opts.nce_t), torch.exp(T / opts.nce_t)
            sums = torch.stack([S.sum(), T.sum()])
            dist.all_reduce(sums)
            z_new = (sums / (N * opts.n_cols) * opts.n_data).to(z.dtype)
            z_used = torch.where(z < 0, z_new, z)
            zc = z_used.to(dtype)
            a, b = S / (zc[0] * opts.tau_s), T / (zc[1] * opts.tau_t)
        else:
            a, b = S / opts.tau_s, T / opts.tau_t
        del S, T
        lse_a, lse_b = _row_lse(a, row, N), _row_lse(b, row, N)
        p = torch.exp(b - lse_b[row])
        u = a.new_zeros(N).index_add_(0, row, p * a)
        v = a.new_zeros(N).index_add_(0, row, p * b) if opts.kl else torch.zeros_like(u)
        world = N // B
        planes = torch.stack([lse_a, lse_b, u, v])  # [4, N]: the rows of every rank, rank-major
        recv = all_to_all_rows(planes.view(4, world, B).transpose(0, 1))  # [W, 4, B]: my rows, every rank's part
        rows, my_lse_a, my_lse_b = merge_row_states(recv, opts.kl)
        if opts.need_grad:
            lse = all_gather_rows(torch.stack([my_lse_a, my_lse_b], dim=1))  # N x 2, merged
            coef = torch.exp(a - lse[row, 0]) - torch.exp(b - lse[row, 1])
            # d a / d S: 1 / tau_s, or for exp(S / nce_t) / (Z tau_s) the value itself over nce_t.
            coef = coef * (a / opts.nce_t) if opts.faithful else coef / opts.tau_s
            acc = s_all.new_zeros(N, s_all.shape[1])
            step = max(1, ENTRY_ELEMENTS // max(1, s_all.shape[1]))
            for c0 in range(0, local.shape[0], step):
                c1 = min(c0 + step, local.shape[0])
                rows_t = memory_t.index_select(0, local[c0:c1]).to(dtype)
                acc.index_add_(0, row[c0:c1], coef[c0:c1, None] * rows_t)
            ctx.save_for_backward(reduce_scatter_rows(acc))  # B x D: this rank's rows, summed over ranks
        ctx.mark_non_differentiable(z_used)
        return rows, z_used

    @staticmethod
    def backward(ctx, grad_rows, _grad_z):
        (grad,) = ctx.saved_tensors
        return (grad_rows[:, None] * grad,) + (None,) * 8


def sharded_step(module, student, teacher, y_all, row, local, need_grad: bool):
    """The loss rows of this rank's batch and the memory rows to write (rows of this rank's slice), from this
    rank's entries (row, local) of the global batch (host tensors). Nothing is written here. Returns (rows,
    z_used or None, slice_rows, new_s, new_t)."""
    layout = module.layout
    device = module.memory_s.device
    row, local = to_device(row, device), to_device(local, device)
    dtype = compute_dtype(student.dtype, module.memory_s.dtype)
    D = module.feat_dim
    with torch.autocast(device_type=device.type, enabled=False):
        raw = all_gather_rows(torch.cat([student.detach(), teacher.detach()], dim=1).to(dtype))
        s_all = F.normalize(raw[:, :D], dim=1, eps=NORM_EPS)  # row-wise: the ranks' own unit rows
        t_all = F.normalize(raw[:, D:], dim=1, eps=NORM_EPS)
        s = F.normalize(student.to(dtype), dim=1, eps=NORM_EPS)
        opts = StepOptions(module.tau_s, module.tau_t, module.objective == "kl", module.scores == "faithful",
                           module.nce_t, module.n_data, module.nce_k + 1, need_grad)
        z = module.z if opts.faithful else None
        rows, z_used = _ShardedGatheredRRD.apply(s, s_all, t_all, module.memory_s.detach(),
                                                 module.memory_t.detach(), row, local, z, opts)
        with torch.no_grad():
            mdtype = module.memory_s.dtype
            s_unit = F.normalize(raw[:, :D].to(mdtype), dim=1, eps=NORM_EPS)
            t_unit = F.normalize(raw[:, D:].to(mdtype), dim=1, eps=NORM_EPS)
            # Every sample of the global batch takes part: one whose row lies elsewhere is sent to the
            # nearest row of this slice and marked not owned, so momentum_rows gives it that row's final
            # value (the last owned occurrence's update, else the row as it is): duplicates agree.
            target = to_device(y_all, device) - layout.lo
            mine = (target >= 0) & (target < layout.size)
            target = target.clamp(0, layout.size - 1)
            new_s = momentum_rows(module.memory_s, target, s_unit, module.nce_m, mine)
            new_t = momentum_rows(module.memory_t, target, t_unit, module.nce_m, mine)
    return rows, (z_used if opts.faithful else None), target, new_s, new_t


# ------------------------------------------------------------------------------------------- checkpoints

def _range_of(sd: dict, prefix: str, i: int):
    """(lo, hi, n_data) of a state_dict: its memory_shard_range, or [0, rows) for an unsharded one."""
    key = prefix + MEMORY_SHARD_KEY
    mem = sd.get(prefix + "memory_s")
    if mem is None or prefix + "memory_t" not in sd:
        raise ValueError(f"state_dicts[{i}] has no {prefix}memory_s / memory_t: not an RRDMomentumLoss state_dict")
    if key not in sd:
        return 0, mem.shape[0], mem.shape[0]
    lo, hi, n = (int(v) for v in sd[key])
    for name in MEMORY_NAMES:
        if sd[prefix + name].shape[0] != hi - lo:
            raise ValueError(f"state_dicts[{i}]: {name} has {sd[prefix + name].shape[0]} rows but its range is "
                             f"[{lo}, {hi})")
    return lo, hi, n


def _sampler_state(sd: dict, prefix: str):
    extra = sd.get(prefix + "_extra_state")
    return extra.get("sampler_state") if isinstance(extra, dict) else None


def reshard_memory_state(state_dicts: list, world: int = 1, rank: int = 0, prefix: str = "") -> dict:
    """The state_dict that rank ``rank`` of ``world`` loads, from every rank's state_dict of a sharded
    RRDMomentumLoss saved with any number of ranks (any order; an unsharded state_dict counts as one rank
    holding every row). world=1: the unsharded state_dict (full memories), loadable by shard_memory=False
    or by a sharded module of any W. Offline: no process group. Only the rows [lo, hi) of the new rank are
    copied; with files loaded by torch.load(path, mmap=True) only those rows are read from disk. Every
    entry but the memories comes from the first state_dict; z and the sampler state must agree across
    them (one checkpoint)."""
    if not isinstance(state_dicts, (list, tuple)) or not state_dicts:
        raise ValueError("state_dicts must be a non-empty list: every rank's state_dict")
    pieces = sorted((_range_of(sd, prefix, i) + (i,) for i, sd in enumerate(state_dicts)))
    n = check_tiling(pieces, "memory (n_data)")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts):
        key = prefix + "z"
        if key in first and not torch.equal(sd[key], first[key]):
            raise ValueError(f"state_dicts[{i}] has {key} {sd[key].tolist()}, state_dicts[0] "
                             f"{first[key].tolist()}: not one checkpoint")
        mine, theirs = _sampler_state(sd, prefix), _sampler_state(first, prefix)
        if theirs is not None and (mine is None or not torch.equal(mine, theirs)):
            raise ValueError(f"state_dicts[{i}] has another sampler state than state_dicts[0]: not one checkpoint "
                             f"(a sharded module's sampler is the same on every rank)")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or world > n:
        raise ValueError(f"world must be an int in [1, n_data={n}], got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    layout = ShardLayout(n, world, rank)
    out = {k: v for k, v in first.items() if k != prefix + MEMORY_SHARD_KEY}
    for name in MEMORY_NAMES:
        parts = [state_dicts[i][prefix + name][max(lo, layout.lo) - lo: min(hi, layout.hi) - lo]
                 for lo, hi, _, i in pieces if lo < layout.hi and hi > layout.lo]
        out[prefix + name] = torch.cat(parts).clone()
    if world > 1:
        out[prefix + MEMORY_SHARD_KEY] = torch.tensor([layout.lo, layout.hi, n])
    return out


def fit_state_dict(module, state_dict: dict, prefix: str, error_msgs: list) -> None:
    """Prepare a state_dict for module's own load (in place on load_state_dict's copy): a full memory loads
    into a sharded module by keeping its rows; a slice loads only where its range is this module's. Any other
    slice is refused (an entry in error_msgs, so load_state_dict raises) and memories, z and the sampler
    are kept as they are."""
    saved = state_dict.pop(prefix + MEMORY_SHARD_KEY, None)
    layout = module.layout
    lo, hi = (layout.lo, layout.hi) if layout is not None else (0, module.n_data)
    if saved is not None:
        saved = tuple(int(v) for v in saved)
        if saved != (lo, hi, module.n_data):
            error_msgs.append(
                f"{prefix}memory_s/memory_t hold rows [{saved[0]}, {saved[1]}) of n_data={saved[2]} (one rank of a "
                f"sharded module); this module needs rows [{lo}, {hi}) of {module.n_data}: pass every rank's "
                f"state_dict through rrd_kernels.reshard_memory_state(state_dicts, world=..., rank=...) and load that")
            for name in MEMORY_NAMES + ("z",):
                state_dict[prefix + name] = getattr(module, name)
            state_dict[prefix + "_extra_state"] = module.get_extra_state()
        return
    if layout is not None:
        for name in MEMORY_NAMES:
            full = state_dict.get(prefix + name)
            if isinstance(full, torch.Tensor) and full.dim() == 2 and full.shape[0] == module.n_data:
                state_dict[prefix + name] = full[lo:hi]

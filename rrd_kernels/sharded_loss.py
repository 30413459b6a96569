"""The RRD loss against a bank sharded across the ranks of the default process group.

Per step, on every rank (N = B x W rows of the global batch; the backend's pieces are in backends.py):

    forward   all-gather [S | T] (B x 2D per rank; by the caller, who enqueues T too)    O(B W D)
              partial state of all N rows over this shard (forward_partial)
              all-to-all: each row's state goes to the rank owning the row             O(B W P)
              merge the W states of this rank's B rows -> loss rows, LSEs, ref
              all-gather the LSEs and ref of all N rows (the backward needs them)       O(B W)
    backward  partial sums acc, sigma of all N rows over this shard (backward_partial)
              this rank adds, for each row whose reference bank row it owns, that row
              reduce-scatter [acc | sigma | Q_ref] to the rows' owners                  O(B W D)
              finish: rounding guard with the global Q_ref, Jacobian (backward_finish)

The bank never moves. The backward is a collective: every rank must run it (as with DDP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .shard_bank import ShardLayout

_HOST_GROUPS: dict = {}


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's x (same shape on all ranks) concatenated along dim 0 in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def all_to_all_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """x [W, ...]: block r goes to rank r; returns [W, ...] with block r from rank r."""
    x = x.contiguous()
    out = torch.empty_like(x)  # like the contiguous copy: empty_like keeps a view's permuted strides
    dist.all_to_all_single(out, x, group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """x [W n, ...] summed over ranks; rank r gets rows [r n, (r + 1) n)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // world
    x = x.contiguous()
    out = x.new_empty((n, *x.shape[1:]))
    if hasattr(dist, "reduce_scatter_single"):
        dist.reduce_scatter_single(out, x, group=group)
    elif dist.get_backend(group) != "gloo":
        dist.reduce_scatter_tensor(out, x, group=group)
    else:  # older torch: gloo may lack reduce-scatter; all-reduce and keep our rows (twice the traffic)
        dist.all_reduce(x, group=group)
        out = x[rank * n : (rank + 1) * n]
    return out


def _host_group():
    """A gloo group for exchanging a few host integers without touching the device (the default group when
    it is gloo; created once, collectively, on the first sharded call otherwise)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def check_peers(batch: int, K: int, D: int, layout: ShardLayout) -> None:
    """Every rank must pass the same batch size with the same bank size and width: checked every step by an
    all-gather of three host integers (a host round trip, no device sync). A per-step check is the only kind
    that cannot hang: if only some ranks' batch size changed, a check made only on change would pair their
    small exchange with the others' data collectives. All ranks see the same table, so all raise together,
    before any rank touches its bank."""
    mine = torch.tensor([batch, K, D], dtype=torch.int64)
    table = all_gather_rows(mine[None], _host_group()).tolist()  # CPU tensors: no device sync
    for col, what in ((1, "bank_size (global K)"), (2, "feat_dim (D)")):
        values = [row[col] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"shard_bank=True: ranks were built with different {what}: {values} (rank order)")
    sizes = [row[0] for row in table]
    if len(set(sizes)) > 1:
        raise ValueError(f"shard_bank=True: ranks passed different batch sizes {sizes} (rank order); every rank "
                         f"must pass the same batch size in each step")
    if batch * layout.world > K:
        raise ValueError(f"batch of {batch} x {layout.world} ranks is larger than the bank (bank_size={K})")


class _ShardedRRD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, s_all, t_all, shard, layout, pieces, tau_s, tau_t, kl):
        B = student.shape[0]
        W = layout.world
        planes, idx = pieces.forward_partial(s_all, t_all, shard, tau_s, tau_t, layout.lo)
        P = planes.shape[0]
        # Row blocks of the global batch to their owners: [P, W B] -> [W, P, B].
        recv = all_to_all_rows(planes.view(P, W, B).transpose(0, 1))
        recv_idx = all_to_all_rows(idx.view(W, B))
        rows, lse_s, lse_t, ref = pieces.merge_states(recv, recv_idx, kl)
        if ctx.needs_input_grad[0]:
            # lse_t may hold several values per row (a [R B] slot, backends.py): gathered as R columns.
            lse_all = all_gather_rows(torch.cat([lse_s[:, None], lse_t.view(-1, B).T], dim=1))
            ref_all = all_gather_rows(ref)
            ctx.save_for_backward(s_all, t_all, shard, lse_all, ref_all)
            ctx.layout, ctx.pieces, ctx.tau_s, ctx.tau_t = layout, pieces, tau_s, tau_t
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        s_all, t_all, shard, lse_all, ref_all = ctx.saved_tensors
        layout, pieces = ctx.layout, ctx.pieces
        B = grad_rows.shape[0]
        lse_t = lse_all[:, 1:].T.reshape(-1)  # [R N], the slot's layout again
        acc, sigma = pieces.backward_partial(s_all, t_all, shard, lse_all[:, 0], lse_t, ctx.tau_s, ctx.tau_t)
        # The rounding guard needs each row's global reference row; its owner adds it, the others add 0.
        local = ref_all.to(torch.int64) - layout.lo
        owned = (local >= 0) & (local < layout.size)
        q_ref = shard.index_select(0, local.clamp(0, layout.size - 1)).to(acc.dtype)
        q_ref = torch.where(owned[:, None], q_ref, torch.zeros_like(q_ref))
        D = acc.shape[1]
        mine = reduce_scatter_rows(torch.cat([acc, sigma[:, None], q_ref], dim=1))
        student = s_all[layout.rank * B : (layout.rank + 1) * B]
        grad = pieces.backward_finish(mine[:, :D], mine[:, D], mine[:, D + 1 :], student, grad_rows, ctx.tau_s)
        return grad, None, None, None, None, None, None, None, None


def sharded_rrd_rows(student, s_all, t_all, shard, layout: ShardLayout, pieces, tau_s, tau_t, kl) -> torch.Tensor:
    """Per-row loss of this rank's B rows of ``student`` against the global bank; ``s_all``, ``t_all`` are the
    all-gathered student and teacher rows (rank order). The gradient flows to ``student`` only."""
    return _ShardedRRD.apply(student, s_all.detach(), t_all.detach(), shard.detach(), layout, pieces, tau_s, tau_t, kl)

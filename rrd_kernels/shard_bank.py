"""A FIFO memory bank sharded across ranks: layout, initialisation, enqueue, gathering and state merging.

The global bank has K rows; rank r of W stores the contiguous rows [lo_r, hi_r) (the torch.tensor_split
layout: the first K % W ranks hold one row more, so shard sizes differ by at most one). The write pointer is
global and identical on every rank. A step's all-gathered keys (rank order) are written at the pointer,
wrapping around K; each rank writes only the rows that fall in its shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Rows are drawn in fixed chunks, each from its own generator, so a shard's initial rows do not depend on W.
INIT_CHUNK = 1 << 16
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class ShardLayout:
    """Which rows of a K-row bank rank ``rank`` of ``world`` holds."""

    K: int
    world: int
    rank: int

    @property
    def lo(self) -> int:
        return self.rank * (self.K // self.world) + min(self.rank, self.K % self.world)

    @property
    def size(self) -> int:
        return self.K // self.world + (1 if self.rank < self.K % self.world else 0)

    @property
    def hi(self) -> int:
        return self.lo + self.size

    def of_rank(self, rank: int) -> "ShardLayout":
        return ShardLayout(self.K, self.world, rank)


def seeded_rows_range(K: int, D: int, lo: int, hi: int, seed: int, draw) -> torch.Tensor:
    """Rows [lo, hi) of a K x D tensor whose rows come in fixed chunks of INIT_CHUNK, chunk c drawn by
    ``draw(rows, D, generator)`` from a generator seeded from ``seed`` and c alone (not by the sharding):
    any split of [0, K) into ranges reproduces the same global tensor."""
    out = torch.empty(hi - lo, D)
    for chunk in range(lo // INIT_CHUNK, -(-hi // INIT_CHUNK)):
        c_lo, c_hi = chunk * INIT_CHUNK, min((chunk + 1) * INIT_CHUNK, K)
        g = torch.Generator().manual_seed((seed ^ (chunk * _GOLDEN)) % (1 << 63))
        rows = draw(c_hi - c_lo, D, g)
        a, b = max(lo, c_lo), min(hi, c_hi)
        out[a - lo : b - lo] = rows[a - c_lo : b - c_lo]
    return out


def random_unit_rows_range(K: int, D: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Rows [lo, hi) of a K x D bank of random unit rows determined by ``seed`` alone (seeded_rows_range)."""
    return seeded_rows_range(K, D, lo, hi, seed, lambda n, d, g: F.normalize(torch.randn(n, d, generator=g), dim=1))


def enqueue_sharded_(shard: torch.Tensor, bank_ptr: torch.Tensor, keys: torch.Tensor, lo: int, K: int) -> None:
    """Write the global ``keys`` (n x D, n <= K, rank order) at the global pointer of a K-row bank of which
    ``shard`` holds rows [lo, lo + len(shard)); advance the pointer. In place, on the device, no sync.

    Keys that belong to other shards still take part in the one index_copy_ (the number that land here is
    a device value): each is sent to the nearest row of this shard with that row's final value (the key that
    lands there this step, else its current content), so duplicate indices always carry equal values."""
    size, n = shard.shape[0], keys.shape[0]
    keys = keys.to(shard.dtype)
    target = torch.remainder(bank_ptr + torch.arange(n, device=shard.device), K)
    row = (target - lo).clamp(0, size - 1)
    lands = torch.remainder(lo + row - bank_ptr, K)  # which key (if < n) this step writes to that row
    hit = lands < n
    value = torch.where(hit[:, None], keys.index_select(0, lands.clamp(max=n - 1)), shard.index_select(0, row))
    shard.index_copy_(0, row, value)
    bank_ptr.copy_(torch.remainder(bank_ptr + n, K))


def gather_shards(shard: torch.Tensor, layout: ShardLayout, group=None) -> torch.Tensor:
    """The full K x D bank on every rank (a collective). Shards are padded to the largest size for the
    all-gather, as gloo needs equal sizes."""
    largest = layout.of_rank(0).size
    padded = shard.new_zeros(largest, shard.shape[1])
    padded[: shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(layout.world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([parts[r][: layout.of_rank(r).size] for r in range(layout.world)])


def check_tiling(pieces, what: str) -> int:
    """pieces (lo, hi, total, ...) sorted by lo must tile [0, total) of one total: a ValueError naming
    ``what`` otherwise (a rank missing, two ranks' rows overlapping, or checkpoints of different sizes)."""
    total = pieces[0][2]
    expected = 0
    for lo, hi, k, *_ in pieces:
        if k != total or lo != expected:
            raise ValueError(f"the shards do not tile one {what} of {total} rows (found rows [{lo}, {hi}) of "
                             f"{k} where row {expected} was expected)")
        expected = hi
    if expected != total:
        raise ValueError(f"the shards cover rows [0, {expected}) of a {what} of {total} rows: some rank is missing")
    return total


SHARD_KEY = "bank_shard_range"  # state_dict entry of a sharded bank: int64 [lo, hi, K]


def merge_bank_shards(state_dicts: list[dict], prefix: str = "") -> dict:
    """One unsharded RRDLoss state_dict (the full K x D bank) from the per-rank state_dicts of a sharded
    module, in any order. Offline: needs no process group. Every other entry is taken from the first."""
    if not state_dicts:
        raise ValueError("state_dicts is empty: pass every rank's state_dict")
    bank_key, ptr_key, range_key = prefix + "bank", prefix + "bank_ptr", prefix + SHARD_KEY
    pieces = []
    for i, sd in enumerate(state_dicts):
        if range_key not in sd:
            raise ValueError(f"state_dicts[{i}] has no {range_key!r}: it is not a sharded RRDLoss state_dict")
        lo, hi, K = (int(v) for v in sd[range_key])
        if sd[bank_key].shape[0] != hi - lo:
            raise ValueError(f"state_dicts[{i}]: bank has {sd[bank_key].shape[0]} rows but its range is [{lo}, {hi})")
        if not torch.equal(sd[ptr_key], state_dicts[0][ptr_key]):
            raise ValueError(f"state_dicts[{i}] has bank_ptr {sd[ptr_key].tolist()}, rank 0's "
                             f"{state_dicts[0][ptr_key].tolist()}: not one checkpoint")
        pieces.append((lo, hi, K, sd[bank_key]))
    pieces.sort(key=lambda p: p[0])
    check_tiling(pieces, "bank")
    merged = {k: v for k, v in state_dicts[0].items() if k != range_key}
    merged[bank_key] = torch.cat([p[3] for p in pieces])
    return merged

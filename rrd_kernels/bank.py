"""The memory bank: a FIFO ring buffer of teacher keys whose write pointer lives on the device.

The authors' queue asserts K % B == 0 and reads its pointer back to the host every step (a device sync).
Here the pointer is a device tensor and the write is one index_copy_ with wrapped indices: any batch size
up to K, no host-device synchronisation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def random_unit_rows(rows: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K x D random rows of unit norm (the authors normalise their init along the wrong axis)."""
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def enqueue_(bank: torch.Tensor, bank_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (n x D, n <= K) at the pointer, oldest rows first overwritten, wrapping around;
    advance the pointer. In place, on the device, no sync."""
    k = bank.shape[0]
    n = keys.shape[0]
    idx = torch.remainder(bank_ptr + torch.arange(n, device=bank.device), k)
    bank.index_copy_(0, idx, keys.to(bank.dtype))
    bank_ptr.copy_(torch.remainder(bank_ptr + n, k))


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All ranks' keys concatenated in rank order, so every rank enqueues the same rows and holds the same
    bank. Every rank must pass the same number of rows (as MoCo's concat_all_gather)."""
    world = distributed_world()
    if world == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts, dim=0)

"""Uniform draws of memory rows for the momentum-memory module, reproducible and resumable.

The authors draw nce_k rows per sample uniformly over the n_data rows, with replacement (their alias
sampler with all weights equal reduces to that; the sample's own row may be drawn too). Here the draws come
from a CPU torch.Generator so that they are the same on every device and its state can be saved in a
state_dict: a resumed run draws what the uninterrupted run would have. On a GPU the draws are written into
pinned host memory and copied asynchronously (non_blocking), so no step waits on the device.
"""
from __future__ import annotations

import numbers

import torch


def make_generator(generator) -> torch.Generator:
    """None: a CPU generator seeded from torch's global generator (torch.manual_seed fixes it); an int: a
    CPU generator with that seed; a CPU torch.Generator: used (and advanced) as given."""
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (the draws are made on the host and "
                             f"copied), got one on {generator.device}")
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be None, an int seed or a CPU torch.Generator, got {type(generator).__name__}")


# Odd 64-bit constant (2^64 / golden ratio): seed of rank r = seed XOR (r * RANK_SEED_MIX mod 2^64).
RANK_SEED_MIX = 0x9E3779B97F4A7C15


def rank_generator(generator, rank: int) -> torch.Generator:
    """make_generator for rank ``rank`` of a process group: None or an int seed gives a generator seeded with
    seed XOR (rank * RANK_SEED_MIX mod 2^64), so ranks seeded alike draw different rows (rank 0: the seed
    itself); a torch.Generator is used as given (its caller chose its seed)."""
    if rank == 0 or isinstance(generator, torch.Generator):
        return make_generator(generator)
    seed = make_generator(generator).initial_seed()
    return torch.Generator().manual_seed(seed ^ ((rank * RANK_SEED_MIX) % 2**64))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without a host-device sync: on a GPU via a fresh pinned staging copy and a
    non_blocking copy (the caching host allocator keeps the staging block until the copy has run)."""
    if device.type != "cuda":
        return x.to(device)
    staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    staged.copy_(x)
    return staged.to(device, non_blocking=True)


class UniformSampler:
    """k indices in [0, n) per sample, uniform with replacement, from ``generator`` (CPU)."""

    def __init__(self, n: int, k: int, generator: torch.Generator):
        self.n, self.k, self.generator = n, k, generator

    def draw(self, batch: int, device: torch.device) -> torch.Tensor:
        """batch x k int64 indices on ``device``; advances the generator by one draw of batch x k."""
        if device.type == "cuda":
            staged = torch.empty((batch, self.k), dtype=torch.int64, pin_memory=True)
            torch.randint(0, self.n, (batch, self.k), generator=self.generator, out=staged)
            return staged.to(device, non_blocking=True)
        return torch.randint(0, self.n, (batch, self.k), generator=self.generator).to(device)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError("the sampler state must be a 1-D uint8 tensor (torch.Generator.get_state())")
        self.generator.set_state(state.cpu())

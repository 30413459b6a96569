"""Random inputs for one configuration, and how many copies to rotate through so that the bank is not
served from the L2 cache when it would not be in a real training step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GatheredMemory:
    """What a momentum-memory provider reads instead of a bank: two n_data x D memories of unit rows (as
    training leaves them), each sample's K+1 rows (its own index first, distinct per sample, then K drawn
    uniformly with replacement), and the fixed Z constants of scores="faithful": ``z`` (Z_s, Z_t) as a
    tensor for ours, ``z_floats`` as Python floats for the eager variant (the authors read Z back once)."""
    memory_s: torch.Tensor
    memory_t: torch.Tensor
    index: torch.Tensor  # B x (K+1) int64
    z: torch.Tensor
    z_floats: tuple


@dataclass
class InputSet:
    student: torch.Tensor  # B x D, requires grad
    teacher: torch.Tensor  # B x D
    bank: object  # K x D unit rows; for cfg.memory == "momentum" a GatheredMemory


def set_bytes(cfg: Config) -> int:
    elem = torch.empty((), dtype=DTYPE[cfg.dtype]).element_size()
    if cfg.memory == "momentum":
        return (2 * cfg.n_data * cfg.D + 2 * cfg.B * cfg.D) * elem + cfg.B * (cfg.K + 1) * 8
    return (cfg.K * cfg.D + 2 * cfg.B * cfg.D) * elem


def faithful_z(cfg: Config, nce_t: float) -> float:
    """The authors' Z = n_data * mean exp(score / nce_t), for the scores of random unit rows in D dimensions
    (a score is then about N(0, 1/D)): n_data * exp(1 / (2 D nce_t^2)). Fixed, so every call of every
    provider divides by the same constant (their steady state, after the first batch)."""
    return cfg.n_data * math.exp(1.0 / (2 * cfg.D * nce_t**2))


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def n_rotating_sets(cfg: Config, device: torch.device, max_sets: int = 64, mem_fraction: float = 0.15) -> int:
    """Enough input sets that, cycled in turn, their total is at least three times the L2 cache (one when a
    single set already is), bounded by a fraction of the free device memory and by max_sets. One set on the
    CPU (no cache to defeat there)."""
    if device.type != "cuda":
        return 1
    need = math.ceil(3 * l2_bytes(device) / set_bytes(cfg))
    free, _total = torch.cuda.mem_get_info(device)
    fit = int(mem_fraction * free // set_bytes(cfg))
    return max(1, min(max_sets, need, fit))


def make_inputs(cfg: Config, device: torch.device, seed: int) -> InputSet:
    """Normal student and teacher embeddings of random norm (not unit: the kernels must normalise) and a bank
    of unit rows, drawn in fp32 and rounded to the run's dtype. Never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPE[cfg.dtype]
    scale = 1.0 + 3.0 * torch.rand(cfg.B, 1, generator=gen, device=device)
    student = (torch.randn(cfg.B, cfg.D, generator=gen, device=device) * scale).to(dtype)
    teacher = (torch.randn(cfg.B, cfg.D, generator=gen, device=device) * scale).to(dtype)
    if cfg.memory == "momentum":
        from .config import NCE_T

        memory_s = F.normalize(torch.randn(cfg.n_data, cfg.D, generator=gen, device=device), dim=1).to(dtype)
        memory_t = F.normalize(torch.randn(cfg.n_data, cfg.D, generator=gen, device=device), dim=1).to(dtype)
        own = torch.randperm(cfg.n_data, generator=gen, device=device)[: cfg.B] if cfg.B <= cfg.n_data else \
            torch.randint(0, cfg.n_data, (cfg.B,), generator=gen, device=device)
        drawn = torch.randint(0, cfg.n_data, (cfg.B, cfg.K), generator=gen, device=device)
        index = torch.cat([own[:, None], drawn], dim=1)
        zf = faithful_z(cfg, NCE_T)
        bank = GatheredMemory(memory_s, memory_t, index, torch.tensor([zf, zf], device=device), (zf, zf))
    else:
        bank = F.normalize(torch.randn(cfg.K, cfg.D, generator=gen, device=device), dim=1).to(dtype)
    student.requires_grad_(True)
    return InputSet(student, teacher, bank)

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
class InputSet:
    student: torch.Tensor  # B x D, requires grad
    teacher: torch.Tensor  # B x D
    bank: torch.Tensor  # K x D, unit rows


def set_bytes(cfg: Config) -> int:
    elem = torch.empty((), dtype=DTYPE[cfg.dtype]).element_size()
    return (cfg.K * cfg.D + 2 * cfg.B * cfg.D) * elem


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
    bank = F.normalize(torch.randn(cfg.K, cfg.D, generator=gen, device=device), dim=1).to(dtype)
    student.requires_grad_(True)
    return InputSet(student, teacher, bank)

"""torch.distributed setup for torchrun (NCCL on GPUs, gloo on CPU) and small collective helpers."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_arg: str) -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(world=world, rank=rank, local_rank=local_rank, device=device)


def teardown(ctx: DistContext) -> None:
    """Free what still uses the process group, wait for every rank (rank 0 may still be writing results),
    then destroy the group. DDP wrappers sit in reference cycles: left to the collector at interpreter exit,
    after destroy_process_group(), their reducers made gloo ranks abort intermittently ("terminate called
    without an active exception")."""
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum_(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(module: torch.nn.Module, ctx: DistContext, skip=()) -> None:
    """Copy rank 0's parameters and buffers, except the buffers named in ``skip``, to every rank."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        buffers = [b for name, b in module.named_buffers() if name not in skip]
        for t in list(module.parameters()) + buffers:
            dist.broadcast(t.data, src=0)


def average_grads_(params, ctx: DistContext) -> None:
    """Mean of the gradients over ranks, for parameters outside the DDP wrapper (the RRD projection heads)."""
    if not ctx.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(ctx.world)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()

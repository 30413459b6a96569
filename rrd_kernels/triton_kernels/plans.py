"""Tile plans per device: which tile sizes, warps and pipeline stages each kernel launches with.

A plan depends on the device (its compute capability and shared memory per block, read from Triton's active
driver, which is what a launch compiles for) and on how the products run (fp32 FMA, TF32, or fp16/bf16
tensor cores). It does not depend on D: the kernels walk the features in chunks. Every entry of TILES is
compiled for its architecture by the compile gate (tools/triton_gate.py, run in CI), which checks that it
compiles, fits the architecture's shared memory and needs no stack (no register spills); the resources it
measured are committed in compile-report.txt beside this file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class DeviceLimits:
    capability: int  # 80, 86, 90, ...
    max_shared_mem: int  # bytes per block (opt-in maximum)
    sm_count: int


@dataclass(frozen=True)
class Tiles:
    block_b: int  # rows of S/T per program
    block_k: int  # bank rows per step
    block_dk: int  # features per product step (the chunk walked over D)
    block_dv: int  # output features per backward program (grid axis 2)
    fwd_warps: int
    fwd_stages: int
    bwd_warps: int
    bwd_stages: int


@dataclass(frozen=True)
class FinishTiles:
    block_b: int
    block_dk: int
    num_warps: int


# Product modes: "ieee" fp32 FMA (torch's "highest"), "tf32" (fp32 inputs when TF32 is allowed; its own entry
# for a 16-bit bank), "half" (fp16/bf16 inputs on tensor cores). Keys are device families (see family()).
# The largest tiles found without spills on all three archs, for every bank dtype and for D both divisible
# by 16 and not (unaligned rows load element by element, which costs registers): fp32 FMA products hold their
# operands in registers, so they get the smallest tiles.
_IEEE = Tiles(16, 32, 16, 64, 4, 1, 4, 1)
_TF32 = Tiles(32, 64, 32, 64, 8, 1, 8, 1)
_TF32_16BIT_BANK = Tiles(32, 64, 32, 64, 8, 2, 8, 2)  # one stage spills 8 B here, two do not (ptxas, all archs)
_HALF = Tiles(64, 64, 32, 64, 8, 2, 8, 2)
# Triton's CPU interpreter runs each tile op as a numpy call: larger tiles make the tests fast, and D = 100 or
# 128 still takes several feature chunks. Tile sizes change only the order of fp32 sums, never the math;
# RRD_TRITON_ARCH=sm_80|sm_86|sm_90 makes the interpreter use that family's GPU tiles instead.
_INTERPRETER = Tiles(64, 64, 32, 64, 4, 1, 4, 1)
TILES = {
    "sm_90": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF},
    "sm_80": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF},
    "sm_86": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF},
    "interpreter": {"ieee": _INTERPRETER, "tf32": _INTERPRETER, "tf32_16bit_bank": _INTERPRETER, "half": _INTERPRETER},
}
FINISH = FinishTiles(16, 32, 4)
MERGE_BLOCK_B = 128

# Devices below the gate's families (and the limits that pick a family).
MIN_CAPABILITY = 80
FAMILY_MIN_SHARED = {"sm_90": 232448, "sm_80": 166912, "sm_86": 101376}

# What the interpreter (CPU tensors, TRITON_INTERPRET=1) plans as: capability 0 stands for the interpreter
# itself; RRD_TRITON_ARCH picks a GPU family's limits instead.
INTERPRETER_LIMITS = {
    "interpreter": DeviceLimits(0, 0, 1),
    "sm_90": DeviceLimits(90, 232448, 132),
    "sm_80": DeviceLimits(80, 166912, 108),
    "sm_86": DeviceLimits(86, 101376, 84),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def family(limits: DeviceLimits) -> str | None:
    """The gate-checked family whose plans fit this device, or None when none does."""
    if limits.capability == 0:
        return "interpreter"
    if limits.capability < MIN_CAPABILITY:
        return None
    for name in ("sm_90", "sm_80", "sm_86"):
        need_cap = 90 if name == "sm_90" else 80
        if limits.capability >= need_cap and limits.max_shared_mem >= FAMILY_MIN_SHARED[name]:
            return name
    return None


_LIMITS: dict[tuple[int, int], tuple[object, DeviceLimits]] = {}


def _driver_limits(drv, device_index: int) -> DeviceLimits:
    # Cached per (driver, device): the property query is a driver call, and a launch is a few microseconds.
    # Keyed by id and checked by identity, so a replaced driver (a stand-in for another arch) is asked anew.
    hit = _LIMITS.get((id(drv), device_index))
    if hit is not None and hit[0] is drv:
        return hit[1]
    target = drv.get_current_target()
    props = drv.utils.get_device_properties(device_index)
    limits = DeviceLimits(int(target.arch), int(props["max_shared_mem"]), int(props["multiprocessor_count"]))
    _LIMITS[(id(drv), device_index)] = (drv, limits)
    return limits


def current_limits() -> DeviceLimits:
    """The limits of the device a launch would compile for now: Triton's active driver and current device
    (launchers run under the tensors' device, so that is the tensors' GPU)."""
    if interpreting():
        return INTERPRETER_LIMITS[os.environ.get("RRD_TRITON_ARCH", "interpreter")]
    drv = triton.runtime.driver.active
    return _driver_limits(drv, drv.get_current_device())


def mode_of(op_dtype_is_fp32: bool, fp32_precision: str, bank_bytes: int = 4) -> str:
    if not op_dtype_is_fp32:
        return "half"
    if fp32_precision == "tf32":
        return "tf32" if bank_bytes == 4 else "tf32_16bit_bank"
    return "ieee"


def tiles_for(limits: DeviceLimits, mode: str) -> Tiles:
    name = family(limits)
    if name is None:
        raise RuntimeError(f"no Triton tile plan for compute capability {limits.capability} with "
                           f"{limits.max_shared_mem} B of shared memory per block")
    return TILES[name][mode]


@dataclass(frozen=True)
class Plan:
    tiles: Tiles
    n_row_blocks: int
    n_splits: int
    tiles_per_split: int
    n_dslices: int

    @property
    def d_pad(self) -> int:
        return self.n_dslices * self.tiles.block_dv


def make_plan(B: int, K: int, D: int, limits: DeviceLimits, mode: str, n_splits: int | None = None) -> Plan:
    """Tiles for the device and the split of the bank. ``n_splits`` forces a split count (tests, the sharded
    bank); by default the bank is split until about two programs per multiprocessor are in flight."""
    tiles = tiles_for(limits, mode)
    n_row_blocks = triton.cdiv(B, tiles.block_b)
    n_tiles = triton.cdiv(K, tiles.block_k)
    if n_splits is None:
        n_splits = max(1, (2 * limits.sm_count) // n_row_blocks)
    n_splits = max(1, min(n_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty chunk: every split sees a valid column
    return Plan(tiles, n_row_blocks, n_splits, tiles_per_split, triton.cdiv(D, tiles.block_dv))

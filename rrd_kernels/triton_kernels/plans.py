"""Tile plans per device: which tile sizes, warps and pipeline stages each kernel launches with.

A plan depends on the device (its compute capability and shared memory per block, read from Triton's active
driver, which is what a launch compiles for) and on how the products run (fp32 FMA, TF32, or fp16/bf16
tensor cores), and on D's size class: where D rounded up to a power of two fits a RESIDENT entry the resident
kernels run (resident.py), else the chunked ones, whose TILES do not depend on D (they walk the features in
chunks). Every entry is compiled for its architecture by the compile gate (tools/triton_gate.py, run in CI), which checks that it
compiles, fits the architecture's shared memory and needs no stack (no register spills); the resources it
measured are committed in compile-report.txt beside this file. What the compiler cannot build for a family
is refused before any compile (UNSUPPORTED, unsupported()), so that backend "auto" falls back.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

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
    block_dv: int  # at most this many output features per backward program (see make_plan): the chunked
    # kernels slice over grid axis 2, the resident backward launches once per slice (D 512 only)
    fwd_warps: int
    fwd_stages: int
    bwd_warps: int
    bwd_stages: int
    bwd_split: int = 1  # the backward walks bank tiles of block_k / bwd_split rows (same split boundaries)
    bwd_block_b: int = 0  # rows per backward program (0: block_b)
    walk_dk: int = 0  # resident planes only: features per product step when the planes are walked (0: all D)
    aligned_only: bool = False  # resident only: serves D and row strides that are multiples of 16 (make_plan)
    bwd_transposed: bool = False  # resident planes only: the backward is planes_backward.py's, products transposed
    programs_per_sm: int = 2  # programs the splits of the bank aim to keep in flight per multiprocessor

    @property
    def bwd_rows(self) -> int:
        return self.bwd_block_b or self.block_b


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
_TF32 = Tiles(32, 64, 32, 128, 8, 1, 8, 1)
_TF32_16BIT_BANK = Tiles(32, 64, 32, 128, 8, 2, 8, 2)  # one stage spills 8 B here, two do not (ptxas, all archs)
# (On sm_80/sm_86, mma.sync, Triton spreads 8 warps over a 64-row tile as 4 x 1 and repeats the tile's
# columns on the other four: every product is computed twice, as the cost model's SASS count shows; 32-row
# tiles on 4 warps do not. The chunked half tiles serve D beyond the resident plans below.)
_HALF = Tiles(64, 64, 32, 128, 8, 2, 8, 2)
_HALF_MMA_SYNC = Tiles(32, 64, 32, 128, 4, 2, 4, 2)  # sm_80/sm_86: no repeated products, no spills at D 300
# Triton's CPU interpreter runs each tile op as a numpy call: larger tiles make the tests fast, and D = 100 or
# 128 still takes several feature chunks. Tile sizes change only the order of fp32 sums, never the math;
# RRD_TRITON_ARCH=sm_80|sm_86|sm_90 makes the interpreter use that family's GPU tiles instead.
_INTERPRETER = Tiles(64, 64, 32, 64, 4, 1, 4, 1)
MODES = ("ieee", "tf32", "tf32_16bit_bank", "half", "half_fp32_bank")
TILES = {
    "sm_90": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF,
              "half_fp32_bank": _HALF},
    "sm_80": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF_MMA_SYNC,
              "half_fp32_bank": _HALF_MMA_SYNC},
    "sm_86": {"ieee": _IEEE, "tf32": _TF32, "tf32_16bit_bank": _TF32_16BIT_BANK, "half": _HALF_MMA_SYNC,
              "half_fp32_bank": _HALF_MMA_SYNC},
    "interpreter": {mode: _INTERPRETER for mode in MODES},
}
# Resident plans (resident.py): S and T of a row block and a whole bank tile held at once. Each entry serves
# D_PAD (D rounded up to a power of two) up to its block_dk; the first that fits is taken, and a D beyond them
# all uses the chunked kernels above. The resident kernels read block_b, block_k, the warps, the stages, the
# bwd_ fields and block_dv: the backward's output features per program (below D_PAD only at D 512, where
# each slice recomputes the logit products: resident.py, rrd_bwd_resident_kernel).
# The forward keeps two logit tiles and little else: 128 bank rows per tile halve its per-row work; the
# backward also holds the [block_b, D] accumulator and the coefficients, so its tiles are half as wide.
_RESIDENT_HALF = Tiles(128, 128, 128, 128, 8, 2, 8, 2, bwd_split=2)
_RESIDENT_HALF_FP32_BANK = Tiles(128, 128, 128, 128, 8, 3, 8, 2, bwd_split=2)  # two stages spill at D 100
# D 256: a 64 x 256 fp32 accumulator per warpgroup; the backward fits without spills in one stage only.
_RESIDENT_HALF_256 = Tiles(64, 64, 256, 256, 4, 2, 4, 1, bwd_split=2)
# D 512: the row block's S and T (128 KiB) leave room for one stage of a 64-row bank tile; the backward's
# [64, 512] accumulator would be 256 registers per thread, so it runs as two 256-feature output slices
# (7 bank products per forward + backward instead of 5; docs/design.md section 7).
# Each slice's program holds the row block and the bank tile as two feature halves, so the c Q operand is a
# half already loaded. At 255 registers per thread this is the edge: 32-row bank tiles in the backward spill
# with 16-bit banks of the other dtype (8-24 B), two backward stages spill, and rows that are not 16-aligned
# (D 300: loaded element by element) spill everywhere, so those D take the chunked kernels (aligned_only).
_RESIDENT_HALF_512 = Tiles(64, 32, 512, 256, 4, 2, 4, 1, bwd_split=2, aligned_only=True)
# The interpreter takes the resident kernels up to D 128 (every test shape but the GPU-family ones, which
# follow their family's plans and so also reach the chunked kernels).
_INTERPRETER_RESIDENT = Tiles(64, 64, 128, 128, 4, 1, 4, 1)
# mma.sync (sm_80/sm_86) holds the row block's operands in registers: 64-row backward programs spill there.
# 32-row backward programs with 4 warps repeat products as 8-warp 64-row tiles do; 16 rows do not.
_RESIDENT_HALF_MMA_SYNC = Tiles(64, 32, 128, 128, 4, 2, 4, 2, bwd_block_b=16)
# TF32 on wgmma (sm_90) fits 64-row tiles; on mma.sync (sm_80/sm_86) every resident TF32 tile tried spilled,
# and fp32 FMA products ("ieee") hold too much in registers for any resident tile: both stay chunked there.
_RESIDENT_TF32 = Tiles(64, 32, 128, 128, 4, 2, 4, 2)  # 64 x 64 forward tiles spill at D 100
# fp32 at "highest" ("ieee") on wgmma: the operands as two fp16 planes each (planes.py), three fp16 products
# per product. The row block's four planes and a bank tile's two take twice the shared memory of the half
# plans' operands, so one stage.
_RESIDENT_PLANES = Tiles(128, 128, 128, 128, 8, 1, 8, 1, bwd_split=2)
# D 256: a row block's four planes (128 KiB per 64 rows) leave no room for 128-row blocks, and 64-row blocks
# spill in the backward, so the forward walks the planes in 64-feature chunks, re-read per bank tile (walk_dk,
# resident.py _walked_products). The backward is transposed (bwd_transposed, planes_backward.py): 32-row
# blocks whose planes stay resident, 64-row bank tiles (bwd_split 2) in two stages on one warpgroup, and a
# split of the bank of its own (make_plan). docs/design.md section 7 has the variants and their counts.
# Its programs take a multiprocessor each (their shared memory), so the splits aim at one per multiprocessor:
# two would be a second wave, each program with its prologue and epilogue over half the tiles.
_RESIDENT_PLANES_256 = Tiles(128, 128, 256, 256, 8, 2, 4, 2, bwd_split=2, bwd_block_b=32, walk_dk=64,
                             bwd_transposed=True, programs_per_sm=1)
RESIDENT = {
    "sm_90": {"half": (_RESIDENT_HALF, _RESIDENT_HALF_256, _RESIDENT_HALF_512),
              "half_fp32_bank": (_RESIDENT_HALF_FP32_BANK, _RESIDENT_HALF_256, _RESIDENT_HALF_512),
              "tf32": (_RESIDENT_TF32,), "tf32_16bit_bank": (_RESIDENT_TF32,),
              "ieee": (_RESIDENT_PLANES, _RESIDENT_PLANES_256)},
    "sm_80": {"half": (_RESIDENT_HALF_MMA_SYNC,), "half_fp32_bank": (_RESIDENT_HALF_MMA_SYNC,)},
    "sm_86": {"half": (_RESIDENT_HALF_MMA_SYNC,), "half_fp32_bank": (_RESIDENT_HALF_MMA_SYNC,)},
    "interpreter": {mode: (_INTERPRETER_RESIDENT,) for mode in MODES},
}
# Blackwell takes the plans (chunked and resident) of the family it shares a tensor-core path with, as the same
# Tiles objects, so a retune there applies here too (and the gate compiles it for both): sm_100 (B200) the
# datacenter sm_90 plans, sm_120 (RTX 50xx, mma.sync like Ampere/Ada) the sm_86 plans. Not tuned for
# Blackwell itself, except where the gate found sm_100 compiling sm_90's tiles badly:
# - the chunked half tiles, which sm_100 takes at D 257-512 (the resident ones serve less): at D 512 the sm_90
#   forward spills 16 B there (its 8 warps held to 128 registers); with 64-feature chunks it does not;
# - the fp16 planes ("ieee"): their six 128 x 128 fp32 accumulators need 768 columns of tensor memory, which
#   has 512 (triton 3.6 refuses the launch), so fp32 "highest" stays chunked there;
# - the resident D-512 half tiles, whose forward spills 8-16 B there.
_HALF_SM100 = Tiles(64, 64, 64, 128, 8, 2, 8, 2)
TILES["sm_100"] = dict(TILES["sm_90"], half=_HALF_SM100, half_fp32_bank=_HALF_SM100)
RESIDENT["sm_100"] = {mode: tuple(r for r in entries if r is not _RESIDENT_HALF_512)
                      for mode, entries in RESIDENT["sm_90"].items() if mode != "ieee"}
TILES["sm_120"], RESIDENT["sm_120"] = TILES["sm_86"], RESIDENT["sm_86"]
FINISH = FinishTiles(16, 32, 4)
MERGE_BLOCK_B = 128
# Features per step of rrd_argmax_kernel: its [block_k, chunk] fp32 products are 4096 values per 4 warps (8192
# spill with unaligned rows, loaded element by element, on sm_80).
ARGMAX_ELEMENTS = 4096


def argmax_chunk(block_k: int, d_pad: int) -> int:
    return max(1, min(d_pad, ARGMAX_ELEMENTS // block_k))


# The families: (name, compute capabilities [lo, hi), shared memory per block at least), first match wins.
# A family is an architecture the compile gate compiles for (tools/triton_gate.py), so a device gets plans
# only within its major version: 9.x with less than 227 KiB, 11.x (Thor) and 13.x+ get none (nothing checked
# compiles their code), and 10.x/12.x devices other than 10.0/12.0 (B300 10.3, GB10 12.1) take the plans the
# gate checked for 10.0/12.0.
FAMILIES = (
    ("sm_90", 90, 100, 232448),  # H100, H200, GH200: 227 KiB
    ("sm_80", 80, 90, 166912),  # A100, Orin: 163 KiB
    ("sm_86", 80, 90, 101376),  # RTX 30xx/40xx, A10, A40, L4, L40: 99 KiB
    ("sm_100", 100, 110, 232448),  # B200, GB200, B300: 227 KiB
    ("sm_120", 120, 130, 101376),  # RTX 50xx, RTX PRO 6000 Blackwell, GB10: 99 KiB
)
FAMILY_MIN_SHARED = {name: smem for name, _lo, _hi, smem in FAMILIES}

# What the interpreter (CPU tensors, TRITON_INTERPRET=1) plans as: capability 0 stands for the interpreter
# itself; RRD_TRITON_ARCH picks a GPU family's limits instead.
INTERPRETER_LIMITS = {
    "interpreter": DeviceLimits(0, 0, 1),
    "sm_90": DeviceLimits(90, 232448, 132),
    "sm_80": DeviceLimits(80, 166912, 108),
    "sm_86": DeviceLimits(86, 101376, 84),
    "sm_100": DeviceLimits(100, 232448, 148),
    "sm_120": DeviceLimits(120, 101376, 170),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def family(limits: DeviceLimits) -> str | None:
    """The gate-checked family whose plans fit this device, or None when none does."""
    if limits.capability == 0:
        return "interpreter"
    for name, lo, hi, smem in FAMILIES:
        if lo <= limits.capability < hi and limits.max_shared_mem >= smem:
            return name
    return None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unsupported(limits: DeviceLimits, mode: str, dtype, bank_dtype, D: int) -> str | None:
    """Why the Triton kernels cannot run on this device in this configuration, or None. dtype and bank_dtype:
    the embeddings' and the bank's (torch dtypes or their names); mode: mode_of(...) of the call; D: its
    embedding width (which decides chunked or resident kernels). Checks that a gate-checked family fits the
    device, then the UNSUPPORTED table (for the triton installed); compiles nothing."""
    name = family(limits)
    if name is None:
        cap = limits.capability
        needs = ", ".join(f"{n} ({lo // 10}.x, >= {smem // 1024} KiB)" for n, lo, _hi, smem in FAMILIES)
        return (f"no checked Triton tile plan fits this GPU (compute capability {cap // 10}.{cap % 10}, "
                f"{limits.max_shared_mem // 1024} KiB shared memory per block; the checked families: {needs})")
    if not any(key[:4] == (name, mode, _dtype_name(dtype), _dtype_name(bank_dtype)) for key in UNSUPPORTED):
        return None
    kernels = "resident" if make_plan(1, 1, D, limits, mode).resident else "chunked"
    entry = UNSUPPORTED.get((name, mode, _dtype_name(dtype), _dtype_name(bank_dtype), kernels))
    if entry is None or _triton_version() >= entry[1]:
        return None
    return entry[0].format(version=triton.__version__, D=D)


def _triton_version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])


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
        return "half" if bank_bytes < 4 else "half_fp32_bank"
    if fp32_precision == "tf32":
        return "tf32" if bank_bytes == 4 else "tf32_16bit_bank"
    return "ieee"


# (family, product mode, embedding dtype, bank dtype, kernels) -> (reason, the first triton seen to compile
# it), where kernels is "chunked" or "resident" (what make_plan picks for the call's D): what triton before
# that version fails to compile, refused before any compile (unsupported(), consulted by the launcher's
# why_unusable) so that backend "auto" falls back, and reported as "refused" rows by the compile gate
# instead of being compiled.
# sm_100, fp16/bf16 embeddings with a bank of another dtype (the bank tile is cast before the product), on
# the chunked kernels (D > 256 with the sm_90 plans): with triton 3.6.0 the software pipeliner fails an
# assertion ("Operations must be in the schedule") and the compile ends in `PassManager::run failed` in
# TritonGPUPipeline, forward and backward kernels alike, at every D tried (257, 300, 512; before the resident
# kernels also 100 and 128, not 1), with the plans' 2 stages (3 too; 1 compiles). The resident kernels and
# same-dtype banks compile; triton 3.8.0 compiles all of them.
_SM100_MIXED = ("triton {version} cannot compile the chunked kernels (taken at D = {D}) for sm_100 with {emb} "
                "embeddings and a {bank} bank (TritonGPUPipeline fails; triton 3.8.0 can); cast the bank to {emb}")
# (The mode is mode_of's for fp16/bf16 embeddings with that bank, so the keys follow its mode names.)
UNSUPPORTED = {
    ("sm_100", mode_of(False, "ieee", 4 if bank == "float32" else 2), emb, bank, "chunked"):
        (_SM100_MIXED.replace("{emb}", emb).replace("{bank}", bank), (3, 8))
    for emb in ("bfloat16", "float16") for bank in ("float32", "bfloat16", "float16") if bank != emb
}


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
    block_dv: int  # output features per backward program
    resident: bool = False  # resident.py's kernels (block_dk = block_dv = D_PAD), else the chunked ones
    planes: bool = False  # resident fp32 at "highest": operands as fp16 planes (planes.py)
    bwd_splits: int = 0  # the backward's own split of the bank (0: n_splits), bwd_tiles_per_split tiles of
    bwd_tiles_per_split: int = 0  # block_k / bwd_split rows each (make_plan)

    @property
    def bwd_n_splits(self) -> int:
        return self.bwd_splits or self.n_splits

    @property
    def bwd_split_tiles(self) -> int:
        """Backward bank tiles (block_k / bwd_split rows) per split of the backward."""
        return self.bwd_tiles_per_split or self.tiles_per_split * self.tiles.bwd_split

    @property
    def d_pad(self) -> int:
        return self.n_dslices * self.block_dv


def make_plan(B: int, K: int, D: int, limits: DeviceLimits, mode: str, n_splits: int | None = None,
              aligned: bool | None = None) -> Plan:
    """Tiles for the device and the split of the bank. ``n_splits`` forces a split count (tests, the sharded
    bank); by default the bank is split until about tiles.programs_per_sm programs per multiprocessor are
    in flight.
    ``aligned``: D and the operands' row strides are multiples of 16 elements (what Triton specialises on;
    None: D alone decides), which aligned_only entries need."""
    tiles = tiles_for(limits, mode)
    forced = n_splits
    d_pad = max(16, triton.next_power_of_2(D))
    if aligned is None:
        aligned = D % 16 == 0
    resident = next((r for r in RESIDENT.get(family(limits), {}).get(mode, ())
                     if d_pad <= r.block_dk and (aligned or not r.aligned_only)), None)
    if resident is not None:
        tiles = replace(resident, block_dk=d_pad, block_dv=min(resident.block_dv, d_pad))
    n_row_blocks = triton.cdiv(B, tiles.block_b)
    n_tiles = triton.cdiv(K, tiles.block_k)
    if n_splits is None:
        n_splits = max(1, (tiles.programs_per_sm * limits.sm_count) // n_row_blocks)
    n_splits = max(1, min(n_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty chunk: every split sees a valid column
    # Each output slice of the backward recomputes both logit products over its bank chunk, so the fewer
    # slices the better: one slice as wide as D (to the next power of two) up to the tile's block_dv.
    block_dv = min(tiles.block_dv, d_pad)
    # The transposed planes backward (planes_backward.py) takes one multiprocessor per program (its shared
    # memory) and 32-row blocks: split by the forward's count, its programs would be 4x as many, each with a
    # prologue (the row block's planes) and an epilogue (a [D, 32] partial sum, which the finish kernel reads
    # again) over fewer tiles. It splits the bank for programs_per_sm programs per multiprocessor of its own.
    bwd_splits = bwd_tiles = 0
    if resident is not None and tiles.bwd_transposed and forced is None:
        n_bwd_tiles = triton.cdiv(K, tiles.block_k // tiles.bwd_split)
        want = max(1, (tiles.programs_per_sm * limits.sm_count) // triton.cdiv(B, tiles.bwd_rows))
        bwd_tiles = triton.cdiv(n_bwd_tiles, min(want, n_bwd_tiles))
        bwd_splits = triton.cdiv(n_bwd_tiles, bwd_tiles)
    return Plan(tiles, n_row_blocks, n_splits, tiles_per_split, triton.cdiv(D, block_dv), block_dv,
                resident=resident is not None, planes=resident is not None and mode == "ieee",
                bwd_splits=bwd_splits, bwd_tiles_per_split=bwd_tiles)

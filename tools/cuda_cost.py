"""The static cost model of the CUDA C++ backend (csrc/): the same figures as the Triton path of
tools/cost_model.py, from nvcc's SASS of the module's own source. No GPU.

- Machine code: csrc/rrd_cuda.cu compiled by nvcc with the real build's flags (resource_gate.NVCC_FLAGS,
  which setup.py uses) for one architecture, disassembled by cuobjdump -sass; cached per source hash, nvcc
  version and architecture (RRD_COST_CACHE, default ~/.cache/rrd_kernels/cost), so a table takes seconds
  after the first compile of each architecture (~10 s).
- Launches: csrc/launch_plan.cpp, a host program built against rrd_host.inl, runs the backend's own plan and
  launch sequence for one forward + backward call and prints every launch (the kernel's symbol, grid, block,
  dynamic shared memory) and both plans (splits, chunk, feature slices, workspace) instead of launching.
- Trip counts: STREAMING_LOOPS and KERNELS below, the one place that says how often each loop of a kernel runs (the kernels'
  loop bounds are run-time values, invisible in the binary). Loops come from tools/sass.py (backward
  branches of live code: the cold fallbacks nvcc places after EXIT are left out); each is given a role by
  the first rule whose test holds, and its trips are an expression over the header constants (CONSTANTS,
  read from csrc's `constexpr int` lines), the plan and the call's sizes, divided by the loop's unroll
  factor where a rule names the instruction one source iteration issues `per_iteration` times.
  A live loop that no rule matches is an error: a kernel change that adds a loop must say what it walks.

    python -m tools.cost_model --backend cuda --arch sm_90 --dtype bfloat16 --D 128 --B 4096 --K 262144 [--json]
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
PLAN_SOURCE = CSRC / "launch_plan.cpp"
HEADERS = ("rrd_common.cuh", "rrd_kernels.cuh", "rrd_resident.cuh", "rrd_host.inl", "rrd_gathered.cuh")

# The precision mode (rrd_common.cuh's Mode) of an embedding dtype and fp32 matmul precision.
MODES = {"bfloat16": 3, "float16": 2, ("float32", "high"): 1, ("float32", "highest"): 0}
MEMORY_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}  # the gathered kernels' memory dtype codes
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def mode_of(dtype: str, precision: str) -> int:
    return MODES[(dtype, precision)] if dtype == "float32" else MODES[dtype]


# ---- what each kernel's loops walk -------------------------------------------------------------------
# A rule: (role, test, trips, unroll marker). test is evaluated over the loop's facts: parent (the parent
# loop's role, None at top level), products (it holds MMA or FFMA products, nested loops included),
# children (it has nested loops), shuffles (SHFL), loads / wide_loads (global loads or cp.async copies;
# 8- or 16-byte ones). Tests are specific on purpose: a loop the kernels gain should match no rule (an
# error naming it) rather than borrow another loop's trips. trips is per
# execution of the parent (per program at top level). The marker (opcode prefix, count) gives the unroll
# factor: the loop's own instructions of that kind / count per source iteration. k_per_trip (product loops):
# the reduction depth one trip covers, from its products: FLOPs / (2 x the warp tile's 16 x BN).
STREAMING_LOOPS = [
    # the bank loop: one trip per bank tile of the program's split
    ("bank", "parent is None and products", "bank_tiles", None),
    # row_scales: each warp walks BM / kWarps rows, its lanes the features 32 at a time (S and T, each with
    # both dtype branches of load_as_float: 4 loads per step)
    ("row norms", "parent is None and not products and shuffles", "BM // kWarps", ("SHFL", 10)),
    ("row norm features", "parent == 'row norms' and loads", "cdiv(D, 32)", ("LDG", 4)),
    # logit_tiles: the feature chunks, each staged into shared memory and multiplied
    ("features", "parent == 'bank' and products and children", "cdiv(D, DK)", None),
    ("chunk product", "parent == 'features' and products", "DK // k_per_trip", None),
    # stage_chunk: 4-element vector copies, one shared store each (the benchmark's inputs are aligned and
    # contiguous, so the element-wise branch never runs)
    ("chunk staging", "parent == 'features' and wide_loads", "BN * DK // 4 // kThreads", ("STS", 1)),
    ("chunk staging, element-wise", "parent == 'features' and loads", "0", None),
    # backward: the second product (q - p) Q over the tile's BN bank rows, and Q^T staged for it (4
    # transposed shared stores per vector)
    ("gradient product", "parent == 'bank' and products", "BN // k_per_trip", None),
    ("Q^T staging", "parent == 'bank' and wide_loads", "BN * DV // 4 // kThreads", ("STS", 4)),
    ("Q^T staging, element-wise", "parent == 'bank' and loads", "0", None),
]
# The resident kernels (rrd_resident.cuh, fp16 / bf16, D <= kResD): S and T staged once per block. Each
# kernel comes twice (ASYNC): bank tiles by cp.async, or by converting loads where the bank is not in the
# mode's dtype or not 16-byte aligned; the model's calls (bank_dtype = dtype, aligned: launch_plan.cpp) run
# the cp.async one, whose bank loop holds no conversion. The conversion rules describe the other one.
RESIDENT_SHARED_LOOPS = [
    ("row norms", "parent is None and not products and shuffles", "BM // kWarps", ("SHFL", 10)),
    ("row norm features", "parent == 'row norms' and loads", "cdiv(D, 32)", ("LDG", 4)),
    # stage_rows16: S and T once per block, 4 features per step (an 8-byte load, or 4 scalar ones)
    ("row staging", "parent is None and wide_loads and not products", "BM * (kResD // 4) // kThreads",
     ("LDG", 5)),
    # the peeled last tile's converting staging (the converting instantiation; once per program at most:
    # the last split's programs only, so an upper bound)
    ("tail conversion", "parent is None and loads and not wide_loads and not shuffles",
     "BN * kResD // kThreads", ("STS", 1)),
    # zero_feature_tail: columns [D, kResD) of both buffers, once per block (none at D = 128)
    ("feature tail", "parent is None and not loads and not products", "2 * BN * (kResD - D) // kThreads", None),
]
# convert_bank_tile: BN x kResD elements per tile, one 16-bit shared store each
RESIDENT_CONVERSION = ("bank conversion", "parent == 'bank' and loads and not wide_loads", "BN * kResD // kThreads",
                       ("STS", 1))
# The forward's bank loop is split (rrd_forward_resident_kernel): the inner "bank" loop runs the tiles where
# no lane of the warp raises one of its running maxima (the common update only); the outer loop's own body
# finishes a tile where one does (resident_update, the rare path) and re-enters. Its trips: the expected
# number of tiles, of a program's n, where at least one of the warp's 128 running maxima (32 lanes x 2 rows x
# the a and b logits, each over the lane's 16 columns of a tile) sets a record, for logits in random order:
# record_tiles(n, 128) = sum_i 1 - (1 - 1/i)^128 (~0.8 x 128 + 128 ln(n / 128); all of the first ~100 tiles).
# Inputs whose maxima come early (a bank sorted by similarity) raise fewer; an ascending one, every tile.
FORWARD_RESIDENT_LOOPS = [
    ("rare tiles", "parent is None and products and children", "record_tiles(bank_tiles, 128)", None),
    ("bank", "parent == 'rare tiles' and products", "bank_tiles / record_tiles(bank_tiles, 128)", None),
    RESIDENT_CONVERSION,
] + RESIDENT_SHARED_LOOPS
BACKWARD_RESIDENT_LOOPS = [
    ("bank", "parent is None and products and children", "bank_tiles", None),
    RESIDENT_CONVERSION,
    # 4 sub-blocks of 16 bank rows per tile (both products of 16 rows, then c Q)
    ("sub-blocks", "parent == 'bank' and products", "BN // 16", None),
    # the peeled last tile (K % BN != 0, the last split only): its sub-block loop, once per program
    ("tail sub-blocks", "parent is None and products and not children", "BN // 16", None),
] + RESIDENT_SHARED_LOOPS


def record_tiles(n: float, sequences: int) -> float:
    """Expected number of steps, of n, at which at least one of `sequences` independent sequences of
    exchangeable values sets a new running maximum (step i does so for each with probability 1 / i)."""
    return sum(1.0 - (1.0 - 1.0 / i) ** sequences for i in range(1, max(1, round(n)) + 1))


# The gathered-memory kernels (rrd_gathered.cuh): one warp per (row, split); its column loop (the "bank"
# role) walks the split's chunk kGroups columns a step (an 8-lane group per column: the memory rows'
# 16-byte loads, the dot products, 3 shuffle-adds, the fold into the online state).
GATHERED_LOOPS = [
    ("bank", "parent is None and wide_loads and shuffles", "cdiv(chunk, kGroups)", None),
    # the backward's merge of the row's split states (8 planes a split, one merge_state: MUFU)
    ("split states", "parent is None and mufu and loads and not wide_loads", "num_splits", ("LDG", 8)),
    # stage_rows: the student and teacher rows into shared memory, 32 features a step up to kMaxD
    ("row staging", "parent is None and loads and not wide_loads and not mufu", "kMaxD // 32", ("LDG", 2)),
]
KERNELS = {
    # kind: symbol pattern, streaming (has a bank loop over BM x BN tiles), loop rules, HBM bytes
    "forward": dict(symbol="rrd_forward_kernel", streaming=True, loops=STREAMING_LOOPS,
                    hbm="2 * B * D * emb + K * D * bank + 4 * workspace"),
    "forward resident": dict(symbol="rrd_forward_resident_kernel", streaming=True, loops=FORWARD_RESIDENT_LOOPS,
                             hbm="2 * B * D * emb + K * D * bank + 4 * workspace"),
    "backward resident": dict(symbol="rrd_backward_resident_kernel", streaming=True, loops=BACKWARD_RESIDENT_LOOPS,
                              hbm="2 * B * D * emb + K * D * bank + 3 * 4 * B + 4 * workspace"),
    "merge": dict(symbol="rrd_merge_kernel", streaming=False, loops=[
        ("splits", "True", "num_splits", ("LDG", 8))],  # 8 state planes per split
        hbm="4 * workspace + 4 * 4 * B"),
    "backward": dict(symbol="rrd_backward_kernel", streaming=True, loops=STREAMING_LOOPS,
                     hbm="2 * B * D * emb + K * D * bank + 3 * 4 * B + 4 * workspace"),
    # per row: the splits' sigma, then per feature the splits' partial sums (unrolled with remainders,
    # each counted splits / unroll times: an upper bound on O(B D splits) work)
    "finish": dict(symbol="rrd_finish_kernel", streaming=False, loops=[
        ("splits", "True", "num_splits", ("LDG", 1))],
        hbm="4 * workspace + 2 * B * D * emb + B * D * bank + 2 * 4 * B"),
    # Gathered: K = the columns per row (nce_k + 1); every (row, column) reads its own two memory rows
    # (D x mem bytes each) and its int64 index in both passes; no reuse between rows is assumed.
    "gathered forward": dict(symbol="rrd_gathered_forward_kernel", streaming=True, loops=GATHERED_LOOPS,
                             pairs_per_trip="kGroups", hbm="2 * B * D * 4 + B * K * (8 + 2 * D * bank) + 4 * 8 * num_splits * B"),
    "gathered backward": dict(symbol="rrd_gathered_backward_kernel", streaming=True, loops=GATHERED_LOOPS,
                              pairs_per_trip="kGroups",
                              hbm="2 * B * D * 4 + B * K * (8 + 2 * D * bank) + 4 * workspace + 2 * 4 * B"),
    # per row: the splits' sigma, then for each of the lane's kMaxD / 32 features the splits' partial sums
    # (unrolled with remainders, each counted splits / unroll times; every feature slot, used or not: an
    # upper bound on O(B D splits) work)
    "gathered finish": dict(symbol="rrd_gathered_finish_kernel", streaming=False, loops=[
        ("splits", "True", "num_splits", ("LDG", 1))],
        hbm="4 * num_splits * B * (D + 1) + B * D * (bank + 4 + 4) + 4 * B"),
}


def kind_of(symbol: str) -> str:
    for kind, k in KERNELS.items():
        if k["symbol"] in symbol:
            return kind
    raise KeyError(f"{symbol}: not a kernel of tools/cuda_cost.py's KERNELS (add its kind)")


# ---- header constants ----------------------------------------------------------------------------------

_CONSTEXPR = re.compile(r"^\s*constexpr\s+int\s+(\w+)\s*=\s*([^;]+);", re.M)


@lru_cache(maxsize=None)
def constants() -> dict:
    """The headers' namespace-level `constexpr int NAME = expr;` values (those Python can evaluate from
    literals and earlier names; C++ integer division)."""
    out: dict[str, int] = {}
    for name in HEADERS:
        for m in _CONSTEXPR.finditer((CSRC / name).read_text()):
            expr = re.sub(r"(?<![/])/(?![/])", "//", m.group(2))
            expr = re.sub(r"int\(sizeof\(float\)\)|sizeof\(float\)", "4", expr)
            try:
                out[m.group(1)] = int(eval(expr, {"__builtins__": {}}, dict(out)))
            except Exception:
                continue
    return out


# ---- compiling and disassembling -------------------------------------------------------------------------

@lru_cache(maxsize=None)
def gate():
    """csrc/resource_gate.py (nvcc lookup, flags, source hash, ptxas parsing), loaded by path."""
    spec = importlib.util.spec_from_file_location("rrd_resource_gate", CSRC / "resource_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_dir() -> Path:
    d = Path(os.environ.get("RRD_COST_CACHE") or Path.home() / ".cache" / "rrd_kernels" / "cost")
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_hash() -> str:
    """The module's sources (resource_gate.HASHED) and the launch printer: what the table depends on."""
    h = hashlib.sha256(gate().source_hash().encode())
    h.update(PLAN_SOURCE.read_bytes())
    return h.hexdigest()[:16]


def _nvcc() -> str:
    nvcc = gate().find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA cost model compiles "
                                "csrc/rrd_cuda.cu")
    return nvcc


@lru_cache(maxsize=None)
def nvcc_version() -> str:
    return gate().nvcc_version(_nvcc())


def _split_functions(sass: str) -> dict:
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


@lru_cache(maxsize=None)
def machine_code(arch: str, module: str | None = None) -> tuple[dict, dict]:
    """({kernel symbol: SASS listing}, {kernel symbol: ptxas record}) of rrd_cuda.cu built for arch; with
    module (a built rrd_kernels/_rrd_cuda*.so), that module's machine code for arch instead (no ptxas
    records then: registers and stack are not reported)."""
    g = gate()
    if module is not None:
        cuobjdump = g.find_cuobjdump()
        if cuobjdump is None:
            raise FileNotFoundError("cuobjdump not found (CUDA bin, PATH or the triton wheel)")
        out = subprocess.run([cuobjdump, "-sass", "-arch", arch, module], capture_output=True, text=True)
        listings = _split_functions(out.stdout)
        if out.returncode != 0 or not listings:
            raise RuntimeError(f"{module}: no {arch} machine code ({out.stderr.strip()[-300:]})")
        return listings, {}
    key = hashlib.sha256(f"{source_hash()} {nvcc_version()} {' '.join(g.NVCC_FLAGS)} {arch}".encode()).hexdigest()[:16]
    path = cache_dir() / f"cuda-{arch}-{key}.json.gz"
    if not path.exists():
        cuobjdump = g.find_cuobjdump()
        if cuobjdump is None:
            raise FileNotFoundError("cuobjdump not found (CUDA bin, PATH or the triton wheel)")
        with tempfile.TemporaryDirectory(prefix="rrd-cuda-cost-") as work:
            log = g.compile_kernels(_nvcc(), [arch], work, threads=1)
            sass = subprocess.run([cuobjdump, "-sass", os.path.join(work, "rrd_cuda.o")], capture_output=True,
                                  text=True, check=True).stdout
        data = {"sass": sass, "ptxas": log}
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump(data, f)
        tmp.replace(path)
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    listings = _split_functions(data["sass"])
    records = {r["name"]: r for r in g.parse_ptxas(data["ptxas"]) if r["arch"] == arch}
    return listings, records


@lru_cache(maxsize=None)
def _plan_program() -> str:
    exe = cache_dir() / f"launch_plan-{source_hash()}"
    if not exe.exists():
        cxx = os.environ.get("CXX", "c++")
        tmp = str(exe) + ".tmp"
        subprocess.run([cxx, "-std=c++20", "-O0", "-rdynamic", "-DRRD_EMULATE", "-I" + str(CSRC), str(PLAN_SOURCE),
                        "-o", tmp, "-ldl"], check=True, capture_output=True, text=True)
        os.replace(tmp, exe)
    return str(exe)


@dataclass
class Launch:
    call: str  # "forward" or "backward"
    symbol: str
    grid: tuple
    block: tuple
    smem: int


def launches(mode: int, B: int, K: int, D: int, sms: int, memory: str = "fifo",
             mem_dtype: int = 0) -> tuple[list[Launch], dict]:
    """What one forward + backward call launches, and its plans ({call: dict}), from the host code
    (memory "gathered": the gathered-memory call, K columns per row, memories of dtype code mem_dtype)."""
    args = ["gathered", str(mem_dtype)] if memory == "gathered" else [str(mode)]
    out = subprocess.run([_plan_program(), *args, str(B), str(K), str(D), str(sms)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"csrc/launch_plan.cpp refused B={B} K={K} D={D}: {out.stderr.strip()}")
    found, plans = [], {}
    for line in out.stdout.splitlines():
        f = line.split()
        if f[0] == "launch":
            found.append(Launch(f[1], f[2], tuple(map(int, f[3:6])), tuple(map(int, f[6:9])), int(f[9])))
        elif f[0] == "plan":
            plans[f[1]] = dict(num_splits=int(f[2]), chunk=int(f[3]), num_dslices=int(f[4]),
                               workspace_floats=int(f[5]))
    return found, plans


# ---- counting one kernel -----------------------------------------------------------------------------------

def _facts(instrs, live, lp, roles) -> dict:
    from tools import sass

    inside = [i for i in instrs if lp.contains(i.addr) and i.addr in live]
    loads = [i for i in inside if i.op in ("LDG", "LDGSTS")]  # global loads, plain or asynchronous copies
    return dict(
        parent=None if lp.parent is None else roles[id(lp.parent)],
        # MMAs, or at least two k-steps of a SIMT warp tile's FFMAs (2 x 32: more than any scalar loop has)
        products=any(sass.mma_flops(i) for i in inside) or sum(i.op == "FFMA" for i in inside) >= 64,
        children=bool(lp.children),
        shuffles=any(i.op == "SHFL" for i in inside),
        loads=bool(loads),
        wide_loads=any(sass.global_bytes_per_lane(i) >= 8 for i in loads),
        mufu=any(i.op == "MUFU" for i in inside),
    )


def _own(instrs, live, roots, lp):
    from tools import sass
    return [i for i in instrs if i.addr in live and sass.innermost(roots, i.addr) is lp]


def loop_trips(symbol: str, instrs, live, roots, names: dict) -> dict:
    """{id(loop): (role, trips per execution of its parent)} for every live loop of a kernel."""
    from tools import sass

    rules = KERNELS[kind_of(symbol)]["loops"]
    roles: dict[int, str] = {}
    out: dict[int, tuple] = {}
    for lp in sass.all_loops(roots):  # parents before children
        facts = _facts(instrs, live, lp, roles)
        rule = next((r for r in rules if eval(r[1], {"__builtins__": {}}, facts)), None)
        if rule is None:
            raise ValueError(f"{symbol}: the loop at {lp.start:#x}..{lp.end:#x} ({facts}) matches no rule of "
                             f"its kind in tools/cuda_cost.py's KERNELS: add one saying what it walks")
        role, _, trips_expr, marker = rule
        inside = [i for i in instrs if lp.contains(i.addr) and i.addr in live]
        flops = sum(sass.mma_flops(i) or (64 if i.op == "FFMA" else 0) for i in inside)
        env = dict(names, cdiv=lambda a, b: -(-a // b), record_tiles=record_tiles,
                   k_per_trip=max(1, flops // (2 * 16 * names["BN"])) if flops else 1)
        trips = eval(trips_expr, {"__builtins__": {}}, env)
        if marker is not None:
            op, per_iteration = marker
            count = sum(1 for i in _own(instrs, live, roots, lp) if i.op == op)
            trips = trips / max(1, count / per_iteration)
        roles[id(lp)] = role
        out[id(lp)] = (role, trips)
    return out


def count_launch(launch: Launch, listing: str, names: dict):
    """(instructions, bank loop, totals as cost_model.accumulate gives them, steady per-pair figure, roles)."""
    from tools import cost_model, sass

    kind = KERNELS[kind_of(launch.symbol)]
    instrs = sass.parse(listing)
    live = sass.live(instrs)
    roots = sass.loops(instrs, live)
    trips = loop_trips(launch.symbol, instrs, live, roots, names)
    programs = math.prod(launch.grid)
    warps = math.prod(launch.block) // 32

    def chain(ins):
        out, lp = [], sass.innermost(roots, ins.addr)
        while lp is not None:
            out.append(lp)
            lp = lp.parent
        return out

    def executions(ins):
        if ins.addr not in live:
            return 0
        return programs * math.prod(trips[id(lp)][1] for lp in chain(ins))

    totals = cost_model.accumulate(instrs, executions, warps)
    # (the resident forward's bank loop is nested in its rare-tile loop: searched at every depth)
    bank = next((lp for lp in sass.all_loops(roots) if trips[id(lp)][0] == "bank"), None) if kind["streaming"] else None
    steady = None
    if bank is not None:
        # One trip of the bank loop per (row, bank row) pair of its BM x BN tile, for every feature slice.
        # (the loops nested in it only: an enclosing loop, the resident forward's rare tiles, is not part of a trip)
        per_trip = sum(math.prod(trips[id(lp)][1] for lp in chain(i)[:chain(i).index(bank)])
                       for i in instrs if i.addr in live and bank in chain(i))
        if "pairs_per_trip" in kind:  # one (row, split) per warp: a trip covers that many of its pairs
            steady = per_trip / eval(kind["pairs_per_trip"], {"__builtins__": {}}, dict(names))
        else:
            steady = per_trip * warps * launch.grid[2] / (names["BM"] * names["BN"])
    return instrs, bank, totals, steady, trips


def analyse(arch="sm_90", dtype="bfloat16", bank_dtype=None, precision="highest", D=128, B=4096, K=262144,
            gpu=None, objective="ce", memory="fifo", module=None):
    """One forward + backward call of the CUDA backend: the dict tools/cost_model.py's analyse returns
    (module: count a built extension's machine code instead of compiling rrd_cuda.cu). The objective is a
    run-time flag of the merge kernel here (the same machine code for CE and KL), so it changes nothing."""
    from tools import cost_model

    if memory not in ("fifo", "gathered"):
        raise ValueError(f"memory: 'fifo' or 'gathered', not {memory!r}")
    bank_dtype = bank_dtype or dtype
    gpu = cost_model.GPUS[gpu or cost_model.DEFAULT_GPU[arch]]
    if memory == "gathered":
        # fp32 embeddings ("similarity" scores) against memories of bank_dtype, K columns per row
        if dtype != "float32" or bank_dtype not in MEMORY_DTYPES:
            raise ValueError("the CUDA gathered kernels take float32 embeddings and float32/float16/bfloat16 memories")
        mode = None
        found, plans = launches(0, B, K, D, gpu.sms, "gathered", MEMORY_DTYPES[bank_dtype])
    else:
        if bank_dtype != dtype:
            raise ValueError("the CUDA cost model counts the embedding dtype's bank (bank_dtype = dtype)")
        mode = mode_of(dtype, precision)
        found, plans = launches(mode, B, K, D, gpu.sms)
    listings, records = machine_code(arch, module)
    consts = constants()
    pairs = B * K
    kernels = []
    for launch in found:
        plan = plans[launch.call]
        names = dict(consts, B=B, K=K, D=D, num_splits=plan["num_splits"], chunk=plan["chunk"],
                     bank_tiles=-(-K // consts["BN"]) / plan["num_splits"])
        if memory == "gathered":  # a warp's split holds chunk columns (the last one fewer: an upper bound)
            names["BN"] = consts["kGroups"]  # the k-per-trip unit of a product loop: one warp step
        if launch.symbol not in listings:
            raise KeyError(f"{launch.symbol}: launched by rrd_host.inl but not in the {arch} SASS")
        instrs, bank, tot, steady, trips = count_launch(launch, listings[launch.symbol], names)
        hbm = eval(KERNELS[kind_of(launch.symbol)]["hbm"], {"__builtins__": {}},
                   dict(B=B, K=K, D=D, emb=ELEMENT_BYTES[dtype], bank=ELEMENT_BYTES[bank_dtype],
                        workspace=plan["workspace_floats"], num_splits=plan["num_splits"]))
        rec = records.get(launch.symbol, {})
        kernels.append(dict(
            name=f"{kind_of(launch.symbol)} ({'memory ' + bank_dtype if mode is None else f'mode {mode}'})",
            symbol=launch.symbol, grid=list(launch.grid),
            block=list(launch.block), warps=math.prod(launch.block) // 32, smem=launch.smem,
            regs=rec.get("registers"), stack=rec.get("stack"), plan=plan,
            tiles={k: consts[k] for k in ("BM", "BN", "DK", "DV") if k in consts},
            sass_instructions=len(instrs),
            bank_loop_instructions=None if bank is None else sum(1 for i in instrs if bank.contains(i.addr)),
            loops=[dict(role=r, trips=round(t, 4)) for r, t in trips.values()],
            steady_warp_instructions_per_pair=None if steady is None else round(steady, 4),
            **cost_model.per_pair(tot, hbm, pairs),
        ))
    config = dict(backend="cuda", arch=arch, dtype=dtype, bank_dtype=bank_dtype,
                  precision=precision if dtype == "float32" and memory == "fifo" else None, D=D, B=B, K=K, objective=objective,
                  memory=memory)
    return cost_model.summarise(config, gpu, kernels)

"""Static cost model of a forward + backward call, from the SASS the real compiler emits (no GPU).

For one configuration (architecture, embedding and bank dtypes, fp32 matmul precision, D, B, K) it calls the
Triton backend's own forward and backward (rrd_kernels/triton_kernels/launch.py) on CPU tensors of the real
sizes while the compile gate's stand-in driver (tools/standin_driver.py) answers for the architecture: every
kernel the call launches is compiled by the real Triton + ptxas exactly as on a GPU, and each launch's grid,
warps and arguments are recorded instead of run. Each kernel's SASS (cuobjdump -sass) is then counted:

- the bank loop (the outermost loop holding the kernel's products) is executed once per bank tile of every
  row block and output slice: cdiv(K, BLOCK_K) x grid[0] x grid[2] iterations in all; loops nested in it walk
  the features, cdiv(D, BLOCK_DK) times; everything else runs once per program (its own loops over D
  cdiv(D, BLOCK_DK) times). Kernels without a bank loop (argmax, merge, finish) run per row: a loop there
  holding another walks the feature chunks, a loop inside one walks the splits, and a lone loop is counted
  max(n_splits, cdiv(D, BLOCK_DK)) times, an upper bound (O(B) work, a few % of the call at most), except
  the argmax kernel's, which walks cdiv(D_PAD, BLOCK_DK) feature chunks (its splits are one vector).
- warp-instructions: every SASS instruction one warp issues; MUFU lanes: MUFU warp-instructions x 32;
  tensor FLOPs: HMMA/HGMMA shapes (an HGMMA issue is a quarter of its warpgroup's 64 x N x K product);
  L2 bytes: global loads, stores and async copies x 32 lanes (an upper bound: masked lanes are counted);
  HBM bytes: every tensor argument once (the bank once per streaming kernel: the row blocks of a split read
  the same chunk at about the same time), the bank only B rows in a per-row kernel.

Predicted time on a named GPU (GPUS below, datasheet peaks): each bound is the time the call needs on that
resource alone: issue (4 warp-instructions per clock per SM), tensor (dense peak of the MMA's input type),
MUFU (16 lanes per clock per SM), memory (HBM bandwidth); peaks are scaled by the fraction an H200 reached in
our own measurements (docs/measurements.md). `predicted_ms` is the largest bound. The one kernel measured on
a card so far ran 2.3x its predicted time (docs/cost-model.md): real times are expected between
predicted_ms and calibrated_ms = CALIBRATION x predicted_ms until a GPU session measures more.

    python -m tools.cost_model --arch sm_90 --dtype bfloat16 --D 128 --B 4096 --K 262144 [--json]
    python -m tools.cost_model --table [--write]     # the benchmark configurations (tools/cost-report.txt)

--backend cuda counts the CUDA C++ kernels of csrc/ instead (tools/cuda_cost.py: nvcc's SASS of rrd_cuda.cu,
the launches the host code makes; its table is tools/cost-report-cuda.txt), through the same totals, bounds
and prediction (accumulate, per_pair, summarise below).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "tools" / "cost-report.txt"
BUDGET = ROOT / "tools" / "cost-budget.json"
# The CUDA C++ backend's table and budget (tools/cuda_cost.py): files of their own, stamped with the nvcc
# version and the csrc source hash instead of the triton version.
REPORT_CUDA = ROOT / "tools" / "cost-report-cuda.txt"
BUDGET_CUDA = ROOT / "tools" / "cost-budget-cuda.json"


@dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    sms: int
    clock_ghz: float  # the boost clock the datasheet's peaks are quoted at
    tflops: dict  # dense tensor-core peaks by input type, and "fp32" for FFMA
    hbm_tbps: float
    issue_per_clock_per_sm: int = 4  # four schedulers, one warp-instruction each per clock
    mufu_per_clock_per_sm: int = 16  # CUDA C++ Programming Guide, arithmetic instruction throughput, cc 8.x/9.0


# NVIDIA's datasheets: H100 Tensor Core GPU (SXM5), H200 Tensor Core GPU, A100 Tensor Core GPU (SXM4 80 GB);
# dense (no sparsity) figures. The H100 and H200 share the GH100 die (132 SMs at 1.83 GHz), not the memory.
GPUS = {
    "H100": GPU("H100 SXM5", "sm_90", 132, 1.83, {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 3.35),
    "H200": GPU("H200 SXM", "sm_90", 132, 1.83, {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 4.8),
    "A100": GPU("A100 SXM4 80GB", "sm_80", 108, 1.41, {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, 2.039),
}
DEFAULT_GPU = {"sm_90": "H200", "sm_80": "A100", "sm_86": "A100"}
# What an H200 reached of those peaks in our measurements (docs/measurements.md: bf16 matmul 693 TFLOP/s,
# TF32 390, fp32 51, copy 4.27 TB/s): the achievable share, applied to every GPU.
ACHIEVED = {"bf16": 693 / 989.4, "fp16": 693 / 989.4, "tf32": 390 / 494.7, "fp32": 51 / 66.9, "hbm": 4.27 / 4.8}
# Measured / predicted for the calibration kernel (docs/cost-model.md): a plain split-bank Triton forward, H200.
CALIBRATION = 2.3

CONFIGS = [  # the benchmark configurations (bench/config.py "sweep" corners and the issue's targets)
    dict(arch="sm_90", dtype="bfloat16", D=128, B=4096, K=262144),
    dict(arch="sm_90", dtype="bfloat16", D=256, B=1024, K=65536),
    dict(arch="sm_90", dtype="bfloat16", D=512, B=1024, K=65536),
    dict(arch="sm_90", dtype="float16", D=128, B=4096, K=262144),
    dict(arch="sm_90", dtype="float32", precision="high", D=128, B=4096, K=262144),
    dict(arch="sm_90", dtype="float32", precision="highest", D=128, B=4096, K=262144),
    dict(arch="sm_90", dtype="float32", precision="highest", D=256, B=1024, K=65536),
    dict(arch="sm_90", dtype="float32", precision="highest", D=128, B=64, K=16384),
    dict(arch="sm_80", dtype="bfloat16", D=128, B=4096, K=262144),
    dict(arch="sm_80", dtype="float32", precision="highest", D=256, B=1024, K=65536),
    dict(arch="sm_86", dtype="bfloat16", D=128, B=4096, K=262144),
    # The momentum memory (RRDMomentumLoss): nce_k + 1 gathered columns per row, the authors' size and a
    # larger batch.
    dict(arch="sm_90", dtype="float32", D=128, B=64, K=16385, memory="gathered"),
    dict(arch="sm_90", dtype="float32", D=128, B=1024, K=16385, memory="gathered"),
]
# The CUDA build ships sm_80 (which also serves 8.6 / 8.9) and sm_90 machine code.
CUDA_CONFIGS = [c for c in CONFIGS if c["arch"] != "sm_86"] + [
    dict(arch="sm_80", dtype="float32", precision="high", D=128, B=4096, K=262144),
]
BACKENDS = {  # backend: (configurations, report, budget)
    "triton": (CONFIGS, REPORT, BUDGET),
    "cuda": (CUDA_CONFIGS, REPORT_CUDA, BUDGET_CUDA),
}


def _mma_type(opcode: str) -> str:
    """Input type of an MMA from its SASS modifiers (fp16 inputs carry no suffix)."""
    mods = opcode.split(".")
    return "bf16" if "BF16" in mods else "tf32" if "TF32" in mods else "fp16"


class _Recorder:
    """A stand-in launcher that records each launch (kernel, grid, arguments) instead of running it."""
    launches: list = []

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        self.launches.append((self.src, self.metadata, (g0, g1, g2), args))


def _compiled_kernels():
    from rrd_kernels.triton_kernels import launch
    out = {}
    for k in launch._KERNELS:
        for dev in k.device_caches.values():
            for compiled in dev[0].values():
                out[compiled.metadata.hash] = compiled
    return out


def _args_by_name(src, args):
    names = src.fn.arg_names
    values = dict(zip(names, args)) if len(args) == len(names) else {}
    for key, value in src.constants.items():
        values[names[key[0]]] = value
    return values


def accumulate(instrs, executions, warps: int) -> dict:
    """Totals over one launch, given how many times one warp of the launch issues each instruction
    (executions(ins), summed over programs): warp-instructions, MUFU lanes, FFMA lanes, L2 bytes and tensor
    FLOPs by input type."""
    from tools import sass

    totals = dict(warp_instructions=0.0, mufu_lanes=0.0, ffma_lanes=0.0, l2_bytes=0.0, tensor_flops={})
    for ins in instrs:
        n = executions(ins) * warps
        if not n:
            continue
        totals["warp_instructions"] += n
        if ins.op == "MUFU":
            totals["mufu_lanes"] += n * sass.MUFU_LANES
        if ins.op == "FFMA":
            totals["ffma_lanes"] += n * 32
        totals["l2_bytes"] += n * 32 * sass.global_bytes_per_lane(ins)
        flops = sass.mma_flops(ins)
        if flops:
            t = _mma_type(ins.opcode)
            totals["tensor_flops"][t] = totals["tensor_flops"].get(t, 0.0) + n * flops
    return totals


def per_pair(totals: dict, hbm_bytes: float, pairs: int) -> dict:
    """A kernel's totals (accumulate) and HBM bytes as the per-pair figures of the JSON's kernel entries."""
    return dict(
        warp_instructions_per_pair=totals["warp_instructions"] / pairs,
        mufu_per_pair=totals["mufu_lanes"] / pairs,
        tensor_flop_per_pair=sum(totals["tensor_flops"].values()) / pairs,
        tensor_flop_by_type={k: v / pairs for k, v in totals["tensor_flops"].items()},
        ffma_lanes_per_pair=totals["ffma_lanes"] / pairs,
        l2_bytes_per_pair=totals["l2_bytes"] / pairs,
        hbm_bytes_per_pair=hbm_bytes / pairs,
    )


def _count_kernel(compiled, grid, values, B, K, D):
    """Totals over one launch: warp-instructions, MUFU lanes, tensor FLOPs by type, FFMA lanes, L2 bytes."""
    from tools import sass

    instrs = sass.parse(sass.disassemble(compiled.asm["cubin"]))
    roots = sass.loops(instrs)
    warps = compiled.metadata.num_warps
    programs = grid[0] * grid[1] * grid[2]
    streaming = "tiles_per_split" in values  # walks a chunk of the bank (the forward and backward passes)
    block_k = values.get("BLOCK_K")
    block_dk = values.get("BLOCK_DK") or D
    d_trips = max(1, math.ceil(D / block_dk))
    # A per-row kernel's loops walk the splits or the feature chunks. A loop holding another walks the
    # features (the finish kernel's chunks, each summing the splits); a loop inside one walks the splits; a
    # lone loop is counted with the larger of the two (an upper bound), but the argmax kernel's walks the
    # features.
    splits = values.get("n_splits") or grid[1]
    lone_trips = max(splits, d_trips)
    if "SPLITS" in values:  # rrd_argmax_kernel: its splits are one vector; its one loop walks D_PAD
        lone_trips = math.ceil(values["D_PAD"] / block_dk)

    def row_trips(lp) -> int:
        if lp.children:
            return d_trips
        return splits if lp.parent is not None else lone_trips

    def product_weight(loop):
        inside = [i for i in instrs if loop.contains(i.addr)]
        mma = sum(1 for i in inside if sass.mma_flops(i))
        return mma if mma else sum(1 for i in inside if i.op == "FFMA") * 1e-3

    bank_loop = None
    if streaming and roots:
        bank_loop = max(roots, key=product_weight)
        if product_weight(bank_loop) == 0:
            bank_loop = None

    def chain(ins) -> list:
        """The loops around an instruction, innermost first."""
        out, lp = [], sass.innermost(roots, ins.addr)
        while lp is not None:
            out.append(lp)
            lp = lp.parent
        return out

    def executions(ins) -> float:
        """How many times one warp of the whole launch's programs issues this instruction, summed."""
        around = chain(ins)
        if bank_loop is None:
            return programs * math.prod(row_trips(lp) for lp in around)
        if bank_loop in around:
            # Loops inside the bank loop walk the features; the bank loop runs once per tile of the bank
            # for every row block and output slice.
            iterations = grid[0] * grid[2] * math.ceil(K / block_k)
            return iterations * d_trips ** around.index(bank_loop)
        return programs * d_trips ** len(around)

    totals = accumulate(instrs, executions, warps)
    steady = None
    if bank_loop is not None:
        # One iteration of the bank loop, per (row, bank row) pair of its tile: the steady state.
        # (An instruction in the bank loop's range but not nested in it, as when the compiler's loops overlap
        # rather than nest, counts once.)
        per_iter = sum(d_trips ** (chain(i).index(bank_loop) if bank_loop in chain(i) else 0)
                       for i in instrs if bank_loop.contains(i.addr))
        slices = grid[2]
        steady = per_iter * warps * slices / (values.get("BLOCK_B", 1) * block_k)  # gathered kernels: 1 row
    return instrs, bank_loop, totals, steady


def _hbm_bytes(src, values, bank_loop, B, D, bank_bytes, gathered_cols=0):
    import torch
    total = 0
    seen = set()
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            if gathered_cols and name in ("MS", "MT"):
                total += B * gathered_cols * D * bank_bytes  # every (row, column) reads its own memory row
                continue
            # A tensor passed twice (the resident kernels' unused PLANES arguments repeat S, T and Q) is read
            # once.
            if (v.data_ptr(), v.numel()) in seen:
                continue
            seen.add((v.data_ptr(), v.numel()))
            if name == "Q" and bank_loop is None:
                total += B * D * bank_bytes  # a per-row kernel reads the bank's reference rows only
            else:
                total += v.numel() * v.element_size()
    return total


def analyse(arch="sm_90", dtype="bfloat16", bank_dtype=None, precision="highest", D=128, B=4096, K=262144,
            gpu=None, objective="ce", memory="fifo"):
    """The cost of one forward + backward call: a dict (see the module docstring and --json). memory
    "gathered": the gathered-memory kernels (triton_kernels/gathered.py) with K columns per row (nce_k + 1)
    drawn from a memory of max(K, 50000) rows; their pairs are (row, own column), and their HBM bytes are the
    gathered rows themselves (no reuse between rows assumed: the floor of a per-row bank)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="rrd-cost-"))
    sys.path.insert(0, str(ROOT))
    import torch

    from rrd_kernels.triton_kernels import launch
    from tools import standin_driver

    bank_dtype = bank_dtype or dtype
    dt, bdt = getattr(torch, dtype), getattr(torch, bank_dtype)
    torch.set_float32_matmul_precision(precision)
    s = torch.zeros(B, D, dtype=dt)
    t = torch.zeros(B, D, dtype=dt)
    q = torch.zeros(max(K, 50000) if memory == "gathered" else K, D, dtype=bdt)
    _Recorder.launches = []
    with standin_driver.stand_in(standin_driver.ARCHS[arch], launcher_cls=_Recorder):
        if memory == "gathered":
            from rrd_kernels.triton_kernels.gathered import gathered_rows_and_grad

            index = torch.zeros(B, K, dtype=torch.int64)
            gathered_rows_and_grad(s, t, q, q, index, 0.1, 0.02, objective == "kl")
        else:
            rows, lse_s, lse_t, ref = launch.forward(s, t, q, 0.1, 0.02, objective == "kl")
            launch.backward(torch.ones(B), s, t, q, lse_s, lse_t, ref, 0.1, 0.02)
        compiled = _compiled_kernels()
    gpu = GPUS[gpu or DEFAULT_GPU[arch]]
    pairs = B * K
    kernels = []
    for src, md, grid, args in _Recorder.launches:
        values = _args_by_name(src, args)
        instrs, bank_loop, tot, steady = _count_kernel(compiled[md.hash], grid, values, B, K, D)
        hbm = _hbm_bytes(src, values, bank_loop, B, D, bdt.itemsize, gathered_cols=K if memory == "gathered" else 0)
        from tools.triton_gate import _resources
        regs, stack = _resources(compiled[md.hash].asm["cubin"])
        kernels.append(dict(
            name=src.fn.__name__, grid=list(grid), warps=md.num_warps, stages=md.num_stages, regs=regs, stack=stack,
            tiles={k: v for k, v in values.items() if k.startswith("BLOCK_")},
            sass_instructions=len(instrs),
            bank_loop_instructions=None if bank_loop is None else sum(1 for i in instrs if bank_loop.contains(i.addr)),
            steady_warp_instructions_per_pair=None if steady is None else round(steady, 4),
            **per_pair(tot, hbm, pairs),
        ))
    config = dict(arch=arch, dtype=dtype, bank_dtype=bank_dtype, precision=precision if dtype == "float32" else None,
                  D=D, B=B, K=K, objective=objective, memory=memory)
    return summarise(config, gpu, kernels)


def summarise(config: dict, gpu: GPU, kernels: list[dict]) -> dict:
    """The call's result (the --json object) from its kernels' per-pair figures: totals, the bounds on `gpu`
    and the prediction. One code path for both backends."""
    D, pairs = config["D"], config["B"] * config["K"]
    total = {key: sum(k[key] for k in kernels) for key in (
        "warp_instructions_per_pair", "mufu_per_pair", "tensor_flop_per_pair", "ffma_lanes_per_pair",
        "l2_bytes_per_pair", "hbm_bytes_per_pair")}
    by_type: dict[str, float] = {}
    for k in kernels:
        for typ, v in k["tensor_flop_by_type"].items():
            by_type[typ] = by_type.get(typ, 0.0) + v
    clock = gpu.clock_ghz * 1e9
    bounds = {
        "issue": pairs * total["warp_instructions_per_pair"] / (gpu.issue_per_clock_per_sm * gpu.sms * clock),
        "tensor": sum(pairs * v / (gpu.tflops[typ] * ACHIEVED[typ] * 1e12) for typ, v in by_type.items()),
        "mufu": pairs * total["mufu_per_pair"] / (gpu.mufu_per_clock_per_sm * gpu.sms * clock),
        "memory": pairs * total["hbm_bytes_per_pair"] / (gpu.hbm_tbps * ACHIEVED["hbm"] * 1e12),
    }
    bounds_ms = {k: v * 1e3 for k, v in bounds.items()}
    predicted = max(bounds_ms.values())
    return dict(
        config=config,
        gpu=gpu.name,
        warp_instructions_per_pair=total["warp_instructions_per_pair"],
        mufu_per_pair=total["mufu_per_pair"],
        tensor_flop_per_pair=total["tensor_flop_per_pair"],
        bank_products=total["tensor_flop_per_pair"] / (2 * D),
        ffma_lanes_per_pair=total["ffma_lanes_per_pair"],
        l2_bytes_per_pair=total["l2_bytes_per_pair"],
        hbm_bytes_per_pair=total["hbm_bytes_per_pair"],
        bounds_ms=bounds_ms,
        bound=max(bounds_ms, key=bounds_ms.get),
        predicted_ms=predicted,
        calibrated_ms=predicted * CALIBRATION,
        kernels=kernels,
    )


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt_int(x):
    return "-" if x is None else str(x)


def format_result(r: dict) -> str:
    c = r["config"]
    head = (f"{c['arch']} {c['dtype']}{'/' + c['precision'] if c['precision'] else ''} bank {c['bank_dtype']} "
            f"D {c['D']} B {c['B']} K {c['K']} on {r['gpu']}")
    lines = [head, f"{'kernel':24} {'grid':>16} {'warps':>5} {'regs':>4} {'stack':>5} {'steady/pair':>11} {'warp-instr/pair':>15} "
                   f"{'MUFU/pair':>9} {'products':>8} {'L2 B/pair':>9} {'HBM B/pair':>10}"]
    for k in r["kernels"]:
        lines.append(
            f"{k['name']:24} {'x'.join(map(str, k['grid'])):>16} {k['warps']:>5} {_fmt_int(k['regs']):>4} "
            f"{_fmt_int(k['stack']):>5} "
            f"{_fmt(k['steady_warp_instructions_per_pair']):>11} {_fmt(k['warp_instructions_per_pair']):>15} "
            f"{_fmt(k['mufu_per_pair']):>9} {_fmt(k['tensor_flop_per_pair'] / (2 * c['D']), 2):>8} "
            f"{_fmt(k['l2_bytes_per_pair'], 2):>9} {_fmt(k['hbm_bytes_per_pair'], 3):>10}")
    lines.append(
        f"{'total':24} {'':>16} {'':>5} {'':>4} {'':>5} {'':>11} {_fmt(r['warp_instructions_per_pair']):>15} "
        f"{_fmt(r['mufu_per_pair']):>9} {_fmt(r['bank_products'], 2):>8} {_fmt(r['l2_bytes_per_pair'], 2):>9} "
        f"{_fmt(r['hbm_bytes_per_pair'], 3):>10}")
    b = r["bounds_ms"]
    lines.append("bounds (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in b.items())
                 + f"; predicted {r['predicted_ms']:.3f} ms ({r['bound']}-bound), "
                   f"calibrated {r['calibrated_ms']:.3f} ms")
    return "\n".join(lines)


def table_row(r: dict) -> str:
    c = r["config"]
    mode = ("gathered " if c.get("memory") == "gathered" else "") + c["dtype"] + (
        "/" + c["precision"] if c["precision"] and c.get("memory") != "gathered" else "")
    return (f"{c['arch']:6} {mode:17} {c['D']:>4} {c['B']:>5} {c['K']:>8} {r['gpu']:15} "
            f"{r['warp_instructions_per_pair']:>8.3f} {r['mufu_per_pair']:>6.2f} {r['bank_products']:>5.2f} "
            f"{r['l2_bytes_per_pair']:>7.2f} {r['bounds_ms']['issue']:>7.3f} {r['bounds_ms']['tensor']:>7.3f} "
            f"{r['bounds_ms']['mufu']:>7.3f} {r['bounds_ms']['memory']:>7.3f} {r['predicted_ms']:>9.3f}")


def table_header(backend: str = "triton") -> list[str]:
    if backend == "cuda":
        from tools import cuda_cost
        first = [f"# Static cost model of the CUDA backend (tools/cuda_cost.py), nvcc {cuda_cost.nvcc_version()},",
                 f"# csrc source {cuda_cost.source_hash()}: forward + backward per (row, bank row)"]
    else:
        import triton
        first = [f"# Static cost model (tools/cost_model.py), triton {triton.__version__}: forward + backward per (row, bank row)"]
    return first + [
        "# pair, counted from the SASS of every kernel one call launches; bounds and predicted time in ms on the",
        "# named GPU (datasheet peaks x the share an H200 reached); real times so far ~2.3x predicted (docs/cost-model.md).",
    ]


def table(results: list[dict], backend: str = "triton") -> str:
    lines = [
        *table_header(backend),
        f"{'arch':6} {'mode':17} {'D':>4} {'B':>5} {'K':>8} {'gpu':15} {'instr':>8} {'MUFU':>6} {'prod':>5} "
        f"{'L2 B':>7} {'issue':>7} {'tensor':>7} {'mufu':>7} {'memory':>7} {'predicted':>9}",
    ]
    lines += [table_row(r) for r in results]
    return "\n".join(lines) + "\n"


def _config_key(c: dict) -> str:
    mode = f"{c['dtype']}{'/' + (c.get('precision') or 'highest') if c['dtype'] == 'float32' else ''}"
    if c.get("memory") == "gathered":
        mode = f"gathered {c['dtype']}"
    return f"{c['arch']} {mode} D{c['D']} B{c['B']} K{c['K']}"


def analyse_backend(backend: str = "triton", module=None, **config) -> dict:
    if backend == "cuda":
        from tools import cuda_cost
        return cuda_cost.analyse(**config, module=module)
    if module is not None:
        raise ValueError("--module counts a built CUDA extension: it needs --backend cuda")
    return analyse(**config)


def _run_config(c):
    return analyse(**c)


def _compile_cuda(arch):
    from tools import cuda_cost
    cuda_cost.machine_code(arch)


def run_table(jobs=1, backend: str = "triton") -> list[dict]:
    import concurrent.futures as futures
    configs = BACKENDS[backend][0]
    if backend == "cuda":
        # Compile each architecture once (in parallel), then count from the cache: seconds per row.
        from tools import cuda_cost
        archs = sorted({c["arch"] for c in configs})
        with futures.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(archs)))) as pool:
            list(pool.map(_compile_cuda, archs))
        return [cuda_cost.analyse(**c) for c in configs]
    if jobs <= 1:
        return [_run_config(c) for c in configs]
    with futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_run_config, configs))


BUDGET_KEYS = ("warp_instructions_per_pair", "mufu_per_pair", "bank_products")


def budget_of(results: list[dict]) -> dict:
    return {_config_key(r["config"]): {k: round(r[k], 4) for k in BUDGET_KEYS} for r in results}


def regressions(results: list[dict], budget: dict, slack: float = 0.0) -> list[str]:
    """What is worse than the committed budget (more than `slack`, relative), one line each."""
    out = []
    for key, now in budget_of(results).items():
        if key not in budget:
            out.append(f"{key}: no committed budget (run `python -m tools.cost_model [--backend cuda] --table --write`)")
            continue
        for k in BUDGET_KEYS:
            limit = budget[key][k] * (1 + slack) + 1e-4
            if now[k] > limit:
                out.append(f"{key}: {k} {now[k]} > budget {budget[key][k]}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_86", "sm_90"], help="target (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="embedding dtype (default %(default)s)")
    p.add_argument("--bank-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="bank dtype (default: the embedding dtype)")
    p.add_argument("--precision", default="highest", choices=["highest", "high"],
                   help="torch.get_float32_matmul_precision() for fp32 embeddings (default %(default)s)")
    p.add_argument("--D", type=int, default=128, help="embedding dimension (default %(default)s)")
    p.add_argument("--B", type=int, default=4096, help="batch rows (default %(default)s)")
    p.add_argument("--K", type=int, default=262144, help="bank rows (default %(default)s)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="GPU for the prediction (default: H200 for "
                   "sm_90, A100 for sm_80/sm_86)")
    p.add_argument("--objective", default="ce", choices=["ce", "kl"],
                   help="the loss (default %(default)s; kl also forms the teacher's entropy in the forward)")
    p.add_argument("--memory", default="fifo", choices=["fifo", "gathered"],
                   help="fifo: the bank kernels; gathered: the momentum memory's gathered-memory kernels, K "
                        "columns per row (default %(default)s)")
    p.add_argument("--backend", default="triton", choices=sorted(BACKENDS),
                   help="the kernels to count: triton (rrd_kernels/triton_kernels) or cuda (csrc/, compiled with "
                        "nvcc; tools/cuda_cost.py) (default %(default)s)")
    p.add_argument("--module", default=None, help="with --backend cuda: count the machine code of this built "
                   "extension (rrd_kernels/_rrd_cuda*.so) instead of compiling csrc/rrd_cuda.cu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--table", action="store_true", help="every benchmark configuration (CONFIGS, or CUDA_CONFIGS "
                   "with --backend cuda), as one table")
    p.add_argument("--write", action="store_true", help=f"with --table: rewrite {REPORT.relative_to(ROOT)} and "
                   f"{BUDGET.relative_to(ROOT)} (--backend cuda: {REPORT_CUDA.relative_to(ROOT)} and "
                   f"{BUDGET_CUDA.relative_to(ROOT)}; refused where a figure got worse, unless --allow-worse)")
    p.add_argument("--allow-worse", action="store_true", help="with --write: accept a worse budget")
    p.add_argument("--check", action="store_true", help="with --table: exit 1 where a figure is worse than the "
                   "committed budget")
    p.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes for --table")
    args = p.parse_args(argv)
    _, report, budget_file = BACKENDS[args.backend]
    if args.table:
        results = run_table(args.jobs, args.backend)
        text = table(results, args.backend)
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            print(text, end="")
        budget = json.loads(budget_file.read_text()) if budget_file.exists() else {}
        worse = regressions(results, budget)
        for line in worse:
            print("worse than budget: " + line, file=sys.stderr)
        if args.write:
            if worse and budget and not args.allow_worse:
                print("not written: a budget would get worse (--allow-worse to accept it)", file=sys.stderr)
                return 1
            report.write_text(text)
            budget_file.write_text(json.dumps(budget_of(results), indent=1, sort_keys=True) + "\n")
            return 0
        return 1 if (args.check and worse) else 0
    r = analyse_backend(args.backend, module=args.module, arch=args.arch, dtype=args.dtype, bank_dtype=args.bank_dtype,
                        precision=args.precision, D=args.D, B=args.B, K=args.K, gpu=args.gpu,
                        objective=args.objective, memory=args.memory)
    print(json.dumps(r, indent=1) if args.json else format_result(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

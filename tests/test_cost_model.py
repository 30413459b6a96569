"""The static cost model (tools/cost_model.py, tools/sass.py): its SASS reading, its CLI, and the performance
gate: no kernel or plan change may make a committed budget (tools/cost-budget.json) worse."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import have_triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools import sass  # noqa: E402

PINNED_TRITON = "3.6.0"

# A made-up SASS listing in cuobjdump's layout: a loop (0x0040..0x00c0) holding a nested loop
# (0x0060..0x0080) and a warpgroup MMA, then a second top-level loop.
LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/                   MUFU.EX2 R3, R2 ;
        /*0060*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], [R6.64] ;
        /*0070*/                   FFMA R7, R8, R9, R7 ;
        /*0080*/              @!P1 BRA 0x60 ;
        /*0090*/                   HMMA.16816.F32.BF16 R10, R12, R14, R10 ;
        /*00a0*/                   LDG.E.64 R16, desc[UR4][R18.64] ;
        /*00c0*/               @P0 BRA 0x40 ;
        /*00d0*/                   STG.E [R2.64], R3 ;
        /*00e0*/                   BRA 0xf0 ;
        /*00f0*/                   ISETP.GE.AND P0, PT, R1, 0x1, PT ;
        /*0100*/              @!P0 BRA 0xf0 ;
        /*0110*/                   EXIT ;
"""


def test_sass_loops_nest_by_backward_branches():
    instrs = sass.parse(LISTING)
    assert [i.op for i in instrs][:4] == ["LDC", "S2R", "HGMMA", "MUFU"]
    roots = sass.loops(instrs)
    assert [(r.start, r.end) for r in roots] == [(0x40, 0xc0), (0xf0, 0x100)]
    (inner,) = roots[0].children
    assert (inner.start, inner.end, inner.depth) == (0x60, 0x80, 1)
    assert sass.innermost(roots, 0x70) is inner and sass.innermost(roots, 0x90) is roots[0]
    assert sass.innermost(roots, 0xd0) is None  # the forward BRA at 0xe0 makes no loop


def test_sass_costs_of_single_instructions():
    by_op = {i.op: i for i in sass.parse(LISTING)}
    assert sass.mma_flops(by_op["HGMMA"]) == 2 * 64 * 64 * 16 // 4  # one warp's share of its warpgroup's MMA
    assert sass.mma_flops(by_op["HMMA"]) == 2 * 16 * 8 * 16
    assert sass.mma_flops(by_op["FFMA"]) == 0
    assert sass.global_bytes_per_lane(by_op["LDGSTS"]) == 16
    assert sass.global_bytes_per_lane(by_op["LDG"]) == 8
    assert sass.global_bytes_per_lane(by_op["STG"]) == 4
    assert sass.global_bytes_per_lane(by_op["MUFU"]) == 0


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args, timeout=1200):
    out = subprocess.run([sys.executable, "-m", "tools.cost_model", *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    return out


@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_cli_json_has_the_documented_fields_and_consistent_totals():
    out = _run("--arch", "sm_90", "--dtype", "bfloat16", "--D", "128", "--B", "4096", "--K", "262144", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    for key in ("warp_instructions_per_pair", "mufu_per_pair", "tensor_flop_per_pair", "predicted_ms", "kernels"):
        assert key in r
    streaming = [k["name"] for k in r["kernels"] if k["steady_warp_instructions_per_pair"] is not None]
    assert len(streaming) == 2 and streaming[0].startswith("rrd_fwd") and streaming[1].startswith("rrd_bwd")
    assert r["warp_instructions_per_pair"] == pytest.approx(sum(k["warp_instructions_per_pair"] for k in r["kernels"]))
    # At least the two forward products and the backward's c Q product run on tensor cores.
    assert r["tensor_flop_per_pair"] >= 3 * 2 * 128
    assert r["predicted_ms"] == max(r["bounds_ms"].values()) > 0


@pytest.mark.slow
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_no_benchmark_configuration_is_worse_than_its_committed_budget():
    """The performance gate. With the pinned triton the committed table must be current and no figure may
    exceed its budget; with another triton (what a fresh venv takes) a figure up to 15 % over the budget is a
    warning (another compiler schedules differently), beyond that a failure."""
    import triton

    _check_budget("triton", f"triton {triton.__version__}", triton.__version__ == PINNED_TRITON,
                  f"triton {PINNED_TRITON}")


def _check_budget(backend, compiler, pinned, pinned_name):
    """Recount the backend's table: with the pinned compiler it must equal the committed one and no figure may
    exceed its budget; with another, up to 15 % over budget is a warning, beyond it a failure."""
    from tools import cost_model

    _, report, budget_file = cost_model.BACKENDS[backend]
    out = _run("--backend", backend, "--table", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    budget = json.loads(budget_file.read_text())
    assert set(cost_model.budget_of(results)) == set(budget), "the budget and the configurations differ"
    if pinned:
        assert not cost_model.regressions(results, budget), "\n".join(cost_model.regressions(results, budget))
        assert cost_model.table(results, backend) == report.read_text(), (
            f"the committed {report.name} is stale: run `python -m tools.cost_model --backend {backend} --table "
            "--write` and commit it")
        return
    hard = cost_model.regressions(results, budget, slack=0.15)
    assert not hard, "\n".join(hard)
    soft = cost_model.regressions(results, budget)
    if soft:
        warnings.warn(f"with {compiler} (budget made with {pinned_name}):\n" + "\n".join(soft))


def test_committed_cost_report_is_made_with_the_pinned_triton():
    first = (ROOT / "tools" / "cost-report.txt").read_text().splitlines()[0]
    assert f"triton {PINNED_TRITON}:" in first, first


# ---- the CUDA backend (tools/cuda_cost.py) ------------------------------------------------------------------

PINNED_NVCC = "release 13.0"


def _nvcc_and_cuobjdump():
    from tools import cuda_cost
    g = cuda_cost.gate()
    return g.find_nvcc() is not None and g.find_cuobjdump() is not None


needs_nvcc = pytest.mark.skipif(not _nvcc_and_cuobjdump(), reason="nvcc or cuobjdump not found")

# cuobjdump's layout: a warp-synchronous reduction whose diverged-warp fallback sits after the EXIT and
# branches back (0x0100 -> 0x0020: not a loop), then a real loop (0x0030..0x0050).
DIVERGED_FALLBACK = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   BRA.DIV UR4, 0xa0 ;
        /*0020*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0030*/                   FFMA R7, R8, R9, R7 ;
        /*0040*/                   ISETP.GE.AND P0, PT, R1, 0x1, PT ;
        /*0050*/              @!P0 BRA 0x30 ;
        /*0060*/               @P1 EXIT ;
        /*0070*/                   CALL.REL.NOINC 0xc0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
        /*00a0*/                   WARPSYNC.COLLECTIVE R18, 0xb0 ;
        /*00b0*/                   BRA 0x20 ;
        /*00c0*/                   MUFU.RCP R0, R14 ;
        /*00d0*/                   RET.REL.NODEC R2 0x0 ;
"""


def test_sass_live_code_leaves_out_cold_fallbacks_and_their_back_branches():
    instrs = sass.parse(DIVERGED_FALLBACK)
    live = sass.live(instrs)
    assert {0x0, 0x10, 0x20, 0x30, 0x50, 0x60, 0x70, 0x80} <= live
    assert not live & {0x90, 0xa0, 0xb0, 0xc0, 0xd0}  # after EXIT: reached by BRA.DIV / CALL only
    assert [(r.start, r.end) for r in sass.loops(instrs, live)] == [(0x30, 0x50)]
    assert [(r.start, r.end) for r in sass.loops(instrs)][0] == (0x20, 0xb0)  # every backward branch


def test_cuda_constants_come_from_the_headers():
    from tools import cuda_cost
    c = cuda_cost.constants()
    assert c["kThreads"] == 128 and c["kWarps"] == c["kThreads"] // 32
    assert c["BM"] == 16 * c["kWarps"] and c["BN"] > 0


def _cuda_json(*args):
    out = _run("--backend", "cuda", *args, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@needs_nvcc
def test_cuda_cli_json_has_the_fields_of_the_triton_path_and_the_host_codes_launches():
    """One call's launches are the host code's (grid, block, shared memory, plan), the totals are the sum of
    the kernels', and the bank loop's steady figure is the forward's per-pair count (its only big loop)."""
    r = _cuda_json("--arch", "sm_90", "--dtype", "bfloat16", "--D", "128", "--B", "4096", "--K", "262144")
    for key in ("warp_instructions_per_pair", "mufu_per_pair", "tensor_flop_per_pair", "bank_products",
                "predicted_ms", "bounds_ms", "hbm_bytes_per_pair", "kernels"):
        assert key in r
    names = [k["name"].split(" (")[0] for k in r["kernels"]]
    assert names == ["forward resident", "merge", "backward resident", "finish"]  # bf16, D <= 128
    fwd, merge, bwd, finish = r["kernels"]
    c = __import__("tools.cuda_cost", fromlist=["constants"]).constants()
    assert fwd["grid"][0] == -(-4096 // c["BM"]) and fwd["grid"][1] == fwd["plan"]["num_splits"]
    assert bwd["grid"][2] == bwd["plan"]["num_dslices"] and finish["grid"][0] == 4096
    assert all(k["block"] == [c["kThreads"], 1, 1] and k["stack"] == 0 for k in r["kernels"])
    assert fwd["smem"] > 0 and bwd["smem"] > 0
    assert r["warp_instructions_per_pair"] == pytest.approx(sum(k["warp_instructions_per_pair"] for k in r["kernels"]))
    # the backward's bank loop is nearly all of it; the forward's adds the tiles that raise a maximum (the
    # rare-tile loop around its bank loop, test_cuda_resident_forward_count_matches_a_count_of_its_sass)
    assert bwd["warp_instructions_per_pair"] == pytest.approx(bwd["steady_warp_instructions_per_pair"], rel=0.02)
    assert fwd["steady_warp_instructions_per_pair"] < fwd["warp_instructions_per_pair"]
    # the forward's two logit products and the backward's three (two recomputed, c Q) on tensor cores, and
    # the backward's sigma: c against an n8 block of ones per 16 bank rows, 1 / 16 of a product at D 128
    # (no bank operand: the row sums of c as the c Q product sees it)
    assert fwd["tensor_flop_per_pair"] == pytest.approx(2 * 2 * 128, rel=0.01)
    assert bwd["tensor_flop_per_pair"] == pytest.approx((3 + 8 / 128) * 2 * 128, rel=0.01)
    assert r["bank_products"] == pytest.approx(5 + 1 / 16, rel=0.01) and bwd["grid"][2] == 1  # no feature slices
    assert r["predicted_ms"] == max(r["bounds_ms"].values()) > 0


@needs_nvcc
def test_cuda_gathered_call_is_counted_from_its_own_launches():
    """The gathered-memory call (RRDMomentumLoss, backend "cuda"): forward, backward and finish as
    rrd_gathered_host.inl launches them (one warp per (row, split), the D <= 128 instantiations at D 128),
    its column loop the streaming loop, and every (row, column) reading its own two memory rows: the memory
    bound is at least the floor of two passes over B x K x 2 rows of D fp32 (plus the index)."""
    r = _cuda_json("--memory", "gathered", "--arch", "sm_90", "--dtype", "float32", "--D", "128", "--B", "64",
                   "--K", "16385")
    assert [k["name"].split(" (")[0] for k in r["kernels"]] == ["gathered forward", "gathered backward",
                                                                "gathered finish"]
    fwd, bwd, finish = r["kernels"]
    assert "ILi0ELi16E" in fwd["symbol"] and "ILi0ELi16E" in bwd["symbol"]
    warps = fwd["plan"]["num_splits"] * 64
    assert fwd["grid"][0] * fwd["warps"] == -(-warps // fwd["warps"]) * fwd["warps"] and fwd["grid"] == bwd["grid"]
    assert fwd["steady_warp_instructions_per_pair"] > 0 and r["bank_products"] == 0
    assert r["hbm_bytes_per_pair"] >= 2 * (2 * 128 * 4 + 8)
    assert r["bound"] == "memory" and r["predicted_ms"] == max(r["bounds_ms"].values())


@needs_nvcc
def test_cuda_resident_forward_count_matches_a_count_of_its_sass():
    """The model's figures for the resident bf16 forward (the cp.async instantiation, the one a bf16,
    16-byte aligned bank runs), redone by hand from the listing. Its bank loop is split: an outer loop (the
    one top-level loop holding products and a nested loop) whose own body finishes a tile that raises a
    running maximum, around the inner bank loop (the common update only), which must hold no converting
    fallback (no nested loop, no plain global loads). Per pair: the inner loop once per 64-row tile x 4 warps /
    (64 x 64) pairs; the whole kernel adds the outer body once per tile where one of a warp's 128 running maxima
    sets a record (sum_i 1 - (1 - 1/i)^128 over the program's tiles, for logits in random order)."""
    from tools import cuda_cost
    listings, _ = cuda_cost.machine_code("sm_90")
    symbol = next(s for s in listings if "rrd_forward_resident_kernelILi3ELb1E" in s)
    instrs = sass.parse(listings[symbol])
    live = sass.live(instrs)

    def inside(lp):
        return [i for i in instrs if lp.contains(i.addr) and i.addr in live]

    (outer,) = [lp for lp in sass.loops(instrs, live)
                if lp.children and any(sass.mma_flops(i) for i in inside(lp))]
    (bank,) = outer.children
    assert not bank.children and not any(i.op == "LDG" for i in inside(bank))
    # 4 pairs of n8 tiles x 8 k-steps x (2 tiles x 2 products)
    assert sum(1 for i in inside(bank) if sass.mma_flops(i)) == 4 * (128 // 16) * 4
    hand = len(inside(bank)) * 4 / (64 * 64)
    r = _cuda_json("--arch", "sm_90", "--dtype", "bfloat16", "--D", "128", "--B", "4096", "--K", "262144")
    fwd = r["kernels"][0]
    assert fwd["symbol"] == symbol
    assert fwd["steady_warp_instructions_per_pair"] == pytest.approx(hand, rel=1e-3)
    tiles = 262144 // 64 // fwd["plan"]["num_splits"]
    records = sum(1 - (1 - 1 / i) ** 128 for i in range(1, tiles + 1))
    rare = (len(inside(outer)) - len(inside(bank))) * records / tiles * 4 / (64 * 64)
    # the rest (once per block: S, T, scales, the states) is small at 1024 tiles per program
    assert fwd["warp_instructions_per_pair"] == pytest.approx(hand + rare, rel=0.02)


@needs_nvcc
def test_cuda_counts_of_the_built_module_equal_those_of_the_cost_models_compile():
    """The cost model compiles rrd_cuda.cu itself, with the build's flags; the extension built from the same
    sources (where this checkout has one) carries the very same machine code, so counting it (--module)
    gives the same figures."""
    from rrd_kernels import cuda_backend

    info = cuda_backend.build_info()
    if info is None or f"source {_gate_hash()}" not in info:
        pytest.skip(f"no extension built from the current sources here ({info})")
    module = cuda_backend._ext.__file__
    for arch in ("sm_90", "sm_80"):
        if arch not in info.split(";")[1]:  # "source ...; archs sm_80 sm_90 + compute_90 PTX; nvcc ..."
            continue
        built = _cuda_json("--arch", arch, "--module", module)
        compiled = _cuda_json("--arch", arch)
        assert [k["sass_instructions"] for k in built["kernels"]] == [k["sass_instructions"] for k in compiled["kernels"]]
        assert built["warp_instructions_per_pair"] == pytest.approx(compiled["warp_instructions_per_pair"], rel=1e-9)


def _gate_hash():
    from tools import cuda_cost
    return cuda_cost.gate().source_hash()


@needs_nvcc
@pytest.mark.slow
def test_no_cuda_configuration_is_worse_than_its_committed_budget():
    """The CUDA performance gate, as the Triton one: with the pinned nvcc the committed table must be current
    (its source hash included) and no figure may exceed its budget; with another nvcc up to 15 % over budget
    is a warning, beyond it a failure."""
    from tools import cuda_cost

    _check_budget("cuda", f"nvcc {cuda_cost.nvcc_version()}", PINNED_NVCC in cuda_cost.nvcc_version(),
                  f"nvcc {PINNED_NVCC}")


def test_committed_cuda_cost_report_is_current_for_the_sources():
    """Without nvcc too: the committed CUDA table names the hash of the sources it was counted from, so a
    kernel or host-code change that does not refresh it fails here."""
    from tools import cuda_cost
    head = (ROOT / "tools" / "cost-report-cuda.txt").read_text().splitlines()[:2]
    assert PINNED_NVCC in head[0], head[0]
    assert f"csrc source {cuda_cost.source_hash()}:" in head[1], (
        f"{head[1]}: stale, run `python -m tools.cost_model --backend cuda --table --write` and commit it")

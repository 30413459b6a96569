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

    from tools import cost_model

    out = _run("--table", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    budget = json.loads(cost_model.BUDGET.read_text())
    assert set(cost_model.budget_of(results)) == set(budget), "budget and CONFIGS name different configurations"
    if triton.__version__ == PINNED_TRITON:
        assert not cost_model.regressions(results, budget), "\n".join(cost_model.regressions(results, budget))
        assert cost_model.table(results) == cost_model.REPORT.read_text(), (
            "the committed cost report is stale: run `python -m tools.cost_model --table --write` and commit it")
        return
    hard = cost_model.regressions(results, budget, slack=0.15)
    assert not hard, "\n".join(hard)
    soft = cost_model.regressions(results, budget)
    if soft:
        warnings.warn(f"with triton {triton.__version__} (budget made with {PINNED_TRITON}):\n" + "\n".join(soft))


def test_committed_cost_report_is_made_with_the_pinned_triton():
    first = (ROOT / "tools" / "cost-report.txt").read_text().splitlines()[0]
    assert f"triton {PINNED_TRITON}:" in first, first

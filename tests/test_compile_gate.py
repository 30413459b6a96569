"""The Triton kernels as a GPU would build them, checked without one.

The compile gate (tools/triton_gate.py) compiles every kernel configuration the launchers can choose for
sm_80, sm_86, sm_90, sm_100 and sm_120 with the real Triton compiler and fails on compile errors, shared
memory over the arch's limit and stack frames (spills); what the plans refuse (plans.UNSUPPORTED) it
reports without compiling. Its table is committed in rrd_kernels/triton_kernels/compile-report.txt and must
match what the compiler produces now. The plan tests check that the launchers read the device from Triton's
active driver, as a GPU call does, and which device gets which family.
"""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import have_triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.skipif(not have_triton(), reason="triton not installed")


def _gate_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PINNED_TRITON = "3.6.0"  # what the GPU machines and CI run; the committed report is made with it
SPILL = re.compile(r"FAIL stack \d+ B \(spills\)$")


def split_gate_output(stdout: str) -> tuple[str, list[str], str]:
    """(the table, as the committed report holds it; its rows; the footer) of the gate's output: the table
    ends at its last row, then come "# versions" notes and the footer line."""
    lines = stdout.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("sm_"))
    table = "\n".join(lines[:last + 1]) + "\n"
    return table, [line for line in lines[:last + 1] if line.startswith("sm_")], lines[-1].removeprefix("# ")


def test_gate_output_splits_into_table_notes_and_footer():
    out = ("# header\narch   kernel\nsm_80  k  a  ok\nsm_90  (refused)  b  refused (why)\n"
           "# versions: torch x, triton y\n# 2 rows: 1 kernels, 1 refused cases, 0 failing, 3 s\n")
    table, rows, footer = split_gate_output(out)
    assert table == "# header\narch   kernel\nsm_80  k  a  ok\nsm_90  (refused)  b  refused (why)\n"
    assert len(rows) == 2 and footer.startswith("2 rows")


@pytest.mark.slow
def test_every_kernel_compiles_fits_and_does_not_spill_on_every_gate_arch():
    """With the pinned triton: every kernel ok (or refused by the plans, not compiled), and the table equals
    the committed one. With another triton (a newcomer's fresh venv takes the newest): compile errors and
    shared memory over the limit still fail; a stack frame (spills) is reported as a warning, not a failure,
    because spill freedom is a tuning property of one compiler version (triton 3.8.0 gives some kernels
    8-40 B frames; docs/design.md, section 7)."""
    jobs = str(min(3, os.cpu_count() or 1))
    out = subprocess.run([sys.executable, "-m", "tools.triton_gate", "-j", jobs], cwd=ROOT, env=_gate_env(),
                         capture_output=True, text=True, timeout=3600)
    table, rows, footer = split_gate_output(out.stdout)
    assert re.match(r"\d+ rows", footer) and len(rows) == int(footer.split()[0]) > 0, out.stdout[-3000:] + out.stderr[-3000:]
    committed = (ROOT / "rrd_kernels" / "triton_kernels" / "compile-report.txt").read_text()
    if table.splitlines()[0] == committed.splitlines()[0]:  # the same triton version: exactly the committed table
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
        assert table == committed, (
            "the committed compile report is stale: run `python -m tools.triton_gate --write` and commit it"
        )
        return
    failing = [row for row in rows if " FAIL " in row]
    hard = [row for row in failing if not SPILL.search(row)]
    assert not hard, "\n".join(hard)
    if failing:
        warnings.warn(f"{len(failing)} of {len(rows)} kernels have a stack frame (spills) with this triton "
                      f"version; none with the pinned triton {PINNED_TRITON}:\n" + "\n".join(failing))


def test_committed_report_is_made_with_the_pinned_triton():
    from tools import triton_gate

    assert triton_gate.PINNED_TRITON == PINNED_TRITON and PINNED_TRITON in triton_gate.KNOWN_TRITON
    first = (ROOT / "rrd_kernels" / "triton_kernels" / "compile-report.txt").read_text().splitlines()[0]
    assert f"triton {PINNED_TRITON}:" in first, first
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'"triton=={PINNED_TRITON}"' in ci


def test_gate_reports_the_torch_triton_pair(monkeypatch):
    """The gate's versions notes: which triton and what is known of it; a warning when torch pins another
    triton than the one installed (what a GPU install of that torch would compile with)."""
    import importlib.metadata as md

    import triton

    from tools import triton_gate

    monkeypatch.setattr(md, "requires", lambda name: ['triton==9.9.9; platform_system == "Linux"'])
    notes, warns = triton_gate.versions()
    assert f"triton {triton.__version__}" in notes[0]
    assert len(warns) == 1 and "pins triton 9.9.9" in warns[0] and triton.__version__ in warns[0]
    monkeypatch.setattr(md, "requires", lambda name: ["filelock", "sympy>=1.13"])
    notes, warns = triton_gate.versions()
    assert not warns and any("pins no triton" in n for n in notes)
    monkeypatch.setattr(triton, "__version__", "0.0.1")
    assert "not a version checked here" in triton_gate.versions()[0][0]
    assert triton_gate.main(["--write", "--arch", "sm_80"]) == 2  # refuses before compiling anything


def test_gate_verdicts():
    from tools import triton_gate as g

    base = dict(arch="sm_90", kernel="rrd_fwd_kernel", case="c", regs=100, stack=0, shared=1024, limit=232448,
                warps=4, stages=1)
    assert g.verdict(base) == "ok" and not g.failed(base)
    assert g.verdict(base | dict(stack=8)) == "FAIL stack 8 B (spills)"
    assert g.verdict(base | dict(shared=300000)).startswith("FAIL shared 300000 > 232448")
    assert g.verdict(base | dict(arch="sm_120", stack=64)) == "FAIL stack 64 B (spills)"  # the Blackwell archs too
    refused = dict(arch="sm_100", kernel="(refused)", case="c", refused="why")
    assert g.verdict(refused) == "refused (why)" and not g.failed(refused)
    assert not g.failed(refused | dict(tried="still fails: RuntimeError: x"))


def _in_subprocess(code: str) -> str:
    """Run code with the interpreter off (the stand-in driver is a compile target, not an interpreter)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_gate_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_plan_follows_the_active_drivers_device():
    out = _in_subprocess(
        "import torch\n"
        "from tools.standin_driver import ARCHS, Arch, stand_in\n"
        "from rrd_kernels.triton_kernels import launch\n"
        "for name in ('sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120'):\n"
        "    with stand_in(ARCHS[name]):\n"
        "        p = launch.make_plan(64, 64 * 16632, 128, torch.bfloat16)\n"
        "        print(name, p.n_splits, p.n_row_blocks, p.tiles.block_k, launch.family(launch.current_limits()))\n"
        "with stand_in(Arch('sm_75', 75, 65536, 40)):\n"
        "    print('sm_75', launch.family(launch.current_limits()))\n"
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    # about two programs per multiprocessor: 2 x SMs splits of the one row block asked for, in whole and equal
    # chunks of bank tiles (so a few fewer where the tile count does not divide evenly)
    for name, sms in (("sm_80", 108), ("sm_86", 84), ("sm_90", 132), ("sm_100", 148), ("sm_120", 170)):
        n_splits, n_row_blocks, block_k, fam = lines[name].split()
        n_tiles = -(-64 * 16632 // int(block_k))
        per_split = -(-n_tiles // (2 * sms))
        assert (int(n_row_blocks), int(n_splits), fam) == (1, -(-n_tiles // per_split), name), lines[name]
        assert 0.95 * 2 * sms <= int(n_splits) <= 2 * sms
    assert lines["sm_75"] == "None"


def test_family_needs_capability_and_shared_memory():
    from rrd_kernels.triton_kernels.plans import DeviceLimits, family

    assert family(DeviceLimits(90, 232448, 132)) == "sm_90"
    assert family(DeviceLimits(80, 166912, 108)) == "sm_80"
    assert family(DeviceLimits(87, 166912, 16)) == "sm_80"  # Orin: sm_80 limits
    assert family(DeviceLimits(89, 101376, 128)) == "sm_86"  # RTX 40xx / L4
    assert family(DeviceLimits(100, 232448, 148)) == "sm_100"  # B200
    assert family(DeviceLimits(103, 232448, 148)) == "sm_100"  # B300: the plans checked for 10.0
    assert family(DeviceLimits(120, 101376, 170)) == "sm_120"  # consumer Blackwell: 99 KiB per block
    assert family(DeviceLimits(121, 101376, 48)) == "sm_120"  # GB10
    assert family(DeviceLimits(75, 65536, 40)) is None
    assert family(DeviceLimits(86, 49152, 10)) is None
    # plans only within the major version the gate compiles for: no family for 11.x (Thor) or 13.x, nor for
    # 9.x/10.x with less than their 227 KiB (the sm_80/sm_86 plans are compiled for 8.x only)
    assert family(DeviceLimits(110, 232448, 20)) is None
    assert family(DeviceLimits(130, 232448, 200)) is None
    assert family(DeviceLimits(90, 166912, 132)) is None
    assert family(DeviceLimits(100, 101376, 148)) is None


def test_blackwell_families_take_the_plans_they_borrow():
    """The same Tiles objects (a retune of sm_90 or sm_86 applies to sm_100 or sm_120 too), except on sm_100
    the chunked half tiles (64-feature chunks: sm_90's spill there at D 512), sm_90's fp16 planes ("ieee"),
    which do not fit its tensor memory, and the resident D-512 half tiles, whose forward spills there
    (plans.py)."""
    from rrd_kernels.triton_kernels.plans import _HALF_SM100, _RESIDENT_HALF_512, RESIDENT, TILES

    assert TILES["sm_120"] is TILES["sm_86"] and set(TILES["sm_100"]) == set(TILES["sm_90"])
    for mode, tiles in TILES["sm_100"].items():
        assert tiles is (_HALF_SM100 if mode.startswith("half") else TILES["sm_90"][mode]), mode
    assert RESIDENT["sm_120"] is RESIDENT["sm_86"]
    assert "ieee" in RESIDENT["sm_90"] and "ieee" not in RESIDENT["sm_100"]
    assert set(RESIDENT["sm_100"]) == set(RESIDENT["sm_90"]) - {"ieee"}
    for mode, entries in RESIDENT["sm_100"].items():
        sm90 = RESIDENT["sm_90"][mode]
        assert entries == tuple(r for r in sm90 if r is not _RESIDENT_HALF_512), mode
        assert all(a is b for a, b in zip(entries, sm90)), mode
    assert _RESIDENT_HALF_512 in RESIDENT["sm_90"]["half"] and _RESIDENT_HALF_512 in RESIDENT["sm_90"]["half_fp32_bank"]


def test_unsupported_refuses_what_does_not_compile_and_devices_without_a_family(monkeypatch):
    from rrd_kernels.triton_kernels import plans
    from rrd_kernels.triton_kernels.plans import UNSUPPORTED, DeviceLimits, make_plan, mode_of, unsupported

    monkeypatch.setattr(plans, "_triton_version", lambda: (3, 6, 0))
    b200, rtx5090, h200 = DeviceLimits(100, 232448, 148), DeviceLimits(120, 101376, 170), DeviceLimits(90, 232448, 132)
    chunked = {D: not make_plan(1, 1, D, b200, "half").resident for D in (1, 100, 128, 256, 300, 512)}
    assert chunked[512], "no D takes the chunked kernels on sm_100 any more: the sm_100 entries can go"
    for emb in (torch.bfloat16, torch.float16):
        for bank in (torch.float32, torch.bfloat16, torch.float16):
            mode = mode_of(False, "ieee", bank.itemsize)
            for D, on_chunked in chunked.items():
                reason = unsupported(b200, mode, emb, bank, D)
                if bank == emb or not on_chunked:
                    assert reason is None, (emb, bank, D)
                else:  # triton 3.6's pipeliner fails on sm_100 when the bank tile is cast before the product
                    assert "sm_100" in reason and "TritonGPUPipeline" in reason and str(emb)[6:] in reason
                    assert f"D = {D}" in reason
                assert unsupported(h200, mode, emb, bank, D) is None and unsupported(rtx5090, mode, emb, bank, D) is None
    assert unsupported(b200, "half", "float16", "float32", 512) == unsupported(b200, "half", torch.float16, torch.float32, 512)
    monkeypatch.setattr(plans, "_triton_version", lambda: (3, 8, 0))  # the first triton seen to compile them
    assert unsupported(b200, "half", torch.float16, torch.float32, 512) is None
    monkeypatch.setattr(plans, "_triton_version", lambda: (3, 6, 0))
    for precision in ("ieee", "tf32"):
        for bank in (torch.float32, torch.bfloat16):
            assert unsupported(b200, mode_of(True, precision, bank.itemsize), torch.float32, bank, 512) is None
    assert {key[0] for key in UNSUPPORTED} == {"sm_100"} and len(UNSUPPORTED) == 4
    assert {key[4] for key in UNSUPPORTED} == {"chunked"}
    reason = unsupported(DeviceLimits(75, 65536, 40), "ieee", torch.float32, torch.float32, 128)
    assert "7.5" in reason and "sm_120 (12.x, >= 99 KiB)" in reason


@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_gate_refuses_what_the_plans_refuse_without_compiling():
    """tools.triton_gate.refusal asks the plans as the launcher does, for the stand-in driver's device (the
    sm_100 refusals hold for triton before 3.8, on the chunked kernels: D 512 here, not 128)."""
    from rrd_kernels.triton_kernels import plans

    old = plans._triton_version() < (3, 8)
    out = _in_subprocess(
        "import torch\n"
        "from tools.standin_driver import ARCHS, stand_in\n"
        "from tools.triton_gate import refusal\n"
        "for name in ('sm_90', 'sm_100', 'sm_120'):\n"
        "    with stand_in(ARCHS[name]):\n"
        "        print(name, [refusal(e, b, D) is not None for e, b, D in ((torch.float16, torch.float32, 512),\n"
        "              (torch.bfloat16, torch.float16, 512), (torch.bfloat16, torch.float16, 128),\n"
        "              (torch.bfloat16, torch.bfloat16, 512), (torch.float32, torch.float16, 512))])\n"
    )
    assert out.split("\n")[:3] == ["sm_90 [False, False, False, False, False]",
                                    f"sm_100 [{old}, {old}, False, False, False]",
                                    "sm_120 [False, False, False, False, False]"]


def test_why_unusable_refuses_a_gpu_without_a_checked_plan(monkeypatch):
    from rrd_kernels.triton_kernels import launch
    from rrd_kernels.triton_kernels.plans import DeviceLimits

    monkeypatch.setattr(launch, "current_limits", lambda: DeviceLimits(75, 65536, 40))
    monkeypatch.setattr(launch, "_on", lambda device: __import__("contextlib").nullcontext())
    reason = launch.why_unusable(torch.device("cuda", 0), torch.float32, torch.float32, 4, 100, 128)
    assert reason is not None and "7.5" in reason and "99 KiB" in reason
    monkeypatch.setattr(launch, "current_limits", lambda: DeviceLimits(86, 101376, 84))
    assert launch.why_unusable(torch.device("cuda", 0), torch.float32, torch.float32, 4, 100, 128) is None


def _launch_consults_unsupported() -> bool:
    if not have_triton():
        return False
    from rrd_kernels.triton_kernels import launch

    return hasattr(launch, "unsupported")


@pytest.mark.skipif(not _launch_consults_unsupported(),
                    reason="launch.why_unusable does not consult plans.unsupported yet")
def test_why_unusable_refuses_what_the_plans_refuse(monkeypatch):
    """A B200 with fp16 embeddings and an fp32 bank at D 512 is refused before any compile (so "auto" falls
    back)."""
    from rrd_kernels.triton_kernels import launch, plans
    from rrd_kernels.triton_kernels.plans import DeviceLimits

    monkeypatch.setattr(launch, "current_limits", lambda: DeviceLimits(100, 232448, 148))
    monkeypatch.setattr(launch, "_on", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(plans, "_triton_version", lambda: (3, 6, 0))
    cuda = torch.device("cuda", 0)
    reason = launch.why_unusable(cuda, torch.float16, torch.float32, 4, 100, 512)  # D 512: chunked kernels
    assert reason is not None and "sm_100" in reason
    assert launch.why_unusable(cuda, torch.float16, torch.float32, 4, 100, 128) is None  # resident: compiles
    assert launch.why_unusable(cuda, torch.float16, torch.float16, 4, 100, 512) is None
    assert launch.why_unusable(cuda, torch.float32, torch.float32, 4, 100, 512) is None


@pytest.mark.slow  # three compilations
def test_replacing_the_driver_recompiles_for_the_new_arch():
    """Triton caches compiled kernels per device index with the first driver's target; a launch after the
    active driver was replaced (another arch's stand-in) must compile for the new arch."""
    out = _in_subprocess(
        "import os, tempfile\n"
        "os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp()\n"
        "import torch\n"
        "from tools.standin_driver import ARCHS, stand_in\n"
        "from rrd_kernels.triton_kernels import launch\n"
        "from rrd_kernels.triton_kernels.forward import rrd_fwd_kernel\n"
        "from rrd_kernels.triton_kernels.resident import rrd_fwd_resident_kernel\n"
        "s, q = torch.randn(5, 128), torch.randn(300, 128)\n"
        "for name in ('sm_90', 'sm_80', 'sm_86'):\n"
        "    with stand_in(ARCHS[name]):\n"
        "        launch.forward(s, s, q, 0.1, 0.1, False, n_splits=2)\n"
        "        kernels = [k for f in (rrd_fwd_kernel, rrd_fwd_resident_kernel) for c in f.device_caches.values()\n"
        "                   for k in c[0].values()]\n"
        "        print(sorted(k.metadata.target.arch for k in kernels))\n"
    )
    assert out.split() == ["[90]", "[80]", "[86]"]

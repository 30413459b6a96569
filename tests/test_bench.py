"""The benchmark suite (bench/): the smoke preset end to end in a subprocess, and its parts in-process.

The smoke run puts a provider that cannot run here first (cuda: no such device on a CPU machine, or not
built), so the test sees that a failure is recorded and the providers after it still run.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # smoke must set it itself
    cmd = [sys.executable, "-m", "bench", "--preset", "smoke", "--out", str(out), "--no-progress"]
    if not torch.cuda.is_available():
        # first a provider that must fail here, then the ones that must work
        cmd += ["--providers", "cuda", "eager", "torch", "compile", "triton"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow  # the smoke run: a minute of interpreter on 2 cores
def test_smoke_writes_all_outputs(smoke):
    out, proc = smoke
    for name in ("results.csv", "results.json", "results.md"):
        assert (out / name).stat().st_size > 100, name
    for name in ("time_vs_K.png", "memory_vs_K.png", "speedup_vs_K.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "summary (fwd+bwd" in proc.stdout
    csv_lines = (out / "results.csv").read_text().splitlines()
    doc = json.loads((out / "results.json").read_text())
    assert len(csv_lines) == 1 + len(doc["rows"])  # header + one line per row
    assert doc["meta"]["torch"] == torch.__version__
    md = (out / "results.md").read_text()
    assert md.count("\n| 8 | 300 | 32 |") == len(doc["rows"])


@pytest.mark.slow  # the smoke run: a minute of interpreter on 2 cores
def test_smoke_baselines_ok_and_sane(smoke):
    out, _ = smoke
    rows = json.loads((out / "results.json").read_text())["rows"]
    for provider in ("eager", "torch"):
        mine = [r for r in rows if r["provider"] == provider]
        assert {r["mode"] for r in mine} == {"fwd", "bwd", "fwd+bwd"}, provider
        for r in mine:
            assert r["status"] == "ok", r
            assert (r["B"], r["K"], r["D"], r["dtype"]) == (8, 300, 32, "float32")
            assert finite(r["median_ms"]) and 0 < r["median_ms"] < 10_000, r
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["reps"] >= 3
            # fp32 against float64 on the same inputs: far under the fp32 tolerances
            assert r["loss_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4, r
            assert r["grad_rows_checked"] == 8
            assert finite(r["speedup_vs_eager"]) and r["speedup_vs_eager"] > 0
    eager_full = [r for r in rows if r["provider"] == "eager" and r["mode"] == "fwd+bwd"]
    assert eager_full[0]["speedup_vs_eager"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the forced failure is the cuda backend on a CPU machine")
def test_smoke_failed_provider_recorded_and_run_goes_on(smoke):
    out, _ = smoke
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["provider"] == "cuda"  # it ran first ...
    cuda = [r for r in rows if r["provider"] == "cuda"]
    assert len(cuda) == 6  # 3 modes, bank and momentum memory
    for r in cuda:
        assert r["status"] in ("unavailable", "error"), r
        assert r["reason"], r
        assert r["median_ms"] is None and r["speedup_vs_eager"] is None
    bank = [r["provider"] for r in rows if r["memory"] == "bank"]
    assert bank[:3] == ["cuda"] * 3 and bank[3:].count("eager") == 3  # ... and the others still ran after it


@pytest.mark.slow  # the smoke run: a minute of interpreter on 2 cores
def test_smoke_momentum_memory_rows(smoke):
    """The smoke preset's momentum-memory configuration (B 8, nce_k 300, D 32, n_data 500, the authors'
    exp / Z scores): the authors' eager variant, its compiled form and ours (gathered_rrd_rows) are checked
    against float64 and timed, speedups are over the momentum eager; the fused gathered kernels (triton and
    cuda: scores "similarity" only) are recorded as unavailable, with the reason."""
    out, _ = smoke
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["memory"] == "momentum"]
    assert {(r["B"], r["K"], r["D"], r["n_data"], r["scores"]) for r in rows} == {(8, 300, 32, 500, "faithful")}
    by = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r)
    expected = ["eager", "torch", "compile"]
    for provider in expected:
        assert {r["mode"] for r in by[provider]} == {"fwd", "bwd", "fwd+bwd"}, provider
        for r in by[provider]:
            assert r["status"] == "ok", r
            assert finite(r["median_ms"]) and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["loss_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4 and r["grad_rows_checked"] == 8, r
            assert finite(r["speedup_vs_eager"]) and r["floor_ms"] is None  # no floor model for it yet
    assert [r["speedup_vs_eager"] for r in by["eager"]] == pytest.approx([1.0] * 3)
    for provider in {"cuda", "triton"} - set(expected):
        assert {r["status"] for r in by[provider]} == {"unavailable"}, provider
        assert "gathered" in by[provider][0]["reason"], by[provider][0]["reason"]


@pytest.mark.slow  # the smoke run: a minute of interpreter on 2 cores
def test_summary_of_the_finished_run(smoke):
    """python -m bench.summary on the folder the run wrote: exit 0, one line per provider."""
    out, _ = smoke
    proc = subprocess.run([sys.executable, "-m", "bench.summary", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary (fwd+bwd" in proc.stdout and " eager " in proc.stdout


def test_readme_summary_example_names_the_folder_its_run_writes():
    """bench/README.md's `python -m bench.summary DIR` must read a folder that a documented run writes
    (--out DIR on an earlier line), not one that exists only on some machine."""
    import re

    lines = (REPO / "bench" / "README.md").read_text().splitlines()
    summary = [i for i, line in enumerate(lines) if line.startswith("python -m bench.summary ")]
    assert summary, "bench/README.md has no python -m bench.summary example"
    for i in summary:
        folder = lines[i].split()[3]
        assert any(re.search(rf"^python -m bench .*--out {re.escape(folder)}(\s|$)", line) for line in lines[:i]), (
            f"no documented run writes {folder}"
        )


# ------------------------------------------------------------------------------------------ in-process parts
def test_two_significant_digits():
    from bench.report import sig2

    assert [sig2(v) for v in (0.0019, 0.00123, 0.7, 1.0, 9.96, 12.34, 609.9, 0.0, math.nan, None)] == [
        "0.0019", "0.0012", "0.70", "1.0", "10.0", "12", "610", "0", "-", "-"]


def _row(K, provider, median, speedup, device="cpu (x86_64, 2 cores)", status="ok", memory=None):
    return {"B": 8, "K": K, "D": 32, "dtype": "float32", "tau_s": 0.1, "tau_t": 0.02, "provider": provider,
            "mode": "fwd+bwd", "timing": "python", "status": status, "reason": "", "median_ms": median,
            "speedup_vs_eager": speedup, "peak_extra_mib": memory if memory is not None else math.nan,
            "pct_of_floor": math.nan, "loss_rel_err": 1e-8, "grad_rel_err": 1e-7, "floor_ms": math.nan,
            "device": device}


def test_summary_keeps_small_ratios():
    from bench.report import summary_lines

    rows = [_row(300, "eager", 0.74, 1.0), _row(300, "triton", 390.0, 0.0019)]
    triton = next(line for line in summary_lines(rows) if " triton " in line)
    assert " 0.0019 " in triton, triton


def _texts_inside(fig, ax):
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for t in ax.texts:
        box = t.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()


def test_plot_without_data_says_why_inside_its_panel():
    """A CPU run has no memory numbers: the panel carries the reason, wrapped inside its frame, and no
    meaningless axes (it used to show 2^0..2^3 with a message cut off at both ends)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.report import _figure, _groups

    fig = _figure(_groups([_row(300, "eager", 0.74, 1.0)], "fwd+bwd"), "memory", "MiB", "peak_extra_mib",
                  ("python",))
    ax = fig.axes[0]
    assert not ax.lines and ax.get_xticks().size == 0
    assert len(ax.texts) == 1 and "CUDA devices only" in ax.texts[0].get_text()
    _texts_inside(fig, ax)
    assert "not performance" in fig._suptitle.get_text()
    box, page = fig._suptitle.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, "the title is cut off"
    plt.close(fig)


def test_plot_ticks_are_the_measured_bank_sizes():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.report import _figure, _groups

    for ks, labels in (([300], ["300"]), ([16384, 65536, 2**20], ["16K", "64K", "1M"])):
        rows = [_row(k, p, 1.0 + i, 1.0, device="NVIDIA H200") for i, k in enumerate(ks) for p in ("eager", "triton")]
        fig = _figure(_groups(rows, "fwd+bwd"), "time", "ms", "median_ms", ("python",))
        ax = fig.axes[0]
        fig.canvas.draw()
        assert list(ax.get_xticks()) == ks
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        lo, hi = ax.get_xlim()
        assert lo < min(ks) and max(ks) < hi and hi / lo < 64 * max(ks) / min(ks)
        assert len(ax.lines) == 2 and "not performance" not in fig._suptitle.get_text()
        plt.close(fig)


def test_quantiles():
    from bench.timing import summarize

    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.0, 1.8, 4.2, 5)


def test_floor_matches_design_note():
    from bench.ceilings import floor_ms

    # docs/math.md, "The floor": H200, B 4096, K 262144, D 128, bf16, 4 products at 693 TFLOP/s: about 1.6 ms
    ceil = {"copy_GBps": 4270.0, "matmul_TFLOPs": {"bfloat16": 693.0, "float32": 51.0}}
    f4 = floor_ms(ceil, 4096, 262144, 128, "bfloat16", "fwd+bwd", recompute=False)
    assert f4 == pytest.approx(4 * 2 * 4096 * 262144 * 128 / 693e12 * 1e3)
    assert 1.55 < f4 < 1.65
    assert floor_ms(ceil, 4096, 262144, 128, "bfloat16", "fwd+bwd", recompute=True) == pytest.approx(f4 * 5 / 4)
    assert math.isnan(floor_ms(ceil, 64, 16384, 128, "float32", "bwd", recompute=False))
    # small batch: the bank read dominates (8 MiB of fp32 at 4.27 TB/s, plus the B x D inputs)
    small = floor_ms(ceil, 1, 16384, 128, "float32", "fwd", recompute=False)
    assert small == pytest.approx((16384 * 128 + 2 * 128) * 4 / 4270e9 * 1e3)
    assert math.isnan(floor_ms({}, 64, 16384, 128, "float32", "fwd", recompute=False))


def test_reference_row_subset_and_chunks_agree_with_direct(monkeypatch):
    from bench import check
    from bench.config import Config
    from rrd_kernels import rrd_reference

    cfg = Config(B=40, K=200, D=16, dtype="float32", tau_s=0.1, tau_t=0.02)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(40, 16, generator=g)
    t = torch.randn(40, 16, generator=g)
    q = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    s64 = s.double().requires_grad_(True)
    direct = rrd_reference(s64, t.double(), q.double(), 0.1, 0.02)
    (g_direct,) = torch.autograd.grad(direct, s64)
    # force chunks of 3 rows and a 12-row gradient subset
    monkeypatch.setitem(check.CHUNK_BUDGET_BYTES, "cpu", 3 * 8 * 8 * 200)
    monkeypatch.setattr(check, "GRAD_ALL_ROWS_MAX_BK", 0)
    monkeypatch.setattr(check, "GRAD_SUBSET_ROWS", 12)
    ref = check.Reference(cfg, s, t, q)
    assert ref.rows.numel() == 12 and ref.rows[0] == 0 and ref.rows[-1] == 39
    assert ref.loss == pytest.approx(direct.item(), rel=1e-12)
    torch.testing.assert_close(ref.grad, g_direct[ref.rows], rtol=1e-10, atol=1e-14)
    # compare(): exact inputs give ~0; a 1% error in one checked gradient row is seen
    loss_err, grad_err = check.compare(ref, direct, g_direct)
    assert loss_err < 1e-12 and grad_err < 1e-12
    bad = g_direct.clone()
    bad[ref.rows[5]] *= 1.01
    assert check.compare(ref, direct, bad)[1] > 1e-4
    assert check.compare(ref, direct * float("nan"), g_direct) == (math.inf, math.inf)


def _options(**kw):
    from bench.config import Config
    from bench.runner import RunOptions
    from bench.timing import Effort

    cfg = Config(B=4, K=64, D=8, dtype="float32", tau_s=0.1, tau_t=0.02)
    base = dict(preset="test", configs=[cfg], providers=["eager"], modes=["fwd", "fwd+bwd"],
                timings=["python", "graph"], effort=Effort(warmup=1, target_ms=1.0, min_reps=3, max_reps=3),
                device=torch.device("cpu"), progress=False)
    base.update(kw)
    return RunOptions(**base)


@pytest.mark.slow  # bench plumbing, not a kernel path: the full suite runs it
def test_wrong_provider_is_recorded_not_timed(monkeypatch):
    from bench import providers
    from bench.runner import Runner

    def build_wrong(cfg):  # 1% too large a loss and gradient: must fail the fp32 check
        eager = providers.BUILDERS["eager"](cfg)
        return lambda s, t, b: 1.01 * eager(s, t, b)

    def build_broken(cfg):
        def fn(s, t, b):
            raise ValueError("kernel exploded")
        return fn

    monkeypatch.setitem(providers.BUILDERS, "triton", build_wrong)
    monkeypatch.setitem(providers.BUILDERS, "cuda", build_broken)
    rows = Runner(_options(providers=["triton", "cuda", "eager"])).run()
    assert len(rows) == 6  # 3 providers x 2 modes x python only (no graph mode on the CPU)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        wrong = by[("triton", mode)]
        assert wrong["status"] == "wrong" and "not timed" in wrong["reason"]
        assert 5e-3 < wrong["loss_rel_err"] < 2e-2 and math.isnan(wrong["median_ms"])
        broken = by[("cuda", mode)]
        assert broken["status"] == "error" and "kernel exploded" in broken["reason"]
        assert by[("eager", mode)]["status"] == "ok" and by[("eager", mode)]["median_ms"] > 0


@pytest.mark.parametrize("scores", ["similarity", "faithful"])
def test_momentum_rows_in_process(monkeypatch, scores):
    """Momentum-memory configurations through the runner: the authors' eager variant and ours pass the
    float64 check (gathered_reference) in both score modes, speedups are over the momentum eager, a 1% wrong
    provider is caught by the same check, and no bank floor is attached."""
    from bench import providers
    from bench.config import Config
    from bench.runner import Runner

    def build_wrong(cfg):
        eager = providers.MOMENTUM_BUILDERS["eager"](cfg)
        return lambda s, t, m: 1.01 * eager(s, t, m)

    monkeypatch.setitem(providers.MOMENTUM_BUILDERS, "triton", build_wrong)
    cfg = Config(B=5, K=40, D=8, dtype="float32", tau_s=0.1, tau_t=0.02, memory="momentum", n_data=30,
                 scores=scores)
    rows = Runner(_options(configs=[cfg], providers=["eager", "torch", "triton"])).run()
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == 6
    for mode in ("fwd", "fwd+bwd"):
        for provider in ("eager", "torch"):
            r = by[(provider, mode)]
            assert r["status"] == "ok" and r["median_ms"] > 0, r
            assert r["loss_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4, r
            assert (r["memory"], r["n_data"], r["scores"]) == ("momentum", 30, scores)
            assert math.isnan(r["floor_ms"]) and math.isfinite(r["speedup_vs_eager"])
        assert by[("triton", mode)]["status"] == "wrong" and 5e-3 < by[("triton", mode)]["loss_rel_err"] < 2e-2
        assert by[("eager", mode)]["speedup_vs_eager"] == pytest.approx(1.0)


def test_momentum_grid_crosses_n_data_and_scores_only_for_the_memory():
    from bench.config import PRESETS, grid

    cfgs = grid([8], [16, 32], [4], ["float32"], [(0.1, 0.02)], ["bank", "momentum"], [100, 200],
                ["similarity", "faithful"])
    assert len([c for c in cfgs if c.memory == "bank"]) == 2  # n_data and scores do not multiply the bank
    assert len([c for c in cfgs if c.memory == "momentum"]) == 2 * 2 * 2
    assert all(c.n_data == 0 and c.scores == "similarity" for c in cfgs if c.memory == "bank")
    pre = PRESETS["momentum"]
    authors = grid(pre["B"], pre["K"], pre["D"], pre["dtypes"], pre["taus"], pre["memory"], pre["n_data"],
                   pre["scores"])
    assert any((c.B, c.K, c.D, c.n_data, c.dtype) == (64, 16384, 128, 50000, "float32") for c in authors)


def test_time_budget_skips_remaining_configs():
    from bench.config import Config
    from bench.runner import Runner

    cfgs = [Config(B=4, K=k, D=8, dtype="float32", tau_s=0.1, tau_t=0.02) for k in (32, 64)]
    rows = Runner(_options(configs=cfgs, max_seconds=0.0)).run()
    assert len(rows) == 4 and all(r["status"] == "skipped" for r in rows)
    assert "time budget" in rows[0]["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_small_run_times_both_kinds_with_memory_and_floor(tmp_path):
    """The GPU paths of the suite (CUDA events, graph capture with rotated inputs, peak memory, ceilings)."""
    cmd = [sys.executable, "-m", "bench", "--preset", "smoke", "--B", "64", "--K", "4096", "--D", "64",
           "--providers", "eager", "triton", "--out", str(tmp_path), "--no-progress", "--max-reps", "20"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    c = doc["meta"]["ceilings"]
    assert c["copy_GBps"] > 100 and c["matmul_TFLOPs"]["float32"] > 1
    eager = [r for r in doc["rows"] if r["provider"] == "eager"]
    assert len(eager) == 6  # 3 modes x (python, graph)
    for r in eager:
        assert r["status"] == "ok", r
        assert r["input_sets"] >= 2  # a 1 MiB bank: rotated to get out of L2
        assert finite(r["median_ms"]) and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        if r["timing"] == "python":
            assert r["peak_extra_mib"] > 0.5  # at least the 64 x 4096 fp32 logits (1 MiB) are materialised
        if r["mode"] != "bwd":
            assert finite(r["floor_ms"]) and 0 < r["pct_of_floor"] < 150, r
    by = {(r["mode"], r["timing"]): r["median_ms"] for r in eager}
    assert by[("fwd+bwd", "graph")] < by[("fwd+bwd", "python")] * 1.5  # graph replay has no launch gaps


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of bench/timing.py, so that its GPU code paths (their order of
    setup, synchronisation, events, capture, replay) run on a CPU machine. Events read the host clock."""

    def __init__(self):
        import contextlib
        import time

        self.log = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = time.perf_counter()

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        class Stream:
            def wait_stream(self, other):
                pass

            def synchronize(self):
                pass

        class CUDAGraph:
            def replay(self):
                fake.log.append("replay")

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None, capture_error_mode="global"):
            fake.log.append("capture_begin")
            yield
            fake.log.append("capture_end")

        self.attrs = dict(
            Event=Event, Stream=Stream, CUDAGraph=CUDAGraph, graph=graph,
            stream=lambda s: contextlib.nullcontext(), current_stream=lambda: Stream(),
            synchronize=lambda: fake.log.append("sync"), reset_peak_memory_stats=lambda: None,
            memory_allocated=lambda: 1 << 20, max_memory_allocated=lambda: 3 << 20,
        )


@pytest.mark.slow  # bench plumbing, not a kernel path: the full suite runs it
def test_gpu_timer_paths_with_fake_cuda(monkeypatch):
    from bench import providers, runner, timing
    from bench.config import Config
    from bench.inputs import make_inputs

    fake = _FakeCuda()
    for name, value in fake.attrs.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cfg = Config(B=4, K=64, D=8, dtype="float32", tau_s=0.1, tau_t=0.02)
    sets = [make_inputs(cfg, torch.device("cpu"), seed=i) for i in range(3)]
    fn = providers.build("eager", cfg)
    effort = timing.Effort(warmup=2, target_ms=1e9, min_reps=4, max_reps=6)
    for mode in ("fwd", "bwd", "fwd+bwd"):
        setup, run = runner.make_case(fn, sets, mode)
        calls = []

        def counted_setup(i, setup=setup):
            calls.append(i)
            return setup(i)

        t = timing.time_cuda_python(counted_setup, run, effort)
        assert t.reps == 6 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
        assert calls == [0, 1, 2, 3, 4, 5, 6, 7]  # 2 warm-up + 6 timed, each prepared outside the timing
        assert timing.peak_extra_mib(setup, run) == 2.0

        fake.log.clear()
        case = timing.GraphCase(setup, run, len(sets))
        assert len(case.states) == 3
        assert fake.log.count("capture_begin") == 1 and fake.log[-2:] == ["capture_end", "sync"]
        t = case.time(effort)
        assert t.reps == 6 and fake.log.count("replay") == 2 + 6
        case.close()
        # gradients are taken with autograd.grad: nothing accumulates in .grad across repetitions
        assert all(s.student.grad is None for s in sets)


@pytest.mark.slow  # bench plumbing, not a kernel path: the full suite runs it
def test_runner_gpu_rows_with_fake_cuda(monkeypatch):
    """The runner's GPU branch end to end on CPU tensors: both timing kinds, memory, floor columns, rotation."""
    from bench import ceilings, inputs
    from bench.runner import Runner

    fake = _FakeCuda()
    for name, value in fake.attrs.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))

    class Props:
        L2_cache_size = 64 << 10  # 64 KiB: a 4 x 1024 x 8 fp32 set is 32.25 KiB, so 6 sets are needed

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    ceil = {"copy_GBps": 1000.0, "matmul_TFLOPs": {"float32": 10.0}, "fp32_matmul_precision": "highest"}
    monkeypatch.setattr(ceilings, "measure", lambda device, dtypes: ceil)
    real_make = inputs.make_inputs
    monkeypatch.setattr(inputs, "make_inputs", lambda cfg, device, seed: real_make(cfg, torch.device("cpu"), seed))

    from bench.config import Config

    cfg = Config(B=4, K=1024, D=8, dtype="float32", tau_s=0.1, tau_t=0.02)
    rows = Runner(_options(configs=[cfg], providers=["eager", "torch"], modes=["fwd", "bwd", "fwd+bwd"],
                           device=torch.device("cuda"))).run()
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["device"] == "Fake GPU" and r["copy_GBps"] == 1000.0 and r["matmul_TFLOPs"] == 10.0
        assert r["input_sets"] == 6
        assert r["median_ms"] > 0 and math.isfinite(r["speedup_vs_eager"])
        assert (r["peak_extra_mib"] == 2.0) if r["timing"] == "python" else math.isnan(r["peak_extra_mib"])
        f4 = ceilings.floor_ms(ceil, 4, 1024, 8, "float32", r["mode"], recompute=False)
        f5 = ceilings.floor_ms(ceil, 4, 1024, 8, "float32", r["mode"], recompute=True)
        assert r["floor_recompute_ms"] == f5 and r["pct_of_floor_recompute"] == pytest.approx(100 * f5 / r["median_ms"])
        if r["mode"] == "bwd":
            assert math.isnan(r["floor_ms"]) and math.isnan(r["pct_of_floor"])
        else:
            assert r["floor_ms"] == f4 and r["pct_of_floor"] == pytest.approx(100 * f4 / r["median_ms"])
    assert {(r["mode"], r["timing"]) for r in rows} == {(m, k) for m in ("fwd", "bwd", "fwd+bwd")
                                                        for k in ("python", "graph")}

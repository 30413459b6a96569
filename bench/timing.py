"""Timers. A measured case is two callables: ``setup(i)`` prepares repetition i outside the timed region
(picks input set i mod n, and for the backward mode runs the forward), ``run(state)`` is what is timed.

python  (GPU) per repetition: setup, synchronise, CUDA event, run, CUDA event. The queue is empty when the
        call starts, so host work (Python, autograd, launches) is inside the number whenever the GPU would
        wait for it: the cost of one call as made from Python.
graph   (GPU) one torch.cuda.CUDAGraph making the call once per input set (static inputs); replays back to
        back between CUDA events, each divided by the number of sets: device time without launch gaps.
cpu     time.perf_counter around each run (no device; no graph mode).
Repetitions: ``warmup`` calls first, then as many as fit in ``target_ms`` by the warm-up's estimate, clamped
to [min_reps, max_reps]. Reported: median and the 20th and 80th percentiles, in milliseconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Effort:
    warmup: int = 3
    target_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 100


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def summarize(times_ms: list[float]) -> Timing:
    xs = sorted(times_ms)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return Timing(statistics.median(xs), q(0.2), q(0.8), len(xs))


def _n_reps(est_ms: float, effort: Effort) -> int:
    n = int(effort.target_ms / max(est_ms, 1e-6))
    return max(effort.min_reps, min(effort.max_reps, n))


def time_cpu(setup, run, effort: Effort) -> Timing:
    def once(i: int) -> float:
        state = setup(i)
        t0 = time.perf_counter()
        out = run(state)
        t1 = time.perf_counter()
        del out, state  # freed outside the timed region
        return (t1 - t0) * 1e3

    warm = [once(i) for i in range(max(1, effort.warmup))]
    reps = _n_reps(statistics.median(warm), effort)
    return summarize([once(i) for i in range(reps)])


def time_cuda_python(setup, run, effort: Effort) -> Timing:
    def batch(n: int, offset: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            state = setup(offset + i)
            torch.cuda.synchronize()
            start.record()
            out = run(state)
            end.record()
            del out, state  # freed outside the timed region
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    warm = batch(max(1, effort.warmup), 0)
    reps = _n_reps(statistics.median(warm), effort)
    return summarize(batch(reps, len(warm)))


class GraphCase:
    """One CUDA graph that makes the measured call once on each input set in turn (static inputs); a replay
    is timed between CUDA events and the time per call is the replay's time over the number of sets.

    setup(i) runs outside the capture (for the backward mode: the forward whose saved tensors the captured
    backward reads); run(state) is captured. Warm-up, setup and capture all run on one side stream: autograd
    runs a backward op on the stream of its forward op, so a forward run on another stream would put the
    captured backward's kernels outside the capture. One graph (not one per set) keeps the capture cost, and
    its gc.collect, to one per mode."""

    def __init__(self, setup, run, n_sets: int):
        self.n = n_sets
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream (cuBLAS handles, autograd, compile)
            for _ in range(2):
                for i in range(n_sets):
                    out = run(setup(i))
                    del out
            self.states = [setup(i) for i in range(n_sets)]  # what the graph reads: must stay alive
        stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            for state in self.states:
                out = run(state)
                del out  # the outputs are not read; their memory goes back to the graph's pool
        torch.cuda.synchronize()

    def time(self, effort: Effort) -> Timing:
        def batch(reps: int) -> list[float]:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                start.record()
                self.graph.replay()
                end.record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / self.n for s, e in events]

        warm = batch(max(1, effort.warmup))
        reps = _n_reps(statistics.median(warm) * self.n, effort)
        return summarize(batch(reps))

    def close(self):
        self.graph = None
        self.states = []


def peak_extra_mib(setup, run) -> float:
    """Peak device memory of one run above what was allocated when it started (inputs, and for the backward
    mode the forward's saved tensors), in MiB."""
    state = setup(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, state
    return peak / 2**20

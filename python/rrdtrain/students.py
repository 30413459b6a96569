"""The student half of the job: every method for each seed, in this process or spread over worker
processes (``--workers``).

A seed is the unit of work: its methods share one TeacherMemo (the teacher's outputs on the seed's batches,
computed once), and every stage seeds itself, so a seed trained in a worker process gives bit-identical
results to the same seed trained here with the same thread count (tests/test_train_app.py compares them).
Workers are spawned, not forked: forking a process that has already run torch's thread pools can hang.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from . import dist as D
from .engine import Stage, StageRunner, TrainConfig
from .teacher_memo import TeacherMemo


def train_seed(runner: StageRunner, teacher, seed: int, methods: dict, student: str, epochs: int, out_dir: str,
               log=print) -> dict:
    """Train ``student`` with every method of ``methods`` ({name: (gamma, alpha, beta)}) for one seed.
    Returns {name: {"history": per-epoch metrics, "bank_in_sync": bool or None (None unless under DDP)}}."""
    memo = TeacherMemo() if runner.device.type == "cpu" else None
    out = {}
    for name, (gamma, alpha, beta) in methods.items():
        stage = Stage(f"seed{seed}/{name}", student, epochs, seed, os.path.join(out_dir, f"seed{seed}", name),
                      gamma=gamma, alpha=alpha, beta=beta)
        res = runner.run(stage, teacher=teacher, teacher_memo=memo)
        in_sync = None
        crit = res["criterion"]
        if crit is not None and runner.ctx.distributed:
            # a sharded bank is in sync when its pointer is; momentum memories: both memories and z
            if hasattr(crit, "memory_s"):
                state = torch.cat([crit.memory_s.flatten(), crit.memory_t.flatten(), crit.z])
            else:
                state = crit.bank_ptr if crit.bank_is_sharded else crit.bank
            banks = D.gather_objects(state.detach().cpu(), runner.ctx)
            in_sync = all(torch.equal(b, banks[0]) for b in banks)
            log(f"[{stage.name}] RRD banks identical on all {runner.ctx.world} ranks: {in_sync}")
        out[name] = {"history": res["history"], "bank_in_sync": in_sync}
    return out


@dataclasses.dataclass
class WorkerSpec:
    """What a worker process needs to rebuild the job's state (all picklable)."""
    load_data: object  # a picklable callable returning the DatasetSpec (e.g. functools.partial(load_dataset, ...))
    build_model: object  # picklable callable arch -> nn.Module
    threads: int | None
    cfg: TrainConfig
    teacher_arch: str
    teacher_state: dict  # CPU tensors
    methods: dict
    student: str
    epochs: int
    out_dir: str


_worker: dict = {}


def _log(*args, **kwargs):
    print(*args, **kwargs, flush=True)


def _init_worker(spec: WorkerSpec) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (terminating the pool); a worker that
    # raised KeyboardInterrupt itself would only fail its current seed and go on to the next.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    ctx = D.DistContext()  # one CPU process, no process group
    runner = StageRunner(ctx, dataclasses.replace(spec.cfg, progress=False), spec.load_data(), spec.build_model,
                         log=_log)
    teacher = spec.build_model(spec.teacher_arch)
    teacher.load_state_dict(spec.teacher_state)
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    _worker.update(spec=spec, runner=runner, teacher=teacher)


def _train_seed_in_worker(seed: int) -> tuple[int, dict]:
    spec = _worker["spec"]
    return seed, train_seed(_worker["runner"], _worker["teacher"], seed, spec.methods, spec.student, spec.epochs,
                            spec.out_dir, log=_log)


def train_seeds_in_workers(spec: WorkerSpec, seeds: list[int], workers: int, on_done=None) -> dict:
    """``train_seed`` for every seed on ``workers`` spawned CPU processes. Returns {seed: result}. The first
    failure (a ResumeError, a worker that died: BrokenProcessPool), or Ctrl-C, stops every worker at once
    and is raised here; the stages finished so far are on disk (``--resume`` continues from them)."""
    results = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(spec,))
    pending = {pool.submit(_train_seed_in_worker, seed) for seed in seeds}
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                seed, result = fut.result()  # raises the worker's exception
                results[seed] = result
                if on_done is not None:
                    on_done(seed)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()
    return results


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the workers now (they ignore SIGINT, and a seed takes a while)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())  # before 3.14: the executor's own list
    pool.shutdown(wait=False, cancel_futures=True)  # (this drops that list)
    for proc in procs:
        proc.terminate()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

"""RRDLoss under torch.distributed (two gloo processes on 127.0.0.1, CPU) and train.py under torchrun.

The library test checks the semantics the module promises: with gather_distributed=True every rank ends
with the bank a single process gets by enqueueing the concatenated batches (rank order), and each rank's
loss is the single-process loss of its local batch against the same bank; with gather_distributed=False
each rank's bank only holds its own keys.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rrd_kernels import RRDLoss, rrd_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
STEPS = 5
B, S_DIM, T_DIM, FEAT, K = 6, 12, 20, 8, 40  # 2 ranks x 6 rows per step; K not a multiple: the ring wraps mid-batch
TAUS = {"after": (0.04, 0.1), "before": (0.1, 0.02)}

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.slow,  # several processes each: 40-110 s a test on 2 cores
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_module(enqueue: str, gather: bool) -> RRDLoss:
    torch.manual_seed(1234)  # same projection heads and initial bank on every rank and in the reference
    tau_s, tau_t = TAUS[enqueue]
    return RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K, tau_s=tau_s, tau_t=tau_t, enqueue=enqueue,
                   backend="torch", gather_distributed=gather)


def local_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, S_DIM, generator=g), torch.randn(B, T_DIM, generator=g)


def _worker(rank: int, port: int, out_dir: str, enqueue: str, gather: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        crit = make_module(enqueue, gather)
        losses, grads = [], []
        for step in range(STEPS):
            f_s, f_t = local_batch(step, rank)
            f_s.requires_grad_(True)
            loss = crit(f_s, f_t)
            loss.backward()
            losses.append(loss.detach().clone())
            grads.append(f_s.grad.clone())
        torch.save({"bank": crit.bank.clone(), "ptr": crit.bank_ptr.clone(), "losses": losses, "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, enqueue: str, gather: bool) -> list[dict]:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), enqueue, gather), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def reference_gathered(enqueue: str):
    """One process: per-rank losses on local batches against the shared bank; enqueue the concatenation."""
    torch.set_num_threads(1)
    crit = make_module(enqueue, gather=True)  # not initialised: a plain single process
    tau_s, tau_t = TAUS[enqueue]
    losses, grads = [[] for _ in range(WORLD)], [[] for _ in range(WORLD)]
    for step in range(STEPS):
        batches = [local_batch(step, r) for r in range(WORLD)]

        def local_losses():
            for r, (f_s, f_t) in enumerate(batches):
                f_s = f_s.clone().requires_grad_(True)
                loss = rrd_loss(crit.embed_s(f_s), crit.embed_t(f_t), crit.bank.clone(), tau_s=tau_s, tau_t=tau_t,
                                backend="torch")
                loss.backward()
                losses[r].append(loss.detach())
                grads[r].append(f_s.grad)

        if enqueue == "after":
            local_losses()  # similarities against the bank before this step's keys
        with torch.no_grad():
            crit(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))  # enqueue, rank order
        if enqueue == "before":
            local_losses()  # this step's keys (all ranks') are already in the bank
    return crit, losses, grads


@pytest.mark.parametrize("enqueue", ["after", "before"])
def test_gathered_banks_match_single_process(tmp_path, enqueue):
    ranks = run_ranks(tmp_path, enqueue, gather=True)
    ref, ref_losses, ref_grads = reference_gathered(enqueue)
    # identical banks and pointers on both ranks
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])
    assert torch.equal(ranks[0]["ptr"], ranks[1]["ptr"])
    assert int(ranks[0]["ptr"]) == (STEPS * WORLD * B) % K == int(ref.bank_ptr)
    # ... equal to one process that enqueued the concatenated batches. The keys come from one Linear over
    # 2B rows instead of two over B rows, so allow float32 rounding (the ordering would be off by >> 1e-6).
    torch.testing.assert_close(ranks[0]["bank"], ref.bank, rtol=0, atol=1e-6)
    assert not torch.equal(make_module(enqueue, True).bank, ref.bank)  # the bank did change
    for r in range(WORLD):
        for step in range(STEPS):
            torch.testing.assert_close(ranks[r]["losses"][step], ref_losses[r][step], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ranks[r]["grads"][step], ref_grads[r][step], rtol=1e-5, atol=1e-7)
    # the two ranks' losses differ (they see different local batches)
    assert not torch.allclose(ranks[0]["losses"][-1], ranks[1]["losses"][-1])


def test_without_gather_banks_stay_local(tmp_path):
    ranks = run_ranks(tmp_path, "after", gather=False)
    tau_s, tau_t = TAUS["after"]
    for r in range(WORLD):
        ref = make_module("after", gather=False)
        for step in range(STEPS):
            f_s, f_t = local_batch(step, r)
            with torch.no_grad():
                expected = rrd_loss(ref.embed_s(f_s), ref.embed_t(f_t), ref.bank, tau_s=tau_s, tau_t=tau_t,
                                    backend="torch")
                ref(f_s, f_t)  # enqueue this rank's keys only
            torch.testing.assert_close(ranks[r]["losses"][step], expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(ranks[r]["bank"], ref.bank)  # same shapes as the rank did: bit-equal
        assert int(ranks[r]["ptr"]) == (STEPS * B) % K
    assert not torch.equal(ranks[0]["bank"], ranks[1]["bank"])


def _torchrun(*extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, "python", "train.py"), "--no-progress",
           "--threads", "1", *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """train.py on two gloo processes: a 1-epoch teacher and a 1-epoch RRD+KD student."""
    out = tmp_path_factory.mktemp("ddp")
    _torchrun("--teacher-epochs", 1, "--epochs", 1, "--methods", "kd_rrd", "--seeds", 1, "--out-dir", out)
    return out


def test_train_app_under_torchrun(ddp_run, tmp_path):
    """train.py with two gloo processes: the RRD banks stay in sync with gathering and diverge without."""
    res = json.loads((ddp_run / "results.json").read_text())
    assert res["config"]["world_size"] == WORLD
    assert res["methods"]["kd_rrd"]["ddp_bank_in_sync"] == [True]
    ckpt = torch.load(ddp_run / "seed0" / "kd_rrd" / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng_per_rank"]) == WORLD and len(ckpt["criterion_per_rank"]) == WORLD
    # DistributedSampler pads 1437 to 1438 samples (719 per rank); every rank's keys are enqueued
    assert int(ckpt["criterion_per_rank"][0]["bank_ptr"]) == 1438 % 1024
    local = tmp_path / "local"
    _torchrun("--teacher-ckpt", ddp_run / "teacher" / "final.pt", "--epochs", 1, "--methods", "kd_rrd", "--seeds", 1,
              "--no-gather-distributed", "--out-dir", local)
    res = json.loads((local / "results.json").read_text())
    assert res["methods"]["kd_rrd"]["ddp_bank_in_sync"] == [False]
    ckpt = torch.load(local / "seed0" / "kd_rrd" / "checkpoint.pt", weights_only=False)
    assert int(ckpt["criterion_per_rank"][1]["bank_ptr"]) == 719 % 1024  # only this rank's 719 keys


def test_ddp_resume_is_bit_exact(ddp_run, tmp_path):
    """Stop after epoch 1 of 3 and resume, two ranks with per-rank banks (gathering off): the same weights,
    banks, pointers and metrics as an uninterrupted two-rank run."""
    common = ["--teacher-ckpt", ddp_run / "teacher" / "final.pt", "--epochs", 3, "--methods", "rrd", "--seeds", 1,
              "--no-gather-distributed"]
    _torchrun(*common, "--out-dir", tmp_path / "full")
    assert "stopped after epoch 1" in _torchrun(*common, "--out-dir", tmp_path / "part", "--stop-after", 1).stdout
    assert "after epoch 1" in _torchrun(*common, "--out-dir", tmp_path / "part", "--resume").stdout
    a = torch.load(tmp_path / "full" / "seed0" / "rrd" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "seed0" / "rrd" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for ra, rb in zip(a["criterion_per_rank"], b["criterion_per_rank"]):
        for k in ra:
            assert torch.equal(ra[k], rb[k]), k
    assert not torch.equal(b["criterion_per_rank"][0]["bank"], b["criterion_per_rank"][1]["bank"])


def test_train_app_momentum_memory_under_torchrun(ddp_run, tmp_path):
    """--memory momentum on two gloo processes: the memories stay identical on both ranks, each rank keeps
    its own sampler state (different negatives), and every training sample's row was written."""
    _torchrun("--teacher-ckpt", ddp_run / "teacher" / "final.pt", "--epochs", 1, "--methods", "rrd", "--seeds", 1,
              "--memory", "momentum", "--nce-k", 64, "--out-dir", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"]["rrd"]["ddp_bank_in_sync"] == [True]
    ckpt = torch.load(tmp_path / "seed0" / "rrd" / "checkpoint.pt", weights_only=False)
    r0, r1 = ckpt["criterion_per_rank"]
    assert torch.equal(r0["memory_s"], r1["memory_s"]) and torch.equal(r0["memory_t"], r1["memory_t"])
    assert not torch.equal(r0["_extra_state"]["sampler_state"], r1["_extra_state"]["sampler_state"])
    norms = r0["memory_s"].norm(dim=1)  # written rows are renormalised; the uniform init's are not unit
    assert r0["memory_s"].shape[0] == 1437 and torch.allclose(norms, torch.ones_like(norms), atol=1e-5)

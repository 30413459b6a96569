"""RRDLoss(shard_bank=True): a bank sharded across ranks computes what one process computes with the full bank.

Pieces (one process): each backend's partial forward states over shards, merged, and the partial backward
sums with the global reference row, against the float64 reference; triton also with two splits per shard.

Module (gloo, CPU, 2 and 3 ranks spawned, K = 37 divisible by neither, so shards differ by one row and the
batches wrap across shard boundaries): 5 steps, both enqueue orders, torch and triton (interpreter) backends.
Each rank's loss and input gradient equal the single-process loss of its local batch against the full bank
(rrd_loss, fp32) within 1e-5 relative; the gathered bank equals the single-process FIFO bit for bit; every
rank holds the same global pointer. A 2-rank checkpoint restored on 3 ranks and on one process continues
with the same losses. Bad input fails on every rank with an error naming the cause and leaves the bank as
it was.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import have_triton, make_inputs, rel_err
from rrd_kernels import RRDLoss, merge_bank_shards, rrd_loss, rrd_reference
from rrd_kernels.bank import enqueue_
from rrd_kernels.shard_bank import ShardLayout, enqueue_sharded_, random_unit_rows_range

B, S_DIM, T_DIM, FEAT, K = 6, 12, 20, 8, 37
STEPS, MORE = 5, 3  # steps checked against one process; steps continued after the checkpoint
TAUS = {"after": (0.04, 0.1), "before": (0.1, 0.02)}
BACKENDS = ["torch"] + (["triton"] if have_triton() else [])
CONFIGS = [(e, b) for e in ("after", "before") for b in BACKENDS]
GLOBAL_ROWS = 12  # rows per step of the checkpoint continuation: 2 x 6 = 3 x 4 = 1 x 12

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- pieces
def sharded_pieces(pieces, s, t, q, tau_s, tau_t, kl, w, world, n_splits=None):
    """What the ranks of a sharded module compute, in one process: the collectives are stack and sum."""
    layouts = [ShardLayout(q.shape[0], world, r) for r in range(world)]
    states = [pieces.forward_partial(s, t, q[l.lo : l.hi], tau_s, tau_t, l.lo, n_splits) for l in layouts]
    rows, lse_s, lse_t, ref = pieces.merge_states(
        torch.stack([p for p, _ in states]), torch.stack([i for _, i in states]), kl
    )
    parts = [pieces.backward_partial(s, t, q[l.lo : l.hi], lse_s, lse_t, tau_s, tau_t, n_splits) for l in layouts]
    acc = sum(a for a, _ in parts)
    sigma = sum(g for _, g in parts)
    grad = pieces.backward_finish(acc, sigma, q[ref.long()], s, w, tau_s)
    return rows, grad, ref


def reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w):
    s64 = s.detach().double().requires_grad_(True)
    rows = rrd_reference(s64, t.double(), q.double(), tau_s, tau_t, "kl" if kl else "ce", "none")
    (rows * w.double()).sum().backward()
    return rows.detach(), s64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("taus", [(0.04, 0.1), (0.1, 0.02), (0.005, 0.005)])
def test_pieces_match_float64_reference(gen, backend, taus):
    import importlib

    from rrd_kernels.backends import SHARDED_MODULES

    pieces = importlib.import_module(SHARDED_MODULES[backend])
    tau_s, tau_t = taus
    # 3 shards of 100 or 101 rows: two 64-row tiles each, so triton can split every shard in two
    s, t, q = make_inputs(7, 302, 16, gen)
    w = torch.rand(7, generator=gen)
    loss_tol, grad_tol = (1e-5, 1e-4) if min(taus) >= 0.02 else (4e-5, 4e-4)  # as test_triton_kernels
    for kl in (False, True):
        ref_rows, ref_grad = reference_rows_and_grad(s, t, q, tau_s, tau_t, kl, w)
        for n_splits in ((None, 2) if backend == "triton" else (None,)):
            rows, grad, ref = sharded_pieces(pieces, s, t, q, tau_s, tau_t, kl, w, 3, n_splits)
            assert rel_err(rows, ref_rows) <= loss_tol, (kl, n_splits)
            assert rel_err(grad, ref_grad) <= grad_tol, (kl, n_splits)
            logits = F.normalize(s.double(), dim=1) @ q.double().T
            argmax, ref = logits.argmax(dim=1), ref.long()  # the global argmax, across shards
            if backend == "torch":
                assert torch.equal(ref, argmax)
            else:
                # Triton saves -1 ("no rounding guard") where the student's top probability is below 1/2.
                top = torch.softmax(logits / tau_s, dim=1).max(dim=1).values
                assert torch.equal(ref[ref >= 0], argmax[ref >= 0])
                assert (ref[top > 0.5001] >= 0).all() and (ref[top < 0.4999] == -1).all()
    if backend == "torch":  # float64 in, float64 out: the reference's own accuracy
        s64, t64, q64 = s.double(), t.double(), q.double()
        rows, grad, _ = sharded_pieces(pieces, s64, t64, q64, tau_s, tau_t, True, w.double(), 3)
        ref_rows, ref_grad = reference_rows_and_grad(s64, t64, q64, tau_s, tau_t, True, w)
        assert rel_err(rows, ref_rows) <= 1e-12 and rel_err(grad, ref_grad) <= 1e-11


# ------------------------------------------------------------------------------------ bank layout, fifo
def test_layout_sizes_differ_by_at_most_one():
    for k, world in ((37, 2), (37, 3), (64, 8), (10, 4), (5, 5)):
        shards = [ShardLayout(k, world, r) for r in range(world)]
        assert shards[0].lo == 0 and shards[-1].hi == k
        assert all(a.hi == b.lo for a, b in zip(shards, shards[1:]))
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1


def test_sharded_enqueue_is_the_fifo(gen):
    """Every shard's rows, written by enqueue_sharded_, equal the single FIFO's, for batches that wrap across
    shard boundaries and the end of the bank (n up to K)."""
    for world in (2, 3, 5):
        full = torch.randn(K, 4, generator=gen)
        ptr = torch.zeros(1, dtype=torch.long)
        layouts = [ShardLayout(K, world, r) for r in range(world)]
        shards = [full[l.lo : l.hi].clone() for l in layouts]
        ptrs = [ptr.clone() for _ in layouts]
        for n in (5, 17, 36, 37, 1, 30):
            keys = torch.randn(n, 4, generator=gen)
            enqueue_(full, ptr, keys)
            for l, shard, p in zip(layouts, shards, ptrs):
                enqueue_sharded_(shard, p, keys, l.lo, K)
            assert torch.equal(torch.cat(shards), full)
            assert all(torch.equal(p, ptr) for p in ptrs)


def test_init_does_not_depend_on_the_sharding():
    whole = random_unit_rows_range(1000, 8, 0, 1000, seed=7)
    parts = [random_unit_rows_range(1000, 8, l.lo, l.hi, seed=7) for l in (ShardLayout(1000, 3, r) for r in range(3))]
    assert torch.equal(torch.cat(parts), whole)
    torch.testing.assert_close(whole.norm(dim=1), torch.ones(1000))


def test_shard_bank_needs_gather_distributed():
    with pytest.raises(ValueError, match="shard_bank=True needs gather_distributed=True"):
        RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K, shard_bank=True, gather_distributed=False)


def test_without_process_group_it_is_the_unsharded_module():
    torch.manual_seed(5)
    a = RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K, backend="torch", shard_bank=True)
    torch.manual_seed(5)
    b = RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K, backend="torch")
    assert not a.bank_is_sharded and a.state_dict().keys() == b.state_dict().keys()
    f_s, f_t = torch.randn(B, S_DIM), torch.randn(B, T_DIM)
    assert torch.equal(a(f_s, f_t), b(f_s, f_t)) and torch.equal(a.bank, b.bank)
    assert torch.equal(a.gather_bank(), b.bank)


# ------------------------------------------------------------------------------------------ distributed
def make_module(enqueue: str, backend: str, shard: bool = True) -> RRDLoss:
    torch.manual_seed(1234)  # the same heads (and bank seed) on every rank and in the reference
    tau_s, tau_t = TAUS[enqueue]
    return RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K, tau_s=tau_s, tau_t=tau_t, enqueue=enqueue,
                   backend=backend, shard_bank=shard)


def local_batch(step: int, rank: int, rows: int = B):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, S_DIM, generator=g), torch.randn(rows, T_DIM, generator=g)


def global_batch(step: int):
    """The continuation's 12 rows of a step; rank r of W takes rows [r 12/W, (r + 1) 12/W)."""
    g = torch.Generator().manual_seed(777 + step)
    return torch.randn(GLOBAL_ROWS, S_DIM, generator=g), torch.randn(GLOBAL_ROWS, T_DIM, generator=g)


def continue_steps(crit, rank: int, world: int) -> list[float]:
    """MORE steps on the global batches; returns this rank's losses."""
    n = GLOBAL_ROWS // world
    losses = []
    for step in range(MORE):
        f_s, f_t = (x[rank * n : (rank + 1) * n] for x in global_batch(step))
        f_s.requires_grad_(True)
        loss = crit(f_s, f_t)
        loss.backward()
        losses.append(loss.detach())
    return losses


def expect_error(fn, crit) -> str:
    """Run a call that must fail on every rank; the bank and pointer must be as they were."""
    before = crit.bank.clone(), crit.bank_ptr.clone()
    try:
        fn()
    except (ValueError, RuntimeError) as exc:
        assert torch.equal(crit.bank, before[0]) and torch.equal(crit.bank_ptr, before[1])
        return str(exc)
    return "no error"


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {"time": {}}
        for enqueue, backend in CONFIGS:
            t0 = time.perf_counter()
            crit = make_module(enqueue, backend)
            res = {"bank0": crit.gather_bank(), "losses": [], "grads": [], "ptrs": []}
            for step in range(STEPS):
                f_s, f_t = local_batch(step, rank)
                f_s.requires_grad_(True)
                loss = crit(f_s, f_t)
                loss.backward()
                res["losses"].append(loss.detach())
                res["grads"].append(f_s.grad)
                res["ptrs"].append(crit.bank_ptr.clone())
            res["bank"] = crit.gather_bank()
            res["shard"] = crit.bank.clone()
            out[(enqueue, backend)] = res
            out["time"][(enqueue, backend)] = time.perf_counter() - t0
            if (enqueue, backend) == ("after", "torch"):
                if world == 2:  # the checkpoint: per-rank state_dicts (this rank's rows + range)
                    torch.save(crit.state_dict(), os.path.join(out_dir, f"ckpt_rank{rank}.pt"))
                    out["full_state"] = {k: v.clone() for k, v in crit.full_state_dict().items()}  # not live
                    out["continued"] = continue_steps(crit, rank, world)
                    out["continued_bank"] = crit.gather_bank()
                else:  # restore the 2-rank checkpoint on this many ranks, unsharded state loads too
                    ckpt = [torch.load(os.path.join(out_dir, f"ckpt_rank{r}.pt")) for r in range(2)]
                    restored = make_module("after", "torch")
                    msg = expect_error(lambda: restored.load_state_dict(ckpt[rank % 2]), restored)
                    out["wrong_shard_msg"] = msg
                    restored.load_state_dict(merge_bank_shards(ckpt))
                    out["restored_bank"] = restored.gather_bank()
                    out["continued"] = continue_steps(restored, rank, world)
                    out["continued_bank"] = restored.gather_bank()
        # bad input: every rank must raise (the same table of shapes), nothing written
        crit = make_module("after", "torch")
        f_s, f_t = local_batch(0, rank, B - 1 if rank == 1 else B)
        out["batch_msg"] = expect_error(lambda: crit(f_s, f_t), crit)
        f_s, f_t = local_batch(0, rank, K // world + 1)
        out["too_big_msg"] = expect_error(lambda: crit(f_s, f_t), crit)
        torch.manual_seed(1234)
        other = RRDLoss(S_DIM, T_DIM, feat_dim=FEAT, bank_size=K + rank, backend="torch", shard_bank=True)
        out["k_msg"] = expect_error(lambda: other(*local_batch(0, rank)), other)
        torch.manual_seed(1234)
        other = RRDLoss(S_DIM, T_DIM, feat_dim=FEAT + rank, bank_size=K, backend="torch", shard_bank=True)
        out["d_msg"] = expect_error(lambda: other(*local_batch(0, rank)), other)
        out["cuda_msg"] = expect_error(lambda: make_module("after", "cuda")(*local_batch(0, rank)), crit)
        torch.save(out, os.path.join(out_dir, f"w{world}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process(enqueue: str, bank0: torch.Tensor, world: int):
    """One process, the full bank: each rank's local batch against it (rrd_loss, fp32), then the enqueue of
    all ranks' keys in rank order."""
    crit = make_module(enqueue, "torch", shard=False)
    bank, ptr = bank0.clone(), torch.zeros(1, dtype=torch.long)
    tau_s, tau_t = TAUS[enqueue]
    losses, grads = [[] for _ in range(world)], [[] for _ in range(world)]
    for step in range(STEPS):
        batches = [local_batch(step, r) for r in range(world)]
        with torch.no_grad():
            keys = torch.cat([F.normalize(crit.embed_t(f_t), dim=1, eps=1e-12) for _, f_t in batches])
        if enqueue == "before":
            enqueue_(bank, ptr, keys)
        for r, (f_s, f_t) in enumerate(batches):
            f_s = f_s.clone().requires_grad_(True)
            loss = rrd_loss(crit.embed_s(f_s), crit.embed_t(f_t), bank, tau_s=tau_s, tau_t=tau_t, backend="torch")
            loss.backward()
            losses[r].append(loss.detach())
            grads[r].append(f_s.grad)
        if enqueue == "after":
            enqueue_(bank, ptr, keys)
    return bank, ptr, losses, grads


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{world: [rank results]} for 2 ranks, then 3 (which restore the 2-rank checkpoint)."""
    out = tmp_path_factory.mktemp("sharded")
    results = {"dir": out}
    for world in (2, 3):
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
        results[world] = [torch.load(out / f"w{world}_rank{r}.pt", weights_only=False) for r in range(world)]
        print(f"{world} ranks: {time.perf_counter() - t0:.1f} s; per config {results[world][0]['time']}")
    return results


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("enqueue,backend", CONFIGS)
def test_sharded_module_equals_one_process(ranks, world, enqueue, backend):
    res = [r[(enqueue, backend)] for r in ranks[world]]
    bank0 = res[0]["bank0"]
    assert all(torch.equal(r["bank0"], bank0) for r in res)
    assert torch.equal(bank0, ranks[2][0][(enqueue, backend)]["bank0"])  # the init does not depend on W
    bank, ptr, losses, grads = single_process(enqueue, bank0, world)
    for r in range(world):
        layout = ShardLayout(K, world, r)
        assert res[r]["shard"].shape[0] == layout.size  # each rank stores only its rows
        assert torch.equal(res[r]["bank"], bank)  # the gathered bank is the FIFO, bit for bit
        assert torch.equal(res[r]["shard"], bank[layout.lo : layout.hi])
        for step in range(STEPS):
            assert torch.equal(res[r]["ptrs"][step], torch.tensor([(step + 1) * world * B % K]))
            assert rel_err(res[r]["losses"][step], losses[r][step]) <= 1e-5, (r, step)
            assert rel_err(res[r]["grads"][step], grads[r][step]) <= 1e-5, (r, step)
    worst_loss = max(rel_err(res[r]["losses"][s], losses[r][s]) for r in range(world) for s in range(STEPS))
    worst_grad = max(rel_err(res[r]["grads"][s], grads[r][s]) for r in range(world) for s in range(STEPS))
    print(f"W {world} {enqueue} {backend}: worst relative error loss {worst_loss:.1e}, gradient {worst_grad:.1e}")
    assert not torch.equal(bank, bank0)
    assert not torch.allclose(res[0]["losses"][-1], res[1]["losses"][-1])  # the ranks' batches differ


@needs_gloo
def test_checkpoint_restores_on_other_rank_counts(ranks):
    two, three = ranks[2], ranks[3]
    full = two[0]["full_state"]
    assert torch.equal(full["bank"], two[0][("after", "torch")]["bank"])
    assert all(torch.equal(r["restored_bank"], full["bank"]) for r in three)
    assert "merge_bank_shards" in three[0]["wrong_shard_msg"]  # a shard of another layout is refused
    # one process: the unsharded module loads the merged per-rank state_dicts (the same as the full state)
    ckpt = [torch.load(ranks["dir"] / f"ckpt_rank{r}.pt") for r in range(2)]
    merged = merge_bank_shards(ckpt)
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    single = make_module("after", "torch", shard=False)
    single.load_state_dict(merged)
    one = continue_steps(single, 0, 1)
    mean2 = [sum(r["continued"][s] for r in two) / 2 for s in range(MORE)]
    mean3 = [sum(r["continued"][s] for r in three) / 3 for s in range(MORE)]
    for s in range(MORE):
        torch.testing.assert_close(mean3[s], mean2[s], rtol=1e-6, atol=0)
        torch.testing.assert_close(one[s], mean2[s], rtol=1e-6, atol=0)
    # the banks continue alike (the keys come from Linear over 6, 4 and 12 rows: fp32 rounding only)
    torch.testing.assert_close(three[0]["continued_bank"], two[0]["continued_bank"], rtol=0, atol=1e-6)
    torch.testing.assert_close(single.bank, two[0]["continued_bank"], rtol=0, atol=1e-6)


@needs_gloo
@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_fails_on_every_rank(ranks, world):
    for r in ranks[world]:
        assert "different batch sizes" in r["batch_msg"], r["batch_msg"]
        assert "larger than the bank" in r["too_big_msg"], r["too_big_msg"]
        assert "different bank_size" in r["k_msg"], r["k_msg"]
        assert "different feat_dim" in r["d_msg"], r["d_msg"]
        assert "backend='cuda' has no sharded-bank pieces" in r["cuda_msg"], r["cuda_msg"]


@needs_gloo
def test_train_app_shard_bank_under_torchrun(tmp_path):
    """train.py --shard-bank on two gloo processes: per-rank shards in checkpoint.pt, the full bank in final.pt."""
    import json

    from test_ddp import _torchrun

    _torchrun("--teacher-epochs", 1, "--epochs", 1, "--methods", "rrd", "--seeds", 1, "--shard-bank",
              "--bank-size", 1001, "--out-dir", tmp_path)
    stage = tmp_path / "seed0" / "rrd"
    shards = torch.load(stage / "checkpoint.pt", weights_only=False)["criterion_per_rank"]
    final = torch.load(stage / "final.pt", weights_only=True)["criterion"]
    assert [s["bank_shard_range"].tolist() for s in shards] == [[0, 501, 1001], [501, 1001, 1001]]
    assert final["bank"].shape == (1001, 128) and "bank_shard_range" not in final
    assert torch.equal(merge_bank_shards(shards)["bank"], final["bank"])
    assert int(final["bank_ptr"]) == 1438 % 1001  # DistributedSampler pads 1437 to 2 x 719; every key enqueued
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["methods"]["rrd"]["ddp_bank_in_sync"] == [True]

"""RRDMomentumLoss under torch.distributed: two gloo processes on 127.0.0.1, CPU.

What the module promises with gather_distributed=True: after every step both ranks hold the same memories
(and z), equal to one process that runs the update of the concatenated batch (rank order, so the last
occurrence of a repeated index in rank order wins), and each rank's loss and gradient are the
single-process ones of its local batch against the memories as they were. The sampler draws differently
per rank (rank 0 as a single process would) and resumes from a rank's saved state. With
gather_distributed=False each rank's memories only see its own batch.

One spawn runs every case (the processes cost more than the steps)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rrd_kernels import RRDMomentumLoss, gathered_rrd_rows

WORLD, STEPS = 2, 4
B, S_DIM, T_DIM, FEAT, N_DATA, NCE_K = 6, 12, 20, 8, 30, 9  # N small: indices repeat within and across ranks
TAU_S, TAU_T = 0.1, 0.05  # softmaxes far from uniform, so a wrong memory row shows in the loss
CASES = (("similarity", True), ("faithful", True), ("similarity", False))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_module(seed: int, scores: str, gather: bool = True) -> RRDMomentumLoss:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same heads and memories on every rank and in the reference
        return RRDMomentumLoss(S_DIM, T_DIM, feat_dim=FEAT, n_data=N_DATA, nce_k=NCE_K, tau_s=TAU_S, tau_t=TAU_T,
                               scores=scores, generator=seed + 1, gather_distributed=gather)


def local_batch(seed: int, step: int, rank: int):
    g = torch.Generator().manual_seed(seed + 1000 * step + rank)
    f_s = torch.randn(B, S_DIM, generator=g) * 2
    f_t = torch.randn(B, T_DIM, generator=g) * 2
    idx = torch.randint(0, N_DATA, (B,), generator=g)
    idx[-1] = idx[0]  # repeated within the rank's batch
    if rank == 1:
        idx[1] = seed % N_DATA  # and across ranks: rank 0 has it too (below), rank 1's update must win
    else:
        idx[2] = seed % N_DATA
    contrast = torch.cat([idx[:, None], torch.randint(0, N_DATA, (B, NCE_K), generator=g)], dim=1)
    return f_s, f_t, idx, contrast


def _worker(rank: int, port: int, out_dir: str, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for scores, gather in CASES:
            crit = make_module(seed, scores, gather)
            losses, grads, memories = [], [], []
            for step in range(STEPS):
                f_s, f_t, idx, contrast = local_batch(seed, step, rank)
                f_s.requires_grad_(True)
                loss = crit(f_s, f_t, idx, contrast)
                loss.backward()
                losses.append(loss.detach().clone())
                grads.append(f_s.grad.clone())
                memories.append((crit.memory_s.clone(), crit.memory_t.clone(), crit.z.clone()))
            out[(scores, gather)] = {"losses": losses, "grads": grads, "memories": memories}
        crit = make_module(seed, "similarity")
        draws = crit.sample_contrast_idx(torch.arange(B))
        saved = crit.state_dict()
        out["draws"] = (draws, crit.sample_contrast_idx(torch.arange(B)), saved)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    seed = int.from_bytes(os.urandom(3), "little") if not os.environ.get("RRD_TEST_SEED") else int(
        os.environ["RRD_TEST_SEED"])
    out = tmp_path_factory.mktemp("momentum_ddp")
    mp.spawn(_worker, args=(free_port(), str(out), seed), nprocs=WORLD, join=True)
    return seed, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def reference(seed: int, scores: str):
    """One process: each rank's loss on its local batch against the shared memories (z as the ranks hold
    it), then the update of the concatenated batch in rank order."""
    torch.set_num_threads(1)
    crit = make_module(seed, scores)  # no process group here: a plain single process
    losses, grads, memories = [[] for _ in range(WORLD)], [[] for _ in range(WORLD)], []
    for step in range(STEPS):
        batches = [local_batch(seed, step, r) for r in range(WORLD)]
        z_used = []
        for r, (f_s, f_t, _idx, contrast) in enumerate(batches):
            f_s = f_s.clone().requires_grad_(True)
            rows, z = gathered_rrd_rows(crit.embed_s(f_s), crit.embed_t(f_t), crit.memory_s, crit.memory_t,
                                        contrast, tau_s=TAU_S, tau_t=TAU_T, scores=scores, nce_t=crit.nce_t,
                                        z=crit.z.clone() if scores == "faithful" else None, backend="torch")
            loss = rows.mean()
            loss.backward()
            losses[r].append(loss.detach())
            grads[r].append(f_s.grad)
            z_used.append(z)
        z_before = crit.z.clone()
        with torch.no_grad():  # the update of the concatenated batch (and, once, z from it)
            crit(*(torch.cat([b[i] for b in batches]) for i in range(4)))
        if scores == "faithful":  # the z every rank holds: the mean of the ranks' batch Z, where unset
            mean = torch.stack(z_used).mean(0)
            torch.testing.assert_close(crit.z, torch.where(z_before < 0, mean, z_before), rtol=1e-5, atol=0)
        memories.append((crit.memory_s.clone(), crit.memory_t.clone(), crit.z.clone()))
    return losses, grads, memories


@pytest.mark.parametrize("scores", ["similarity", "faithful"])
def test_memories_identical_and_equal_to_the_concatenated_update(ranks, scores):
    seed, res = ranks
    print(f"seed={seed} (replay: RRD_TEST_SEED={seed})")
    mine = [r[(scores, True)] for r in res]
    ref_losses, ref_grads, ref_memories = reference(seed, scores)
    start = make_module(seed, scores)
    for step in range(STEPS):
        for a, b in zip(mine[0]["memories"][step], mine[1]["memories"][step]):
            assert torch.equal(a, b), step  # bit-identical on both ranks
        (m_s, m_t, z), (r_s, r_t, r_z) = mine[0]["memories"][step], ref_memories[step]
        # the heads ran on B rows per rank vs 2B rows here: float32 rounding only
        torch.testing.assert_close(m_s, r_s, rtol=0, atol=2e-6)
        torch.testing.assert_close(m_t, r_t, rtol=0, atol=2e-6)
        torch.testing.assert_close(z, r_z, rtol=1e-5, atol=0)  # z ~ n_data * mean exp(score / nce_t)
        for r in range(WORLD):
            torch.testing.assert_close(mine[r]["losses"][step], ref_losses[r][step], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine[r]["grads"][step], ref_grads[r][step], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(mine[0]["losses"][-1], mine[1]["losses"][-1])  # different local batches
    assert not torch.equal(start.memory_s, mine[0]["memories"][-1][0])  # the memories did move
    if scores == "faithful":
        assert bool((mine[0]["memories"][0][2] > 0).all())  # z was set on the first step


def test_the_last_occurrence_in_rank_order_wins(ranks):
    """The index shared by both ranks' batches holds rank 1's update: applying the concatenation in the
    other order (rank 1 first) gives another row, so the comparison above would have caught it."""
    seed, res = ranks
    crit = make_module(seed, "similarity")
    batches = [local_batch(seed, 0, r) for r in range(WORLD)]
    with torch.no_grad():
        crit(*(torch.cat([b[i] for b in reversed(batches)]) for i in range(4)))
    shared = seed % N_DATA
    got = res[0][("similarity", True)]["memories"][0][0][shared]
    assert not torch.allclose(got, crit.memory_s[shared], atol=1e-4)


def test_without_gather_each_rank_updates_with_its_own_batch(ranks):
    seed, res = ranks
    for r in range(WORLD):
        crit = make_module(seed, "similarity", gather=False)
        for step in range(STEPS):
            with torch.no_grad():
                crit(*local_batch(seed, step, r))
        torch.testing.assert_close(res[r][("similarity", False)]["memories"][-1][0], crit.memory_s, rtol=0, atol=0)
    assert not torch.equal(res[0][("similarity", False)]["memories"][-1][0],
                           res[1][("similarity", False)]["memories"][-1][0])


def test_ranks_draw_different_negatives_and_resume(ranks):
    seed, res = ranks
    (d0, _, _), (d1, next1, saved1) = res[0]["draws"], res[1]["draws"]
    assert torch.equal(d0[:, 0], torch.arange(B)) and torch.equal(d1[:, 0], torch.arange(B))
    assert not torch.equal(d0[:, 1:], d1[:, 1:])
    single = make_module(seed, "similarity")  # rank 0 draws what a single process draws
    assert torch.equal(single.sample_contrast_idx(torch.arange(B)), d0)
    resumed = make_module(seed, "similarity")
    resumed.load_state_dict(saved1)  # rank 1's state after one draw: the next draw is rank 1's next
    assert torch.equal(resumed.sample_contrast_idx(torch.arange(B)), next1)

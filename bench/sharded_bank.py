"""Per-rank memory and per-step communication of RRDLoss(shard_bank=True): the formulas, and one measured
CPU run (gloo ranks on this machine) whose collectives are counted byte by byte.

    python -m bench.sharded_bank                      # the table from the formulas
    python -m bench.sharded_bank --measure            # + W=2 gloo run at K 65536, D 128, B 256 (torch backend)

Bytes a rank receives per step (ring collectives; e = embedding bytes, P = state planes, D = feat_dim):
    [S | T] all-gather          (W-1) B 2D e
    states all-to-all           (W-1) B s                   (s = 28: triton 6 fp32 planes + int32 argmax;
                                                             torch fp32 5 planes + int64 argmax)
    LSEs + ref all-gather       (W-1) B l                   (l = 12 triton, 16 torch: int64 ref)
    [acc | sigma | Q_ref] r-s   (W-1) B (2D + 1) 4          (fp32 partial sums)
    shape check (host, gloo)    W 3 8
The bank itself never moves: K/W x D x bank bytes per rank (plus one shard copy during a step with
enqueue="after", which the backward needs as it was).
"""
from __future__ import annotations

import argparse
import os
import socket
import time

GiB, MiB = 1 << 30, 1 << 20


def shard_bytes(K: int, W: int, D: int, bank_bytes: int = 4) -> int:
    return -(-K // W) * D * bank_bytes


def step_comm_bytes(W: int, B: int, D: int, emb_bytes: int = 4, state_bytes: int = 28, lse_bytes: int = 12,
                    host_check: bool = True) -> int:
    per_peer_row = 2 * D * emb_bytes + state_bytes + lse_bytes + (2 * D + 1) * 4
    return (W - 1) * B * per_peer_row + (W * 3 * 8 if host_check else 0)


def unsharded_comm_bytes(W: int, B: int, D: int, emb_bytes: int = 4) -> int:
    return (W - 1) * B * D * emb_bytes  # gather_distributed=True: the keys only


def table(Ks=(1 << 20, 1 << 24, 1 << 27), Ws=(1, 2, 8, 64), D=128, B=256) -> str:
    lines = [f"D {D}, B {B} per rank, fp32 bank and embeddings, triton backend", "",
             "| K | W | bank per rank | unsharded bank per rank | comm per step per rank (received) |",
             "|---|---|---|---|---|"]
    for K in Ks:
        for W in Ws:
            comm = step_comm_bytes(W, B, D) if W > 1 else 0
            lines.append(f"| {K >> 20}M | {W} | {shard_bytes(K, W, D) / GiB:.3f} GiB | {K * D * 4 / GiB:.3f} GiB "
                         f"| {comm / MiB:.2f} MiB |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measured run
def _count(dist, counter):
    """Wrap the collectives the sharded loss uses; count the bytes each rank receives (ring algorithms)."""
    world = dist.get_world_size()

    def wrap(name, received):
        fn = getattr(dist, name)

        def counted(*args, **kwargs):
            counter[name] = counter.get(name, 0) + received(*args)
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    wrap("all_gather", lambda out, x, *a: (world - 1) * x.numel() * x.element_size())
    wrap("all_to_all_single", lambda out, x, *a: (world - 1) * x.numel() * x.element_size() // world)
    wrap("reduce_scatter_single", lambda out, x, *a: (world - 1) * out.numel() * out.element_size())


def _worker(rank, world, port, K, D, B, steps, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from rrd_kernels import RRDLoss

        torch.manual_seed(0)
        crit = RRDLoss(D, D, feat_dim=D, bank_size=K, backend="torch", shard_bank=True)
        counter: dict = {}
        f_s, f_t = torch.randn(B, D), torch.randn(B, D)
        crit(f_s.requires_grad_(True), f_t).backward()  # warm-up
        _count(dist, counter)
        t0 = time.perf_counter()
        for _ in range(steps):
            crit(f_s, f_t).backward()
        dt = (time.perf_counter() - t0) / steps
        if rank == 0:
            out.update(step_s=dt, shard_bytes=crit.bank.numel() * crit.bank.element_size(),
                       comm={k: v / steps for k, v in counter.items()})
            torch.save(dict(out), os.environ["RRD_BENCH_OUT"])
    finally:
        dist.destroy_process_group()


def measure(W=2, K=1 << 16, D=128, B=256, steps=3) -> dict:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RRD_BENCH_OUT"] = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(W, port, K, D, B, steps, {}), nprocs=W, join=True)
        res = torch.load(os.environ["RRD_BENCH_OUT"])
    res["predicted_comm"] = step_comm_bytes(W, B, D, lse_bytes=16, host_check=False)  # torch backend
    res["measured_comm"] = sum(res["comm"].values()) - (W - 1) * 3 * 8  # less the host check's all-gather
    res["predicted_shard"] = shard_bytes(K, W, D)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="also run 2 gloo ranks on this CPU and count bytes")
    args = p.parse_args(argv)
    print(table())
    if args.measure:
        res = measure()
        print(f"\nmeasured, W 2, K 65536, D 128, B 256 per rank, CPU gloo, torch backend: {res['step_s'] * 1e3:.0f} ms"
              f"/step; shard {res['shard_bytes'] / MiB:.1f} MiB (formula {res['predicted_shard'] / MiB:.1f}); "
              f"received {res['measured_comm'] / MiB:.3f} MiB/step (formula {res['predicted_comm'] / MiB:.3f}); "
              f"by collective {dict((k, round(v)) for k, v in res['comm'].items())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

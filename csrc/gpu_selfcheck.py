"""GPU self-check of the cuda backend, for a session that has a device: one short script (about a minute).

    python csrc/gpu_selfcheck.py            # exit status 0 when every check passes

Checks, on the current CUDA device: rrd_loss(..., backend="cuda") forward (CE and KL) and dL/dS against the
float64 reference on the same rounded inputs, over dtypes (fp32 with "highest" and "high" matmul precision,
bf16, fp16, mixed bank dtypes), odd sizes (B = 1, K = 1, D not a power of two, D = 512), small B with a
large bank (many splits); torch.compile(fullgraph=True); a non-contiguous input; then a short timing of
forward + backward against the triton backend (if usable) and the eager reference; the gathered-memory
kernels (gathered_rrd_rows(backend="cuda"), csrc/rrd_gathered.cuh) against gathered_reference, and their
timing at the authors' size against triton and torch.
Error budgets as in tests/test_cuda_build.py (the host emulation of the same kernels).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rrd_kernels  # noqa: E402
from rrd_kernels import cuda_backend  # noqa: E402
from rrd_kernels.backends import unusable_reason  # noqa: E402
from rrd_kernels.reference import rrd_reference  # noqa: E402

UNIT = {"fp32": 2.0**-24, "tf32": 2.0**-11, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
failures = []


def inputs(B, K, D, dtype, bank_dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = torch.randn(B, D, generator=g) * 10 ** (torch.rand(B, 1, generator=g) * 4 - 2)
    T = torch.randn(B, D, generator=g) * 10 ** (torch.rand(B, 1, generator=g) * 4 - 2)
    Q = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    return S.to("cuda", dtype), T.to("cuda", dtype), Q.to("cuda", bank_dtype)


def tolerances(dtype, bank_dtype, precision, tau_s, tau_t) -> tuple[float, float]:
    """(loss bound, gradient bound in units of w / (tau_s ||S||)): 8 unit roundoffs of the products' operand
    type (the bank's, when it is the coarser 16-bit type) per 1/tau, plus the output rounding."""
    if dtype == torch.float32:
        u = UNIT["fp32" if precision == "highest" else "tf32"]
    else:
        u = UNIT[dtype]
    if bank_dtype != dtype and bank_dtype != torch.float32:
        u = max(u, UNIT[bank_dtype])
    tol = 8 * u / min(tau_s, tau_t) + 2e-5
    g_tol = 8 * u / tau_s + {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0) + 2e-5
    return tol, g_tol


def timing_backends(S, Q) -> list[str]:
    """The backends that can run a timing on S's device ("torch" always), by the backend contract."""
    B, D = S.shape
    names = ["cuda", "triton"]
    usable = [n for n in names if unusable_reason(n, S.device, S.dtype, Q.dtype, B, Q.shape[0], D) is None]
    return usable + ["torch"]


def check(B, K, D, dtype, bank_dtype, precision, tau_s, tau_t, objective, seed=0, transform=None):
    torch.set_float32_matmul_precision(precision)
    S, T, Q = inputs(B, K, D, dtype, bank_dtype, seed)
    if transform is not None:
        S, T, Q = transform(S), transform(T), transform(Q)
    w = torch.linspace(0.5, 1.5, B, device="cuda")
    Sg = S.detach().clone().requires_grad_()
    rows = rrd_kernels.rrd_loss(Sg, T, Q, tau_s=tau_s, tau_t=tau_t, objective=objective, reduction="none",
                                backend="cuda")
    (rows * w).sum().backward()
    S64 = S.detach().double().requires_grad_()
    ref = rrd_reference(S64, T.double(), Q.double(), tau_s, tau_t, objective, "none")
    (ref * w.double()).sum().backward()
    torch.cuda.synchronize()
    tol, g_tol = tolerances(dtype, bank_dtype, precision, tau_s, tau_t)
    err_rows = (rows.double() - ref).abs().max().item()
    natural = w.double() / (tau_s * S64.detach().norm(dim=1).clamp_min(1e-12))
    err_grad = ((Sg.grad.double() - S64.grad).abs().amax(1) / natural).max().item()
    ok = err_rows <= tol and err_grad <= g_tol and Sg.grad.dtype == dtype
    name = f"B{B} K{K} D{D} {dtype} bank {bank_dtype} {precision} tau {tau_s}/{tau_t} {objective}"
    print(f"{'PASS' if ok else 'FAIL'} {name}: rows err {err_rows:.2e} (tol {tol:.1e}), grad err {err_grad:.2e} "
          f"(tol {g_tol:.1e})")
    if not ok:
        failures.append(name)


def time_steps(step, n=5) -> tuple[float, float]:
    """(seconds of the first call, which includes any JIT compilation; mean seconds of the next n)."""
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return first, (time.perf_counter() - t0) / n


def check_gathered(B, K1, D, N, memory_dtype, tau_s, tau_t, objective, seed=0, n_splits=None):
    """The gathered-memory kernels (csrc/rrd_gathered.cuh) against the float64 gathered_reference: relative
    error of the rows and of dL/dS for per-row weights, at the bounds of tests/test_gathered_cuda.py."""
    from rrd_kernels import gathered

    g = torch.Generator(device="cpu").manual_seed(seed)
    S = (torch.randn(B, D, generator=g) * 10 ** (torch.rand(B, 1, generator=g) * 4 - 2)).cuda()
    T = (torch.randn(B, D, generator=g) * 10 ** (torch.rand(B, 1, generator=g) * 4 - 2)).cuda()
    ms = F.normalize(torch.randn(N, D, generator=g), dim=1).to("cuda", memory_dtype)
    mt = F.normalize(torch.randn(N, D, generator=g), dim=1).to("cuda", memory_dtype)
    idx = torch.randint(0, N, (B, K1), generator=g).cuda()
    w = torch.linspace(0.5, 1.5, B, device="cuda")
    Sg = S.clone().requires_grad_()
    rows, _ = gathered.gathered_rrd_rows(Sg, T, ms, mt, idx, tau_s=tau_s, tau_t=tau_t, objective=objective,
                                         backend="cuda")
    (rows * w).sum().backward()
    S64 = S.double().requires_grad_()
    ref, _ = gathered.gathered_reference(S64, T.double(), ms.double(), mt.double(), idx, tau_s, tau_t, objective)
    (ref * w.double()).sum().backward()
    torch.cuda.synchronize()
    amp = max(1.0, 1.0 / (50.0 * min(tau_s, tau_t)))
    tol, g_tol = 1e-5 * amp, 1e-4 * amp * (3 if max(tau_s, tau_t) >= 100 else 1)
    e_rows = ((rows.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    e_grad = ((Sg.grad.double() - S64.grad).norm() / S64.grad.norm().clamp_min(1e-300)).item()
    ok = e_rows <= tol and e_grad <= g_tol
    name = f"gathered B{B} K+1 {K1} D{D} N{N} {memory_dtype} tau {tau_s}/{tau_t} {objective}"
    print(f"{'PASS' if ok else 'FAIL'} {name}: rows rel err {e_rows:.2e} (tol {tol:.1e}), grad rel err {e_grad:.2e} "
          f"(tol {g_tol:.1e})")
    if not ok:
        failures.append(name)


def time_gathered():
    """Forward + backward of the gathered loss at the authors' size (B 64, K+1 16385, D 128, fp32 memories of
    50000 rows) per backend that can run it; the cost model predicts 0.45 ms (cuda) / 0.51 ms (triton)."""
    from rrd_kernels import gathered

    g = torch.Generator(device="cpu").manual_seed(3)
    S, T = torch.randn(64, 128, generator=g).cuda(), torch.randn(64, 128, generator=g).cuda()
    ms = F.normalize(torch.randn(50000, 128, generator=g), dim=1).cuda()
    mt = F.normalize(torch.randn(50000, 128, generator=g), dim=1).cuda()
    idx = torch.randint(0, 50000, (64, 16385), generator=g).cuda()
    for backend in ("cuda", "triton", "torch"):
        reason = gathered.fused_unusable(backend, S, ms, idx, False)
        if reason is not None:
            print(f"time gathered {backend}: unavailable ({reason})")
            continue
        Sg = S.clone().requires_grad_()

        def step():
            rows, _ = gathered.gathered_rrd_rows(Sg, T, ms, mt, idx, tau_s=0.1, tau_t=0.05, backend=backend)
            rows.mean().backward()

        first, mean = time_steps(step, 10)
        print(f"time gathered {backend}: {mean * 1e3:.3f} ms per forward+backward (B 64, K+1 16385, D 128, fp32 "
              f"memories); first call {first:.2f} s")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(torch.cuda.get_device_name(), "| extension:", cuda_backend.build_info())
    reason = unusable_reason("cuda", torch.device("cuda"), torch.float32, torch.float32, 2, 2, 8)
    if reason:
        print("cuda backend unusable:", reason)
        return 1
    bf, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    check(1, 1, 1, f32, f32, "highest", 0.1, 0.02, "ce")
    check(5, 7, 3, f32, f32, "highest", 0.04, 0.1, "kl")
    check(64, 16384, 128, f32, f32, "highest", 0.04, 0.1, "ce")
    check(64, 16384, 128, f32, f32, "high", 0.04, 0.1, "ce")
    check(64, 16384, 128, bf, bf, "highest", 0.04, 0.1, "ce")
    check(64, 16384, 128, bf, bf, "highest", 0.1, 0.02, "kl")
    check(64, 16384, 128, fp16, fp16, "highest", 0.1, 0.02, "ce")
    check(200, 5000, 72, bf, f32, "highest", 0.04, 0.1, "ce")
    check(200, 5000, 72, f32, bf, "high", 0.04, 0.1, "kl")
    check(130, 999, 512, bf, bf, "highest", 0.1, 0.02, "ce")
    check(33, 300, 300, f32, f32, "highest", 0.1, 0.02, "ce")
    check(1000, 4097, 96, fp16, bf, "highest", 0.04, 0.1, "ce")
    check(70, 130, 40, bf, bf, "highest", 0.04, 0.1, "ce", transform=lambda x: x.t().contiguous().t())

    check_gathered(1, 1, 16, 10, f32, 0.1, 0.05, "ce")
    check_gathered(5, 300, 37, 500, bf, 0.1, 0.05, "kl")
    check_gathered(64, 16385, 128, 50000, f32, 0.1, 0.05, "ce")
    check_gathered(64, 16385, 128, 50000, bf, 0.005, 0.01, "ce")
    check_gathered(33, 4097, 512, 9000, fp16, 100.0, 100.0, "ce")
    check_gathered(1024, 1000, 96, 20000, f32, 0.04, 0.1, "kl")

    # torch.compile through the custom op, with the mean reduction's expanded upstream gradient
    torch.set_float32_matmul_precision("highest")
    S, T, Q = inputs(64, 4096, 128, bf, bf, 1)
    fn = torch.compile(lambda s: rrd_kernels.rrd_loss(s, T, Q, tau_s=0.04, tau_t=0.1, backend="cuda"), fullgraph=True)
    Sg = S.clone().requires_grad_()
    loss = fn(Sg)
    loss.backward()
    S64 = S.double().requires_grad_()
    ref = rrd_reference(S64, T.double(), Q.double(), 0.04, 0.1, "ce", "mean")
    ref.backward()
    ok = abs(loss.item() - ref.item()) < 1e-3 and (Sg.grad.double() - S64.grad).abs().max() < 5e-2 * S64.grad.abs().max()
    print(f"{'PASS' if ok else 'FAIL'} torch.compile(fullgraph=True): loss {loss.item():.6f} ref {ref.item():.6f}")
    if not ok:
        failures.append("torch.compile")

    # timing: forward + backward, B 4096, K 65536, D 128, bf16
    S, T, Q = inputs(4096, 65536, 128, bf, bf, 2)
    for backend in timing_backends(S, Q):
        Sg = S.clone().requires_grad_()

        def step():
            rrd_kernels.rrd_loss(Sg, T, Q, tau_s=0.04, tau_t=0.1, backend=backend).backward()

        first, mean = time_steps(step)  # the first call includes the Triton JIT for this configuration
        print(f"time {backend}: {mean * 1e3:.2f} ms per forward+backward (B 4096, K 65536, D 128, bf16); first call "
              f"{first:.2f} s")

    time_gathered()
    print("FAILED:" if failures else "ALL PASSED", *failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""One small rrd_loss forward + backward per backend, for compute-sanitizer (bench/gpu_run.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/gpu_small_case.py cuda triton

Sizes are tiny and odd on purpose (B 70, K 130, D 40: partial row blocks, a partial last bank tile, D not
a multiple of the feature chunk) and the student has a padded row stride, so out-of-bounds accesses of the
masking code have somewhere to land; PyTorch's caching allocator is to be turned off by the caller
(PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that every tensor is its own allocation to the sanitizer. Per backend:
fp32 embeddings ("highest") with CE, bf16 embeddings with an fp32 bank with KL. Prints one line per case with the
loss, exits 1 when a backend cannot run (with the reason) or a result is not finite.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CASES = [  # embeddings, bank, objective: the fp32 FMA path and a 16-bit mma path with a converted bank (each
    (torch.float32, torch.float32, "ce"),  # distinct case is a set of Triton compilations, so only two)
    (torch.bfloat16, torch.float32, "kl"),
]


def run(backend: str, B: int = 70, K: int = 130, D: int = 40, device: str = "cuda") -> bool:
    import rrd_kernels
    from rrd_kernels.backends import unusable_reason

    torch.set_float32_matmul_precision("highest")
    ok = True
    gen = torch.Generator().manual_seed(0)
    for dtype, bank_dtype, objective in CASES:
        reason = unusable_reason(backend, torch.device(device), dtype, bank_dtype, B, K, D)
        if reason is not None:
            print(f"{backend}: cannot run {dtype}: {reason}", flush=True)
            return False
        padded = torch.randn(B, D + 3, generator=gen).to(device, dtype)
        student = padded[:, :D].requires_grad_()  # row stride D + 3
        teacher = torch.randn(B, D, generator=gen).to(device, dtype)
        bank = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device, bank_dtype)
        loss = rrd_kernels.rrd_loss(student, teacher, bank, tau_s=0.1, tau_t=0.02, objective=objective,
                                    backend=backend)
        (grad,) = torch.autograd.grad(loss, student)
        if device == "cuda":
            torch.cuda.synchronize()
        finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(grad).all().item())
        ok &= finite
        print(f"{backend} {dtype} bank {bank_dtype} {objective}: loss {loss.item():.6f}, |grad| "
              f"{grad.float().norm().item():.4e}{'' if finite else '  NOT FINITE'}", flush=True)
    return ok


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    backends = argv or ["cuda", "triton"]
    results = {b: run(b) for b in backends}
    print("small case:", ", ".join(f"{b} {'ok' if r else 'FAILED'}" for b, r in results.items()), flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

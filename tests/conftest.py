"""Shared test setup. Without a CUDA device the Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; where the exact answer is 0 (K = 1) the absolute ||out||."""
    out, ref = out.detach().double(), ref.detach().double()
    ref_norm = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / ref_norm if ref_norm > 0 else diff


@pytest.fixture
def gen(request):
    """A fresh random generator per test. Its seed is printed (pytest shows it with a failure's output);
    RRD_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("RRD_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} (replay: RRD_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def make_inputs(B, K, D, gen, dtype=torch.float32, bank_dtype=None, device="cpu"):
    """Raw embeddings with row norms spread over 1e-2..1e2 (the kernels normalise), a bank of unit rows."""
    scale_s = 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    scale_t = 10 ** (torch.rand(B, 1, generator=gen) * 4 - 2)
    student = torch.randn(B, D, generator=gen) * scale_s
    teacher = torch.randn(B, D, generator=gen) * scale_t
    bank = torch.nn.functional.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    return (
        student.to(device=device, dtype=dtype),
        teacher.to(device=device, dtype=dtype),
        bank.to(device=device, dtype=bank_dtype or dtype),
    )


def have_triton() -> bool:
    try:
        import rrd_kernels.triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def quick_subset(cases, quick, ids=str, unpack=True):
    """Parameters for pytest.mark.parametrize: every case, those not in `quick` marked slow, so that
    `pytest -m "not slow"` still runs at least one case of each kernel path (the quick subset). A case is
    a tuple of the parametrized arguments (unpack=False: the tuple is the one argument)."""
    missing = [c for c in quick if c not in cases]
    assert not missing, f"quick cases not in the grid: {missing}"
    return [pytest.param(*(c if unpack else (c,)), id=ids(c), marks=() if c in quick else pytest.mark.slow)
            for c in cases]

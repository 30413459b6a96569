"""rrd_loss: objectives, reductions, gradient routing, dtypes, backend choice, errors, torch.compile, opcheck."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import have_triton, make_inputs, rel_err
from rrd_kernels import rrd_loss, rrd_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = ["triton"] if have_triton() else []
BACKENDS = ["torch"] + KERNEL_BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(gen, backend, objective, reduction):
    s, t, q = make_inputs(19, 300, 40, gen, device=DEVICE)
    student = s.clone().requires_grad_()
    loss = rrd_loss(student, t, q, tau_s=0.04, tau_t=0.1, objective=objective, reduction=reduction, backend=backend)
    upstream = torch.rand(loss.shape, generator=gen).to(DEVICE)
    (loss * upstream).sum().backward()

    s64 = s.double().requires_grad_()
    ref = rrd_reference(s64, t.double(), q.double(), 0.04, 0.1, objective, reduction)
    (ref * upstream.double()).sum().backward()
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(student.grad, s64.grad) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reaches_student_only(gen, backend):
    s, t, q = make_inputs(6, 50, 16, gen, device=DEVICE)
    s, t, q = (x.clone().requires_grad_() for x in (s, t, q))
    rrd_loss(s, t, q, tau_s=0.1, tau_t=0.02, backend=backend).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and q.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_detached_student(gen, backend):
    s, t, q = make_inputs(4, 30, 16, gen, device=DEVICE)
    with torch.no_grad():
        a = rrd_loss(s, t, q, tau_s=0.1, tau_t=0.02, backend=backend)
    b = rrd_loss(s, t, q, tau_s=0.1, tau_t=0.02, backend=backend)
    assert not a.requires_grad and not b.requires_grad
    assert rel_err(a, b) == 0.0


def test_loss_dtype_follows_inputs(gen):
    s, t, q = make_inputs(3, 10, 8, gen, dtype=torch.float64)
    assert rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1).dtype == torch.float64
    s16, t16, q16 = s.bfloat16(), t.bfloat16(), q.bfloat16()
    assert rrd_loss(s16, t16, q16, tau_s=0.1, tau_t=0.1, backend="torch").dtype == torch.float32


def test_auto_uses_the_reference_on_cpu_and_for_float64(gen):
    from rrd_kernels.backends import resolve_backend

    s, t, q = make_inputs(3, 10, 8, gen)
    assert resolve_backend("auto", s, t, q) == "torch"
    s64, t64, q64 = s.double(), t.double(), q.double()
    assert resolve_backend("auto", s64, t64, q64) == "torch"


@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_triton_refuses_what_it_cannot_run(gen):
    s, t, q = make_inputs(3, 10, 8, gen, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="triton.*float64"):
        rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1, backend="triton")
    s, t, q = make_inputs(3, 10, 513, gen, device=DEVICE)
    with pytest.raises(RuntimeError, match="D <= 512"):
        rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1, backend="triton")


def _run(code: str, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
@pytest.mark.slow  # a fresh interpreter importing torch
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    out = _run(
        "import torch, rrd_kernels\n"
        "s = torch.randn(2, 8); q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)\n"
        "try:\n"
        "    rrd_kernels.rrd_loss(s, s, q, tau_s=0.1, tau_t=0.1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "CUDA tensors" in out.stdout


@pytest.mark.slow  # a fresh interpreter importing torch
def test_import_and_torch_backend_without_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if not installed: import fails, importlib.util.find_spec gives None\n"
        "import torch, rrd_kernels\n"
        "assert 'triton' not in rrd_kernels.available_backends(), rrd_kernels.available_backends()\n"
        "s = torch.randn(3, 8, requires_grad=True); q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)\n"
        "rrd_kernels.rrd_loss(s, torch.randn(3, 8), q, tau_s=0.1, tau_t=0.1).backward()\n"
        "m = rrd_kernels.RRDLoss(4, 6, feat_dim=8, bank_size=16); m(torch.randn(3, 4), torch.randn(3, 6)).backward()\n"
        "try:\n"
        "    rrd_kernels.rrd_loss(s, s, q, tau_s=0.1, tau_t=0.1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
        "print('ok', sys.modules['triton'] is None)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "could not be imported" in out.stdout
    assert "ok True" in out.stdout


# ---- bad input: a clear error naming the argument ------------------------------------------------------

def _valid():
    g = torch.Generator().manual_seed(0)
    return make_inputs(4, 9, 8, g)


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (lambda s, t, q: (s[0], t, q), ValueError, "student must be 2-D"),
        (lambda s, t, q: (s, t[:, :5], q), ValueError, "teacher must have the shape of student"),
        (lambda s, t, q: (s, t[:3], q), ValueError, "teacher must have the shape"),
        (lambda s, t, q: (s, t, q[:, :5]), ValueError, "bank must have D = 8"),
        (lambda s, t, q: (s, t, q[0]), ValueError, "bank must be 2-D"),
        (lambda s, t, q: (s, t, q[:0]), ValueError, "bank is empty"),
        (lambda s, t, q: (s[:0], t[:0], q), ValueError, "empty batch"),
        (lambda s, t, q: (s, t.double(), q), TypeError, "teacher dtype"),
        (lambda s, t, q: (s.int(), t.int(), q), TypeError, "student must be a floating"),
        (lambda s, t, q: (s, t, q.int()), TypeError, "bank must be a floating"),
        (lambda s, t, q: (s.numpy(), t, q), TypeError, "student must be a torch.Tensor"),
        (lambda s, t, q: (s, t, q.to("meta")), ValueError, "bank is on meta"),
    ],
)
def test_bad_tensors(change, error, pattern):
    s, t, q = change(*_valid())
    with pytest.raises(error, match=pattern):
        rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(tau_s=0.0), ValueError, "tau_s must be a finite number > 0"),
        (dict(tau_t=-1.0), ValueError, "tau_t must be a finite number > 0"),
        (dict(tau_s=float("nan")), ValueError, "tau_s"),
        (dict(tau_t=float("inf")), ValueError, "tau_t"),
        (dict(tau_s=torch.tensor(0.1)), TypeError, "tau_s must be a Python float"),
        (dict(objective="mse"), ValueError, "objective must be one of"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(backend="jax"), ValueError, "backend must be one of"),
    ],
)
def test_bad_options(kwargs, error, pattern):
    s, t, q = _valid()
    args = dict(tau_s=0.1, tau_t=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        rrd_loss(s, t, q, **args)


# ---- torch.library: opcheck and torch.compile ------------------------------------------------------------

@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_opcheck(gen):
    from rrd_kernels import ops

    s, t, q = make_inputs(5, 70, 24, gen, device=DEVICE)
    s.requires_grad_()
    torch.library.opcheck(ops.rrd_forward, (s, t, q, 0.1, 0.02, False, "triton"))
    rows, lse_s, lse_t, ref = ops.rrd_forward(s.detach(), t, q, 0.1, 0.02, False, "triton")
    w = torch.rand(5, generator=gen).to(DEVICE)
    torch.library.opcheck(ops.rrd_backward, (w, s.detach(), t, q, lse_s, lse_t, ref, 0.1, 0.02, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
# inductor compiles C++ on the CPU (15-40 s a case on 2 cores); aot_eager traces the same ops quickly.
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(gen, backend, compiler):
    s, t, q = make_inputs(7, 90, 24, gen, device=DEVICE)
    torch._dynamo.reset()

    def step(student, teacher, bank):
        return rrd_loss(student, teacher, bank, tau_s=0.04, tau_t=0.1, backend=backend) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    loss_c = compiled(a, t, q)
    loss_e = step(b, t, q)
    loss_c.backward()
    loss_e.backward()
    assert rel_err(loss_c, loss_e) <= 1e-6
    assert rel_err(a.grad, b.grad) <= 1e-5

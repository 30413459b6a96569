"""available_backends() / backend_status(): what can run on this machine, and why the others cannot."""
import os
import subprocess
import sys

import pytest
import torch

import rrd_kernels
from conftest import have_triton, make_inputs
from rrd_kernels import rrd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_status_names_every_backend_and_lists_exactly_the_usable_ones():
    status = rrd_kernels.backend_status()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), (name, reason)
    assert rrd_kernels.available_backends() == [n for n, r in status.items() if r is None]


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_a_listed_backend_runs_and_an_unlisted_one_refuses(gen, name):
    """The status is a promise about real calls: listed -> a small call gives the loss and a gradient;
    not listed -> backend=name raises, and the error carries the same reason."""
    s, t, q = make_inputs(3, 20, 16, gen, device=DEVICE)
    s.requires_grad_()
    reason = rrd_kernels.backend_status()[name]
    if reason is None:
        loss = rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1, backend=name)
        loss.backward()
        assert torch.isfinite(loss) and s.grad is not None
    else:
        with pytest.raises(RuntimeError, match="cannot run"):
            rrd_loss(s, t, q, tau_s=0.1, tau_t=0.1, backend=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cpu_only_machine_lists_no_cuda_and_says_why():
    status = rrd_kernels.backend_status()
    assert "cuda" not in rrd_kernels.available_backends()
    assert "no CUDA device" in status["cuda"]
    # tests/conftest.py switches the interpreter on: there triton runs on CPU tensors.
    if have_triton() and os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in rrd_kernels.available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
@pytest.mark.slow  # a fresh interpreter importing torch
def test_cpu_only_machine_without_interpreter_lists_torch_only():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import rrd_kernels as r; print(r.available_backends()); print(r.backend_status()['triton'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    listed, triton_reason = out.stdout.splitlines()[-2:]
    assert listed == "['torch']"
    assert "no CUDA device" in triton_reason and "TRITON_INTERPRET=1" in triton_reason


@pytest.mark.slow  # a fresh interpreter importing torch and compiling
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
def test_import_does_not_load_dynamo_and_compile_still_sees_the_choice_as_constant():
    """`import rrd_kernels` leaves torch._dynamo unloaded (it would double the import time), yet a later
    torch.compile(fullgraph=True) still treats the backend choice as a constant: with backend="triton" the
    choice imports modules and queries the device, which dynamo cannot trace (without the mark this fails)."""
    code = (
        "import sys, torch, rrd_kernels\n"
        "print('torch._dynamo' in sys.modules)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s, t, bank = (torch.randn(n, 16, generator=g) for n in (4, 4, 50))\n"
        "step = lambda s, t, bank: rrd_kernels.rrd_loss(s, t, bank, tau_s=0.1, tau_t=0.04, backend='triton')\n"
        "compiled = torch.compile(step, fullgraph=True, backend='aot_eager')\n"
        "print(torch.equal(compiled(s, t, bank), step(s, t, bank)))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]

    def probe():
        return 0

    # the mark rrd_kernels sets by hand is the one torch's decorator sets
    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) == {"_dynamo_marked_constant": True}

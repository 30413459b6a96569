"""A Triton driver that stands in for an NVIDIA GPU on a machine without one.

Triton's compiler needs no GPU: only the runtime does (loading the binary, launching). With this driver active,
a kernel launch from the real launch path (our launchers, real argument specialisation, real options) compiles
the kernel for the chosen architecture with the real front end, LLVM and ptxas, checks its shared memory
against the architecture's per-block limit exactly as Triton does before a launch, and then does nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as _driver


@dataclass(frozen=True)
class Arch:
    """What a launch needs to know about a GPU: compute capability and the limits Triton checks."""
    name: str
    capability: int
    max_shared_mem: int  # bytes per block with opt-in (what Triton compares a kernel's shared memory with)
    multiprocessor_count: int
    max_num_regs: int = 65536


# Per-block shared memory with opt-in, as the devices report it (cudaDevAttrMaxSharedMemoryPerBlockOptin).
ARCHS = {
    "sm_80": Arch("sm_80", 80, 166912, 108),  # A100
    "sm_86": Arch("sm_86", 86, 101376, 84),  # RTX 30xx, A10, A40 (sm_89 RTX 40xx / L4 has the same limit)
    "sm_90": Arch("sm_90", 90, 232448, 132),  # H100 / H200
    "sm_100": Arch("sm_100", 100, 232448, 148),  # B200 (227 KiB per block, as sm_90)
    # RTX 50xx (consumer Blackwell: 99 KiB per block, as sm_86); the SM count is the RTX 5090's, which only
    # sets the split count of a plan, never which kernels compile
    "sm_120": Arch("sm_120", 120, 101376, 170),
}


class _Utils:
    def __init__(self, arch: Arch):
        self.arch = arch

    def get_device_properties(self, device):
        a = self.arch
        return {
            "max_shared_mem": a.max_shared_mem,
            "multiprocessor_count": a.multiprocessor_count,
            "max_num_regs": a.max_num_regs,
            "warpSize": 32,
            "sm_clock_rate": 0,
            "mem_clock_rate": 0,
            "mem_bus_width": 0,
        }

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded; resources are read off the
        # cubin by the compile gate instead.
        return None, None, 0, 0, 1024


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class StandInDriver(DriverBase):
    def __init__(self, arch: Arch, launcher_cls=None):
        super().__init__()
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = launcher_cls or _NoLaunch

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self):
        return GPUTarget("cuda", self.arch.capability, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        raise NotImplementedError("no device behind the stand-in driver")

    def get_benchmarker(self):
        raise NotImplementedError("no device behind the stand-in driver")


@contextlib.contextmanager
def stand_in(arch: Arch, launcher_cls=None):
    """Make a StandInDriver for `arch` Triton's active driver for the duration of the block. launcher_cls
    (called as Triton calls a launcher: grid, stream, function, metadata, hooks, kernel arguments) replaces
    the launch that does nothing, e.g. to record launches (tools/cost_model.py)."""
    from triton.compiler import compiler

    previous = _driver._active
    _driver.set_active(StandInDriver(arch, launcher_cls))
    # Triton caches the device's shared-memory limit per device index for the process: another arch's
    # limit would be checked at launch.
    compiler.max_shared_mem.cache_clear()
    try:
        yield
    finally:
        _driver._active = previous
        compiler.max_shared_mem.cache_clear()

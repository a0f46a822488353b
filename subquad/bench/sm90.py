"""Compiling the library's Triton kernels for the H100 (sm90) on a machine without a GPU.

A stand-in driver names the target; every ``kernel[grid](...)`` is recorded instead of run; ``JITFunction.warmup``
on a recorded launch then runs Triton's real code generation down to a cubin (ptxas included). Used by
``tests/test_sm90_compile.py`` (every kernel variant compiles and fits in shared memory) and by
``benchmarks/kernel_report.py`` (registers, spills, tensor-core instructions of one launch).
"""

from __future__ import annotations

SHARED = 232448
"""Hopper's shared memory per block (227 KB)."""


class Sm90Driver:
    """A stand-in for Triton's CUDA driver: just enough for ``warmup`` to pick the target and compile
    (``triton.runtime.driver.set_active(Sm90Driver())``)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def record_launches() -> list:
    """Every ``kernel[grid](...)`` from now on, in this process, is recorded as ``(kernel, args, kwargs)``
    instead of run."""
    from triton.runtime.jit import KernelInterface

    recorded = []
    KernelInterface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: recorded.append((self, args, kwargs)))
    return recorded

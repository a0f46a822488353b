"""Compiling the library's Triton kernels for the H100 (sm90) on a machine without a GPU.

A stand-in driver names the target; every ``kernel[grid](...)`` is recorded instead of run; ``JITFunction.warmup``
on a recorded launch then runs Triton's real code generation down to a cubin (ptxas included). Used by
``tests/test_sm90_compile.py`` (every kernel variant compiles and fits in shared memory), by
``benchmarks/kernel_report.py`` (registers, spills, tensor-core instructions of one launch) and by
``benchmarks/chained_dots_report.py`` (which configurations compute a chained dot once per warpgroup).
"""

from __future__ import annotations

SHARED = 232448
"""Hopper's shared memory per block (227 KB)."""


class Sm90Driver:
    """A stand-in for Triton's CUDA driver: just enough for ``warmup`` to pick the target and compile
    (``triton.runtime.driver.set_active(Sm90Driver())``)."""

    #: launches through it are recorded, not run: CPU tensors may stand for the device's
    records_launches = True

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


def recorded_variants(run, pruned=False):
    """Make the sm90 driver active, run ``run()`` with its launches recorded, and yield each distinct kernel
    variant once (its constexpr and integer arguments and its tensors' dtypes) as ``(jit_fn, args, kwargs,
    configs)``: an autotuned kernel's configurations as keyword dicts, ``[{}]`` for a plain one; ``pruned``:
    those its autotuner's early prune keeps for this launch, with what the prune sets."""
    import torch
    import triton
    from triton.runtime import driver

    recorded = record_launches()
    # (active while the launches are recorded too: the library asks whether Triton has a driver to launch through)
    driver.set_active(Sm90Driver())
    run()
    seen = set()
    for kernel, args, kwargs in recorded:
        configs = [{}]
        if isinstance(kernel, triton.runtime.Autotuner):
            tuned = kernel.configs
            if pruned and kernel.early_config_prune:
                tuned = kernel.early_config_prune(tuned, dict(zip(kernel.arg_names, args)), **kwargs)
            configs = [c.all_kwargs() for c in tuned]
            kernel = kernel.fn
        # (a split grid's launches differ in pid_offset alone, which no kernel specialises on: one compile)
        variant = (kernel.fn.__name__, tuple(sorted((k, v) for k, v in kwargs.items()
                                                    if isinstance(v, (bool, int, str)) and k != "pid_offset")),
                   tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
        if variant not in seen:
            seen.add(variant)
            yield kernel, args, kwargs, configs

"""Per-kernel device time of a callable on CUDA (torch.profiler), for the device-side profiling scripts."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelTime(NamedTuple):
    us: float           # device microseconds per call
    launches: float     # launches per call


def kernel_times(step, calls: int) -> dict[str, KernelTime]:
    """Each kernel's device time and launches per call of ``step`` over ``calls`` calls after one warm-up call
    (autotuning, compilation), costliest first. Only the kernels count, not the host ops that launch them."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    us: dict[str, float] = {}
    launches: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us[e.name] = us.get(e.name, 0.0) + e.device_time
            launches[e.name] = launches.get(e.name, 0) + 1
    return {name: KernelTime(us[name] / calls, launches[name] / calls) for name in sorted(us, key=lambda n: -us[n])}

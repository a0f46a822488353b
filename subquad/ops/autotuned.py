"""Autotuned Triton kernels launched without the autotuner's per-call Python.

``triton.autotune``'s ``run`` rebuilds a dict of every argument, scans them for dtypes and looks its key up on
every launch: ~110 us of host time for the flash forward's 76 arguments on the CI machine (Triton 3.9, kernel
launch stubbed), more than the launch itself. A call of ~0.3 ms of GPU time with three launches is then
host-bound. ``Autotuned`` asks the autotuner once per key (it tunes, runs and records its choice) and from
then on calls the kernel directly with the recorded configuration, as the autotuner itself does.
"""

from __future__ import annotations


class Autotuned:
    """``Autotuned(triton.autotune(...)(jit_fn))[grid](*args, **meta)``: the autotuner's key is read from
    ``meta`` (every key name must be a keyword argument of the launch) plus the first argument's dtype."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.kernel = tuner.fn
        self.keys = tuple(tuner.keys)
        self.chosen: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self.run(grid, args, meta)

    def run(self, grid, args, meta):
        key = (args[0].dtype, *[meta[name] for name in self.keys])
        config = self.chosen.get(key)
        if config is None:
            out = self.tuner[grid](*args, **meta)
            best = getattr(self.tuner, "best_config", None)
            if best is not None and best.pre_hook is None:
                self.chosen[key] = best.all_kwargs()
            return out
        return self.kernel[grid](*args, **meta, **config)

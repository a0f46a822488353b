"""Host-side launch arithmetic for the kernels' grids and block sizes.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton, callable from
kernels too, at ~5 us a call on the host (Triton 3.9 on the CI machine; a launcher makes up to ten of them
per call); the launchers use these plain ones.
"""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for ``n <= 0``, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter: small grids still split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4

"""Host-side launch arithmetic for the kernels' grids and block sizes.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton, callable from
kernels too, at ~5 us a call on the host (Triton 3.9 on the CI machine; a launcher makes up to ten of them
per call); the launchers use these plain ones.
"""

from __future__ import annotations

import functools
import os

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


MAX_GRID_YZ = 65535
"""CUDA's limit on a grid's axes 1 and 2 (axis 0 takes 2^31 - 1): a launch past it fails ("invalid argument")."""


def launch_split(kernel, grid, count: int, *args, unit: int = 1, flag: str | None = None, **kwargs) -> None:
    """``kernel[grid(count)](*args, **kwargs)`` for a grid of ``count`` programs on axis 1 or 2, in launches of
    at most ``MAX_GRID_YZ`` programs along it, each passing the kernel the programs before it, in ``unit``s, as
    ``pid_offset``. Up to the limit it is that one launch with offset 0: the programs that share the GPU, and
    their L2 reuse, are as they were. ``grid(n)``: the grid with ``n`` programs on that axis, a tuple or a
    function of the meta-parameters as Triton takes it. ``unit``: programs that a launch keeps together (a
    sequence's heads: the kernels take the head from the program id alone, and the sequence plus the offset).
    ``flag``: a constexpr of the kernel, passed True to the launches of a split grid and False to the one
    launch below the limit, for a kernel that reads ``pid_offset`` only under it: its ordinary variant then
    compiles exactly as it did without the offset (added in every variant, the offset moved the registers of the
    flash backward and of the decode kernel), and a split grid compiles one variant more.

    The launches run one after another on the stream: a kernel split this way must not have a program wait
    for another on that axis. None of the kernels launched so does: the linear and delta kernels share nothing,
    the flash backward's programs only add into sums (atomics), and the decode kernel's last split to reach a
    tile's arrival counter merges the tile, waiting for none (and a tile's splits share its axis-2 program)."""
    # read at each call, so that tests can lower the limit and have small shapes split
    step = max(MAX_GRID_YZ // unit, 1) * unit
    if flag is not None:
        kwargs[flag] = count > step
    # count 0 keeps its one (empty) launch, as before
    for start in range(0, max(count, 1), step):
        kernel[grid(min(step, count - start))](*args, pid_offset=start // unit, **kwargs)


def interpreting() -> bool:
    """Whether Triton runs the kernels in its interpreter: ``TRITON_INTERPRET`` taken as Triton takes it (1, true,
    on, yes, y, in any case; "true" had been taken for off here while Triton interpreted). Read from ``os.environ``,
    which ``torch.compile`` traces; Triton's own reader is a C function it cannot trace."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


# traced (a compiled step), dynamo cannot follow Triton's driver lookup: it would fail there instead of at the
# caller's ValueError
@torch.compiler.assume_constant_result
def triton_takes_cpu_tensors() -> bool:
    """Whether a Triton launch here takes CPU tensors: under the interpreter (``TRITON_INTERPRET=1``), or through a
    stand-in driver that records launches to compile them (``subquad.bench.sm90.Sm90Driver``). A GPU's driver takes
    CUDA tensors only: a CPU tensor failed there with Triton's "Pointer argument (at 0) cannot be accessed from
    Triton", and with no driver at all with "0 active drivers", neither naming an argument."""
    if interpreting():
        return True
    import triton

    try:
        return bool(getattr(triton.runtime.driver.active, "records_launches", False))
    except RuntimeError:        # "0 active drivers": no GPU here
        return False


def check_triton_device(q: torch.Tensor, hint: str = "") -> None:
    """A ``ValueError`` naming ``backend`` where Triton cannot take ``q``'s device (Triton's own errors name no
    argument); ``hint`` ends the message."""
    if not q.is_cuda and not triton_takes_cpu_tensors():
        raise ValueError(f"backend: 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), got device "
                         f"{q.device}{hint}")

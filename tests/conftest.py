"""Fixtures shared by the kernel tests."""

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs a worker a core) each worker's torch takes its share of the cores:
    its default, every core in every worker, oversubscribes them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


def set_forward_form(monkeypatch, form: str, segment_chunks: int = 1) -> str:
    """Forces the chunked engine's forward form whatever the shape would pick: ``fused`` (one kernel, state in
    registers), ``two-pass`` (states stored per chunk), or ``split`` / ``split-two-pass`` (sequences cut into
    segments of ``segment_chunks`` chunks, each segment's own state first, then the fused or two-pass walk over
    the segments; one chunk a segment by default, so that the small test shapes, two or three chunks long, are
    cut: at two a segment they were not, and those cases ran the fused or two-pass form again)."""
    from subquad.ops.linear import chunk, chunk_split

    least = 0 if form in ("fused", "split") else 1 << 30
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS", least)
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS_DELTA", least)
    if form.startswith("split"):
        monkeypatch.setattr(chunk_split, "SPLIT_BELOW_PROGRAMS", 1 << 30)
        monkeypatch.setattr(chunk_split, "SPLIT_TARGET_PROGRAMS", 1 << 30)
        monkeypatch.setattr(chunk_split, "SPLIT_MIN_CHUNKS", segment_chunks)
    return form


def _splits_seen(monkeypatch) -> list:
    """The results of every ``segment_split`` the engines call from now on (None: no split)."""
    from subquad.ops.delta import chunk as delta_chunk
    from subquad.ops.linear import chunk, chunk_split

    seen = []

    def spy(*args, **kwargs):
        seen.append(chunk_split.segment_split(*args, **kwargs))
        return seen[-1]

    for module in (chunk, delta_chunk):
        monkeypatch.setattr(module, "segment_split", spy)
    return seen


def _forward_form(request, monkeypatch):
    form = set_forward_form(monkeypatch, request.param)
    seen = _splits_seen(monkeypatch)
    yield form
    if form.startswith("split") and seen:
        assert any(s is not None for s in seen), f"the {form} form ran, but no sequence was split"


@pytest.fixture(params=["fused", "two-pass", "split"])
def forward_form(request, monkeypatch):
    yield from _forward_form(request, monkeypatch)


@pytest.fixture(params=["fused", "two-pass", "split", "split-two-pass"])
def delta_forward_form(request, monkeypatch):
    """The delta rule's forms: its split composes segments through matrices, not decays, so the two-pass walk
    over segments is checked here too."""
    yield from _forward_form(request, monkeypatch)


def small_grid_limit(monkeypatch, limit: int = 3) -> list:
    """Lowers CUDA's 65,535-program limit on grid axes 1 and 2 (``subquad.ops.grid.MAX_GRID_YZ``) to ``limit``, so
    that the tests' small shapes take the launchers' split path, and records each split launch as ``(kernel name,
    programs on the split axis, [programs of each launch])`` (the delta rule's transition pass as
    ``state_fwd[transition]``): the linear and delta engines', the flash kernels', the LSE merge's and the
    decode kernel's. Each launch's grid is checked against the limit (the interpreter itself runs grids of any
    size)."""
    import collections

    from subquad.ops import grid
    from subquad.ops.decode import splitkv
    from subquad.ops.linear import chunk, recurrent
    from subquad.ops.softmax import lse_merge
    from subquad.ops.softmax.flash import launch

    MAX_GRID_YZ = grid.MAX_GRID_YZ
    monkeypatch.setattr(grid, "MAX_GRID_YZ", limit)
    seen = []

    def spy(kernel, make_grid, count, *args, **kwargs):
        pieces = []

        def piece(n):
            pieces.append(n)
            launched = make_grid(n)
            # (the tile meta-parameters matter only to axis 0 or to a value-tile count of 1 here)
            meta = collections.defaultdict(lambda: 16, BV=32, BK=64)
            axes = launched(meta) if callable(launched) else launched
            # the split axis holds this launch's share; the other of axes 1 and 2 (the splits of the flash
            # backward's and the decode kernel's key walks, more on a GPU's SMs than the interpreter's 4) only CUDA's
            assert n <= limit and n in axes[1:] and all(a <= MAX_GRID_YZ for a in axes[1:]), (axes, n, limit)
            return launched

        grid.launch_split(kernel, piece, count, *args, **kwargs)
        name = kernel_name(kernel)
        seen.append((name + ("[transition]" if kwargs.get("TRANSITION") else ""), count, pieces))

    for module in (chunk, recurrent, launch, lse_merge, splitkv):
        monkeypatch.setattr(module, "launch_split", spy)
    return seen


def kernel_name(kernel) -> str:
    """The name of a launched kernel: a JIT function, Triton's autotuner over one, or subquad's ``Autotuned``."""
    from subquad.ops.autotuned import Autotuned

    # ``Autotuned`` holds its JIT function as ``kernel``; a JIT function has a ``kernel`` attribute too, None
    # outside the interpreter (Triton's compiled-kernel slot), so the wrapper is asked for by type
    return (kernel.kernel if isinstance(kernel, Autotuned) else kernel).fn.__name__


def split_kernels(launches) -> set:
    """The kernels of ``small_grid_limit``'s record that took more than one launch (their pieces summing to the
    axis's programs)."""
    assert all(sum(pieces) == count for _, count, pieces in launches), launches
    return {name for name, _, pieces in launches if len(pieces) > 1}

"""The launchers' host-side grid arithmetic equals Triton's (which costs ~5 us a call on the host)."""

from __future__ import annotations

import pytest

from subquad.ops.grid import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_grid_arithmetic_matches_triton():
    for n in range(0, 5000, 7):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for block in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, block) == triton.cdiv(n, block), (n, block)
    assert next_power_of_2(1 << 20) == 1 << 20 and next_power_of_2((1 << 20) + 1) == 1 << 21


class _Kernel:
    """Records each ``kernel[grid](*args, **kwargs)``: the grid and the program offset (and the keywords)."""

    def __init__(self):
        self.launches = []
        self.kwargs = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs["pid_offset"], args))
            self.kwargs.append(kwargs)
        return launch


def test_launch_split_keeps_one_launch_up_to_the_limit():
    """Up to CUDA's 65,535 programs on axes 1 and 2 a launch is the one it was (offset 0, the same grid, a
    function of the meta-parameters passed through); past it, launches of at most 65,535 with their offsets."""
    from subquad.ops import grid

    assert grid.MAX_GRID_YZ == 65535
    meta_grid = lambda n: lambda meta: (meta["BV"], 2, n)  # noqa: E731
    for count, pieces in ((0, [(0, 0)]), (1, [(1, 0)]), (65535, [(65535, 0)]), (65536, [(65535, 0), (1, 65535)]),
                          (3 * 65535 + 7, [(65535, 0), (65535, 65535), (65535, 131070), (7, 196605)])):
        kernel = _Kernel()
        grid.launch_split(kernel, lambda n: (4, n), count, "a", "b", H=2)
        assert [(g, off) for g, off, _ in kernel.launches] == [((4, n), off) for n, off in pieces]
        assert all(args == ("a", "b") for _, _, args in kernel.launches)
        kernel = _Kernel()
        grid.launch_split(kernel, meta_grid, count)
        assert [(g({"BV": 5}), off) for g, off, _ in kernel.launches] == [((5, 2, n), off) for n, off in pieces]



def test_launch_split_keeps_a_unit_in_one_launch():
    """``unit`` programs (a sequence's heads) stay in one launch, and the offset counts units: 65,535 // 16 x 16 =
    65,520 programs a launch at 16 heads."""
    from subquad.ops import grid

    for count, pieces in ((16, [(16, 0)]), (65520, [(65520, 0)]), (65536, [(65520, 0), (16, 4095)]),
                          (2 * 65520 + 32, [(65520, 0), (65520, 4095), (32, 8190)])):
        kernel = _Kernel()
        grid.launch_split(kernel, lambda n: (1, n), count, unit=16)
        assert [(g, off) for g, off, _ in kernel.launches] == [((1, n), off) for n, off in pieces]


def test_launch_split_flags_the_launches_of_a_split_grid():
    """``flag``: a constexpr that the launches of a split grid get True, the one launch below the limit False (the
    softmax and decode kernels add the offset under it only, so that their ordinary variants compile as before)."""
    from subquad.ops import grid

    for count, flags in ((0, [False]), (65535, [False]), (65536, [True, True]), (2 * 65535 + 1, [True] * 3)):
        kernel = _Kernel()
        grid.launch_split(kernel, lambda n: (1, n), count, "a", flag="SPLIT", H=2)
        assert [(kw["SPLIT"], kw["H"]) for kw in kernel.kwargs] == [(f, 2) for f in flags]
        assert all(set(kw) == {"pid_offset", "SPLIT", "H"} for kw in kernel.kwargs)


def test_the_spy_names_every_kind_of_launched_kernel():
    """``conftest.kernel_name`` on the three kinds of kernel the launchers pass: a JIT function outside the
    interpreter (as on a GPU, where its ``kernel`` attribute is None: the grid-limit tests' spy once read that
    and failed there), Triton's autotuner over one, and subquad's ``Autotuned``."""
    import triton
    from conftest import kernel_name
    from triton.runtime.jit import JITFunction

    from subquad.ops.autotuned import Autotuned

    def copy_rows(X):
        pass

    jit = JITFunction(copy_rows)
    assert jit.kernel is None
    tuner = triton.autotune(configs=[triton.Config({})], key=[])(jit)
    assert [kernel_name(k) for k in (jit, tuner, Autotuned(tuner))] == ["copy_rows"] * 3

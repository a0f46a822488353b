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

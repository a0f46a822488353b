"""Fixtures shared by the kernel tests."""

import pytest


@pytest.fixture(params=["fused", "two-pass"])
def forward_form(request, monkeypatch):
    """The chunked engine's forward in one kernel (state in registers) or in two passes (states stored per
    chunk), whatever the shape would pick."""
    from subquad.ops.linear import chunk

    least = 0 if request.param == "fused" else 1 << 30
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS", least)
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS_DELTA", least)
    return request.param

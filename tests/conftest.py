"""Fixtures shared by the kernel tests."""

import pytest


def set_forward_form(monkeypatch, form: str) -> str:
    """Forces the chunked engine's forward form whatever the shape would pick: ``fused`` (one kernel, state in
    registers), ``two-pass`` (states stored per chunk), or ``split`` / ``split-two-pass`` (sequences cut into
    segments of two chunks, each segment's own state first, then the fused or two-pass walk over the segments)."""
    from subquad.ops.linear import chunk, chunk_split

    least = 0 if form in ("fused", "split") else 1 << 30
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS", least)
    monkeypatch.setattr(chunk, "FUSED_MIN_PROGRAMS_DELTA", least)
    if form.startswith("split"):
        monkeypatch.setattr(chunk_split, "SPLIT_BELOW_PROGRAMS", 1 << 30)
        monkeypatch.setattr(chunk_split, "SPLIT_TARGET_PROGRAMS", 1 << 30)
        monkeypatch.setattr(chunk_split, "SPLIT_MIN_CHUNKS", 2)
    return form


@pytest.fixture(params=["fused", "two-pass", "split"])
def forward_form(request, monkeypatch):
    return set_forward_form(monkeypatch, request.param)


@pytest.fixture(params=["fused", "two-pass", "split", "split-two-pass"])
def delta_forward_form(request, monkeypatch):
    """The delta rule's forms: its split composes segments through matrices, not decays, so the two-pass walk
    over segments is checked here too."""
    return set_forward_form(monkeypatch, request.param)

"""Fixtures shared by the kernel tests."""

import pytest


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

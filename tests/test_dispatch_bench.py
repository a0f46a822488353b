"""The ``backends`` benchmark suite, on CPU: its peers' masks are the patterns they stand beside, and its rows
carry the signature fields that the dispatch table is built from."""

from __future__ import annotations

import pytest
import torch

from subquad import masks
from subquad.bench.suites import backends
from subquad.ops.softmax import dispatch

N = 4096


@pytest.mark.parametrize("name", [n for n, spec in backends.cases_spec(N).items() if spec[2] is not None])
def test_flex_mask_mod_is_the_pattern(name):
    pattern, causal, flex_mod, *_ = backends.cases_spec(N)[name]
    full = pattern & masks.causal if causal else pattern
    rows = torch.arange(0, N, 61)
    q = rows.view(1, 1, -1, 1)
    k = torch.arange(N).view(1, 1, 1, -1)
    got = flex_mod(N, "cpu")(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                             q, k)
    ctx = masks.BuildContext(1, 1, N, N, torch.device("cpu"))
    want = full.prepare(ctx).predicate(torch.zeros(1, 1, 1, 1, dtype=torch.long),
                                       torch.zeros(1, 1, 1, 1, dtype=torch.long), q, k)
    assert torch.equal(got.expand(1, 1, len(rows), N), want.expand(1, 1, len(rows), N))


def test_cases_carry_the_signature():
    cases = list(backends.make_cases(True))
    names = {c.case for c in cases}
    assert names == set(backends.cases_spec(N))
    kinds = {c.case: c.extra["pattern"] for c in cases}
    assert kinds["causal"] == "causal" and kinds["full"] == "full" and kinds["window4096"] == "window"
    assert kinds["document16"] == "document" and kinds["block_sparse0.25"] == "block_sparse"
    assert kinds["longformer512+16"] == "longformer" and kinds["strided256"] == "strided"
    for c in cases:
        assert {"subquad-auto", "subquad-triton", "subquad-fa4", "fa4"} <= set(c.impls)
        assert c.extra["capability"] == dispatch.capability(torch.device("cuda")) if torch.cuda.is_available() \
            else c.extra["capability"] == "cpu"
        assert ("cudnn" in c.impls) == (c.case in ("causal", "full"))


def test_document_lengths_are_uneven_and_cover_the_sequence():
    ids = backends._doc_ids(backends.N_PATTERN)
    lengths = torch.bincount(ids)
    assert ids.numel() == backends.N_PATTERN and lengths.numel() == 16 and bool((lengths >= 256).all())
    assert lengths.unique().numel() > 1

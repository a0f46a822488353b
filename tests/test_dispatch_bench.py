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
        assert ("cudnn" in c.impls) == ("subquad-cudnn" in c.impls) == (c.case in ("causal", "full"))
        assert ("flex" in c.impls) == ("subquad-flex" in c.impls) == (c.case not in ("causal", "full"))


def test_document_lengths_are_uneven_and_cover_the_sequence():
    ids = backends._doc_ids(backends.N_PATTERN)
    lengths = torch.bincount(ids)
    assert ids.numel() == backends.N_PATTERN and lengths.numel() == 16 and bool((lengths >= 256).all())
    assert lengths.unique().numel() > 1


def test_device_runner_measures_candidates_then_auto_with_the_new_table(tmp_path, monkeypatch):
    """The runner's plumbing on CPU with a tiny case: candidates first, the table built from them installed
    and re-read, then auto and the peers; JSON rewritten after each case."""
    from subquad import attention
    from subquad.bench.attention_cases import attention_case

    def tiny(quick, names=None):
        impls = {name: (lambda inputs: attention(inputs["q"], inputs["k"], inputs["v"], causal=True,
                                                 backend="reference"))
                 for name in ("subquad-triton", "subquad-fa4", "subquad-auto", "cudnn")}
        yield attention_case("causal", masks.causal, "fwd", batch=1, seqlen=64, heads_q=2, heads_kv=2, head_dim=16,
                             dtype=torch.float32, impls=impls, extra={"capability": "cpu", "pattern": "causal"})

    monkeypatch.setattr(backends, "make_cases", tiny)
    seen = []
    monkeypatch.setattr(dispatch, "table", type("T", (), {"cache_clear": staticmethod(lambda: seen.append(1))}))
    rows = backends.run(tmp_path, 1e9, device="cpu", table_path=tmp_path / "installed.json")
    assert [r["impl"] for r in rows] == ["subquad-triton", "subquad-fa4", "subquad-auto", "cudnn"]
    assert seen == [1]            # one case: one rebuild
    table = dispatch.Table.load(tmp_path / "installed.json")
    assert table.ranking(dispatch.Signature("cpu", "float32", 16, "causal", "fwd"))[1] == "exact"
    assert (tmp_path / "dispatch_table.json").read_text() == (tmp_path / "installed.json").read_text()
    assert len(__import__("json").loads((tmp_path / "backends.json").read_text())) == 4

"""``~pattern``, the complement of a pattern: its block bounds against the element mask, attention through the
reference and the Triton kernels against the fp64 oracle (rows left with no key included), and every consumer
that reads a pattern's structure (kernel terms, the planner, FA4's routes, flex's mask_mod, the dispatch kind)
treating it as what it is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import subquad
from oracles import softmax_attention
from subquad import masks
from subquad.masks.composition import Complement
from subquad.masks.patterns import INF, BuildContext
from subquad.masks.plan import plan
from subquad.ops.grid import interpreting
from subquad.ops.softmax import dispatch, fa4, flex
from subquad.ops.softmax.flash.masking import BAND_INF, kernel_terms, pure_band
from test_masks import SETTINGS, assert_agrees, blocks, packed_ids, sizes

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
N = 96
IDS = torch.tensor([0] * 30 + [1] * 41 + [2] * 25)


# ----------------------------------------------------------------------------------------------------------
# The pattern


def test_invert_makes_a_complement_and_twice_gives_the_pattern_back():
    window = masks.sliding_window(8)
    assert isinstance(~window, Complement) and (~window).inner is window
    assert ~~window is window
    assert repr(~window) == "~sliding_window(window=8, causal=True)"
    assert repr(~(window | masks.strided(4))) == "~(sliding_window(window=8, causal=True) | strided(stride=4, " \
                                                 "causal=True))"
    assert repr(masks.causal & ~window) == "causal & ~sliding_window(window=8, causal=True)"
    doc = masks.document(torch.stack([IDS, IDS]))
    assert (~doc).varies_with_batch and not (~doc).varies_with_heads
    per_head = masks.block_sparse(torch.ones(2, 3, 3, dtype=torch.bool), 32)
    assert (~per_head).varies_with_heads
    with pytest.raises(ValueError, match="seq_ids"):     # prepare prepares the inner pattern (checks its size)
        (~masks.document(IDS)).block_mask(50)
    dense = masks.sliding_window(8).to_dense(40, 50)
    assert torch.equal((~masks.sliding_window(8)).to_dense(40, 50), ~dense)


@SETTINGS
@given(sizes, blocks, blocks, st.integers(1, 12), st.integers(1, 6))
def test_block_bounds_of_complements_are_exact(seq, bq, bk, window, stride):
    seq_q, seq_kv = seq
    layout = torch.rand(-(-seq_kv // 5), -(-seq_kv // 5), generator=torch.Generator().manual_seed(seq_kv)) < 0.4
    for pattern in [
        ~masks.sliding_window(window),
        ~masks.sliding_window(window, causal=False),
        ~masks.causal,
        ~masks.full,
        ~masks.Band(-window, 2 * window),
        ~masks.block_sparse(layout, 5),
        ~masks.strided(stride),                                 # key columns
        ~masks.longformer(window, [0, seq_kv // 2]),            # key columns and query rows
        ~(masks.sliding_window(window) | masks.strided(stride)),
        ~(masks.sliding_window(window, causal=False) & masks.causal),
        masks.causal & ~masks.sliding_window(window),
        masks.prefix_lm(stride) & ~masks.sliding_window(window),
        ~masks.dilated(window + 2, stride) | masks.sliding_window(2),
    ]:
        bm = assert_agrees(pattern, seq_q, seq_kv, bq, bk)
        assert repr(pattern) in repr(bm)


@SETTINGS
@given(st.data(), sizes, blocks, blocks, st.integers(1, 3))
def test_block_bounds_of_document_complements(data, seq, bq, bk, batch):
    seq_q, seq_kv = seq
    ids = data.draw(packed_ids(batch, seq_kv))
    assert_agrees(~masks.document(ids), seq_q, seq_kv, bq, bk, batch=batch)
    assert_agrees(masks.causal & ~masks.document(ids), seq_q, seq_kv, bq, bk, batch=batch)
    # unsorted ids: the document's bounds are only safe, and so are its complement's
    perm = torch.randperm(seq_kv, generator=torch.Generator().manual_seed(seq_kv))
    assert_agrees(~masks.document(ids[:, perm]), seq_q, seq_kv, bq, bk, batch=batch, exact=False)


@SETTINGS
@given(sizes, blocks, blocks, st.integers(0, 2 ** 31))
def test_block_bounds_of_tensor_and_predicate_complements(seq, bq, bk, seed):
    seq_q, seq_kv = seq
    mask = torch.rand(2, seq_q, seq_kv, generator=torch.Generator().manual_seed(seed)) < 0.3
    assert_agrees(~masks.from_tensor(mask), seq_q, seq_kv, bq, bk, heads=2)
    # a predicate that answers 0/1 integers: its complement is the logical not, not the bitwise one
    pred = masks.from_predicate(lambda b, h, q, k: ((q * 7 + k * 3 + h) % 5 < 2).to(torch.uint8))
    assert_agrees(~pred, seq_q, seq_kv, bq, bk, heads=2)


# ----------------------------------------------------------------------------------------------------------
# Attention against the fp64 oracle


def _cases():
    """name -> (mask, causal, heads_q, heads_kv, rows that see no key)."""
    return {
        # only the distant keys: the first 40 queries have none
        "distant": (~masks.sliding_window(40), True, 2, 2, list(range(40))),
        # causal attention across documents, GQA: the first document's queries have none
        "across_documents_gqa": (masks.causal & ~masks.document(IDS), False, 4, 2, list(range(30))),
        # the global queries of Longformer saw every key, so see none here
        "not_longformer": (~masks.longformer(8, [0, 50]), False, 2, 1, [0, 50]),
        "nothing": (~masks.full, False, 2, 2, list(range(N))),
    }


def _inputs(hq, hkv, dtype, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, hq, d, generator=g)
    k = torch.randn(1, N, hkv, d, generator=g)
    v = torch.randn(1, N, hkv, d, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)]


def _against_oracle(name, backend, dtype, atol, rtol):
    mask, causal, hq, hkv, empty = _cases()[name]
    q, k, v = _inputs(hq, hkv, dtype)
    out, lse = subquad.attention(q, k, v, causal=causal, mask=mask, return_lse=True, backend=backend)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = softmax_attention(*leaves, mask=mask, causal=causal)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double().cpu() * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    for what, got, want in [("out", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        got = got.detach().double().cpu()
        assert not got.isnan().any(), f"{what}: NaN"
        err, bound = (got - want).abs().max().item(), atol + rtol * want.abs().max().item()
        assert err <= bound, f"{what}: max err {err:.3e} > {bound:.3e}"
    lse = lse.detach().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with no key differ"
    assert torch.isneginf(lse[0, :, empty]).all()
    assert (out[0, empty] == 0).all() and (grads[0][0, empty] == 0).all()
    kept, lse_tol = torch.isfinite(ref_lse), 1e-4 if dtype == torch.float32 else 2e-3
    if kept.any():
        assert (lse[kept] - ref_lse[kept]).abs().max().item() <= lse_tol


@pytest.mark.parametrize("name", list(_cases()))
def test_reference_matches_oracle(name):
    _against_oracle(name, "reference", torch.float32, 1e-5, 1e-5)


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("name", list(_cases()))
def test_triton_matches_oracle(name):
    _against_oracle(name, "triton", torch.float16, 2e-3, 5e-3)


def test_more_queries_than_keys_slices_the_tensor_inside_a_complement():
    """Causal with more queries than keys runs the last rows alone: a tensor under ``~`` is sliced as one under
    ``&`` is (it failed its shape check)."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(50, 40, generator=g) < 0.5
    q, k, v = torch.randn(1, 50, 2, 16, generator=g), torch.randn(1, 40, 2, 16, generator=g), \
        torch.randn(1, 40, 2, 16, generator=g)
    got = subquad.attention(q, k, v, causal=True, mask=~masks.from_tensor(m), backend="reference")
    want = subquad.attention(q, k, v, causal=True, mask=masks.from_tensor(~m), backend="reference")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Consumers of the pattern's structure


def test_kernel_terms_cut_a_band_only_where_one_side_is_left():
    """A complemented band inside an intersection is one band where the other bands leave it one side
    (``causal & ~window``: the distant keys), so it runs with no BlockMask; otherwise the bitmask."""
    window = masks.sliding_window(40)
    assert pure_band(masks.causal & ~window) == (40, BAND_INF)
    assert pure_band(~masks.sliding_window(9, causal=False) & masks.causal) == (5, BAND_INF)
    assert pure_band(~masks.causal & masks.sliding_window(9, causal=False)) == (-4, -1)
    terms = kernel_terms(masks.document(IDS) & masks.causal & ~window)
    assert (terms.lo, terms.hi, terms.doc_ids is not None) == (40, INF, True)
    lo, hi = pure_band(masks.sliding_window(8) & ~masks.causal)     # nothing left: an empty band, as
    assert lo > hi                                                  # sliding_window(8) & band(-5, -3) is
    for bitmask in [~window,                                        # two sides: two bands
                    ~masks.causal,                                  # not inside an intersection
                    masks.causal & ~masks.document(IDS),
                    masks.causal & ~(window | masks.strided(8)),
                    masks.longformer(8, [0]) & masks.causal & ~window,   # a union beside a cut band
                    ~masks.longformer(8, [0, 50])]:
        assert kernel_terms(bitmask) is None, bitmask


def test_planner_does_not_read_a_complement_as_its_parts():
    for pattern in [masks.causal & ~masks.sliding_window(8),
                    ~masks.strided(16),                             # columns under ~ are not columns
                    masks.strided(16) & ~masks.sliding_window(4),
                    masks.strided(16) | ~masks.sliding_window(4),
                    ~masks.dilated(40, 4),
                    ~masks.longformer(16, [0, 1, 50, 130])]:
        assert plan(pattern, 200, block_q=32, block_kv=32) is None, pattern
    # attention still runs it, through the BlockMask
    q, k, v = (torch.randn(1, 100, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pattern = ~masks.strided(16)
    got = subquad.attention(q, k, v, mask=pattern, backend="reference")
    torch.testing.assert_close(got.double(), softmax_attention(q, k, v, mask=pattern)[0], atol=1e-5, rtol=1e-5)


def test_dispatch_kind_is_composite():
    for mask, causal in [(~masks.sliding_window(8), True), (masks.causal & ~masks.sliding_window(8), False),
                         (~masks.document(IDS), False), (~masks.longformer(4, [0]), False), (~masks.causal, False),
                         (~masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 8), False)]:
        assert dispatch.pattern_kind(mask, causal) == "composite", mask


def test_fa4_does_not_take_a_complement_for_a_band_or_documents():
    """FA4's dense and varlen routes hold bands and documents: a complement of one is neither. Its mask_mod has
    no negation, so the sparse route refuses it too (``backend="auto"`` picks another backend)."""
    for mask, causal in [(~masks.sliding_window(8), True), (~masks.document(IDS), False),
                         (~masks.document(IDS), True), (~masks.causal, False)]:
        low = fa4.lower(mask, causal)
        assert low.route == "sparse" and not fa4._expressible(low.pattern), mask
    assert fa4._expressible(masks.sliding_window(8) & masks.causal)


@pytest.mark.parametrize("offset", [0, 37])
def test_mask_spec_negates(offset):
    """flex's mask_mod (``fa4.emit`` with torch ops) evaluates a complement as the pattern's predicate does;
    the band bounds under it are not dropped (they hold inside the negation, not around it)."""
    nk, nq = 150, 150 - offset
    for pattern in [masks.causal & ~masks.sliding_window(40), ~masks.document(torch.arange(nk) // 50),
                    ~(masks.longformer(8, [0, 70]) & masks.causal), ~masks.sliding_window(20, causal=False)]:
        prepared = pattern.prepare(BuildContext(1, 2, nq, nk, torch.device("cpu")))
        aux = []
        spec = fa4.mask_spec(prepared, nk, aux, torch.bool)
        q = torch.arange(nq).view(1, 1, -1, 1) + offset
        got = fa4.emit(spec, fa4.TorchOps, torch.zeros(1, 1, 1, 1, dtype=torch.long),
                       torch.arange(2).view(1, -1, 1, 1), q, torch.arange(nk).view(1, 1, 1, -1), aux)
        assert torch.equal(got.expand(1, 2, nq, nk), pattern.to_dense(nq, nk, heads=2)), pattern
        assert eval(repr(spec)) == spec  # noqa: S307


@pytest.mark.skipif(not flex.is_available(), reason="this PyTorch has no FlexAttention")
def test_flex_matches_the_reference():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 150, 2, 16, generator=g), torch.randn(1, 150, 2, 16, generator=g), \
        torch.randn(1, 150, 2, 16, generator=g)
    for mask, causal in [(~masks.sliding_window(40), True), (masks.causal & ~masks.document(torch.arange(150) // 50),
                                                               False)]:
        with torch.no_grad():
            got, got_lse = subquad.attention(q, k, v, causal=causal, mask=mask, return_lse=True, backend="flex")
            want, want_lse = subquad.attention(q, k, v, causal=causal, mask=mask, return_lse=True,
                                               backend="reference")
        assert torch.equal(torch.isneginf(got_lse), torch.isneginf(want_lse)) and torch.isneginf(want_lse).any()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        kept = torch.isfinite(want_lse)
        torch.testing.assert_close(got_lse[kept], want_lse[kept], atol=2e-5, rtol=1e-5)

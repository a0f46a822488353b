"""The FA4 adapter's argument mapping, on CPU: FA4 itself is replaced by a plain-PyTorch model of its
documented semantics (causal and window bottom-right aligned, ``cu_seqlens`` varlen, block-sparse lists
with ``mask_mod`` on partial blocks only), and the generated mask_mod is evaluated with torch ops through
the same ``emit`` that builds the CuTe one. So these tests check that every pattern reaches FA4 as the
right arguments; ``test_fa4_gpu.py`` checks FA4 itself on the GPU."""

from __future__ import annotations

import pytest
import torch

from subquad import attention, masks
from subquad.masks.patterns import INF
from subquad.ops.softmax import fa4


class _BlockSparse:
    def __init__(self, mask_block_cnt, mask_block_idx, full_block_cnt=None, full_block_idx=None, block_size=None):
        self.mask_block_cnt, self.mask_block_idx = mask_block_cnt, mask_block_idx
        self.full_block_cnt, self.full_block_idx = full_block_cnt, full_block_idx
        self.block_size = block_size


def _block_map(cnt, idx, n_rows, n_cols):
    """(Bm, Hm, rows, cols) bool from FA4's (count, index) lists."""
    out = torch.zeros(*cnt.shape[:2], n_rows, n_cols, dtype=torch.bool)
    for b in range(cnt.shape[0]):
        for h in range(cnt.shape[1]):
            for r in range(n_rows):
                for j in idx[b, h, r, :int(cnt[b, h, r])].tolist():
                    out[b, h, r, j] = True
    return out


CALLS = []


def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), softcap=0.0,
                         mask_mod=None, aux_tensors=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                         return_lse=False):
    CALLS.append(dict(route="func", causal=causal, window_size=window_size, mask_mod=mask_mod is not None,
                      sparse=block_sparse_tensors is not None))
    bsz, nq, hq, d = q.shape
    nk, g = k.shape[1], hq // k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    kk, vv = k.repeat_interleave(g, 2).float(), v.repeat_interleave(g, 2).float()
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    row = torch.arange(nq).view(-1, 1)
    col = torch.arange(nk).view(1, -1)
    pos = row + nk - nq
    keep = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    if mask_mod is None:        # FA4 ignores causal/window when a mask_mod is given
        left, right = window_size
        if causal:
            right = 0
        if left is not None:
            keep = keep & (col >= pos - left)
        if right is not None:
            keep = keep & (col <= pos + right)
    if block_sparse_tensors is not None:
        bq, bk = block_sparse_tensors.block_size
        nqb, nkb = -(-nq // bq), -(-nk // bk)
        t = block_sparse_tensors
        partial = _block_map(t.mask_block_cnt, t.mask_block_idx, nqb, nkb)
        full = _block_map(t.full_block_cnt, t.full_block_idx, nqb, nkb)
        tb = block_sparse_tensors_bwd           # the backward lists must be the transposed forward lists
        assert torch.equal(_block_map(tb.mask_block_cnt, tb.mask_block_idx, nkb, nqb), partial.transpose(-1, -2))
        assert torch.equal(_block_map(tb.full_block_cnt, tb.full_block_idx, nkb, nqb), full.transpose(-1, -2))
        assert not bool((partial & full).any())
        expand = lambda m: m.repeat_interleave(bq, 2)[:, :, :nq].repeat_interleave(bk, 3)[..., :nk]  # noqa: E731
        partial, full = expand(partial), expand(full)
        if mask_mod is not None:
            b = torch.arange(bsz).view(-1, 1, 1, 1)
            h = torch.arange(hq).view(1, -1, 1, 1)
            inside = mask_mod(b, h, row.view(1, 1, nq, 1), col.view(1, 1, 1, nk), aux_tensors)
            keep = keep & (full | (partial & inside))
        else:
            assert not bool(partial.any()), "partial blocks need a mask_mod"
            keep = keep & full
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)
    return out, lse


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                max_seqlen_k=None, **kw):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q == max(lengths)
    outs, lses = [], []
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        o, l = fake_flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], **kw)
        outs.append(o[0])
        lses.append(l[0])
    CALLS[-len(lengths):] = [dict(route="varlen", causal=kw.get("causal"), window_size=kw.get("window_size"))]
    return torch.cat(outs), torch.cat(lses, dim=-1)


@pytest.fixture
def fake_fa4(monkeypatch):
    monkeypatch.setattr(fa4, "_interface", lambda: (fake_flash_attn_func, fake_flash_attn_varlen_func, _BlockSparse))

    def mask_mod(spec, q_offset):
        return lambda b, h, q, k, aux: fa4.emit(spec, fa4.TorchOps, b, h, q + q_offset, k, aux)

    monkeypatch.setattr(fa4, "_cute_mask_mod", mask_mod)
    CALLS.clear()
    return CALLS


def _qkv(batch=2, nq=300, nk=300, hq=4, hkv=2, d=32, dv=None, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nq, hq, d, generator=gen)
    k = torch.randn(batch, nk, hkv, d, generator=gen)
    v = torch.randn(batch, nk, hkv, dv or d, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v)]


IDS = torch.cat([torch.full((n,), i) for i, n in enumerate((70, 130, 1, 99))])
IDS_SPLIT = torch.cat([IDS[:150], IDS[:150]])           # id 0 occurs in two separate runs
LAYOUT = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.5

CASES = {
    "full": (None, False, "dense"),
    "causal": (None, True, "dense"),
    "window_causal": (masks.sliding_window(50), False, "dense"),
    "window_and_causal_flag": (masks.sliding_window(50), True, "dense"),
    "window_two_sided": (masks.sliding_window(64, causal=False), False, "dense"),
    "document": (masks.document(IDS), False, "varlen"),
    "document_causal": (masks.document(IDS), True, "varlen"),
    "document_window": (masks.document(IDS) & masks.sliding_window(40), True, "varlen"),
    "document_split_runs": (masks.document(IDS_SPLIT), True, "sparse"),
    "document_per_batch": (masks.document(torch.stack([IDS, IDS.flip(0)])), False, "varlen"),
    "longformer": (masks.longformer(64, [0, 1, 2, 150]), False, "sparse"),
    "longformer_causal": (masks.longformer(64, list(range(16)), causal=True), False, "sparse"),
    "longformer_scattered_globals": (masks.longformer(32, [0, 9, 40, 77, 123, 200]), True, "sparse"),
    "bigbird": (masks.bigbird(64, [0, 1], random_blocks=2, block=64, seed=3), False, "sparse"),
    "prefix_lm": (masks.prefix_lm(100), False, "sparse"),
    "block_sparse_aligned": (masks.block_sparse(LAYOUT[:3, :3], 128), False, "sparse"),
    "block_sparse_64": (masks.block_sparse(LAYOUT, 64), True, "sparse"),
    "strided": (masks.strided(32), False, "sparse"),
    "fixed": (masks.fixed(64, 8), False, "sparse"),
    "dilated": (masks.dilated(128, 4), False, "sparse"),
    "union_window_prefix": (masks.sliding_window(30) | masks.prefix_lm(10), False, "sparse"),
    "tensor": (torch.rand(300, 300, generator=torch.Generator().manual_seed(2)) > 0.7, False, "sparse"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_matches_reference(name, fake_fa4):
    mask, causal, route = CASES[name]
    q, k, v = _qkv()
    out, lse = fa4.fa4_attention(q, k, v, causal=causal, mask=mask, scale=0.3)
    ref, ref_lse = attention(q, k, v, causal=causal, mask=mask, scale=0.3, return_lse=True, backend="reference")
    assert fake_fa4[0]["route"] == ("varlen" if route == "varlen" else "func")
    if route == "sparse":
        assert fake_fa4[0]["sparse"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal", "window_causal", "longformer_causal", "document_window", "bigbird"])
def test_adapter_fewer_queries_than_keys(name, fake_fa4):
    """Queries end-aligned to the keys (decode-like chunks): windows and mask_mods shift by seq_kv - seq_q."""
    mask, causal, _ = CASES[name]
    if name == "document_window":
        mask = masks.document(IDS) & masks.sliding_window(40)
    q, k, v = _qkv(nq=200)
    out, lse = fa4.fa4_attention(q, k, v, causal=causal, mask=mask)
    ref, ref_lse = attention(q, k, v, causal=causal, mask=mask, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["document_causal", "longformer", "window_causal"])
def test_adapter_gradients_and_options(name, fake_fa4):
    """Softcap, MQA, head_dim_v != head_dim, gradients through the reshapes of the varlen route."""
    mask, causal, _ = CASES[name]
    q, k, v = _qkv(hq=4, hkv=1, dv=16, grad=True)
    out, lse = fa4.fa4_attention(q, k, v, causal=causal, mask=mask, softcap=2.0)
    (out.square().sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref, ref_lse = attention(q, k, v, causal=causal, mask=mask, softcap=2.0, return_lse=True, backend="reference")
    (ref.square().sum() + ref_lse.sum()).backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-4)


def test_adapter_prebuilt_block_mask(fake_fa4):
    """A BlockMask on other blocks is rebuilt on FA4's 128 x 128 tiles; one on them is used as it is."""
    q, k, v = _qkv(batch=1)
    for block in (64, 128):
        bm = masks.longformer(64, [0, 5], causal=True).block_mask(300, batch=1, heads=4, block_q=block,
                                                                   block_kv=block)
        out = fa4.fa4_attention(q, k, v, mask=bm)[0]
        torch.testing.assert_close(out, attention(q, k, v, mask=bm, backend="reference"), atol=1e-5, rtol=1e-5)


def test_sparse_arguments_are_cached(fake_fa4):
    """The BlockMask and FA4's block lists are built once per pattern and shape, not per call."""
    pattern = masks.longformer(64, [0, 1], causal=True)
    q, k, v = _qkv(batch=1)
    fa4.fa4_attention(q, k, v, mask=pattern)
    bm = masks.resolve(pattern, causal=False, batch=1, heads=4, seq_q=300, seq_kv=300, device="cpu")
    args = fa4.sparse_args(bm)
    fa4.fa4_attention(q, k, v, mask=pattern)
    assert fa4.sparse_args(bm) is args
    assert args.spec is not None and args.fwd[0].dtype == torch.int32


def test_aligned_block_layout_needs_no_mask_mod(fake_fa4):
    q, k, v = _qkv(batch=1, nq=256, nk=256)
    fa4.fa4_attention(q, k, v, mask=masks.block_sparse(LAYOUT[:2, :2], 128))
    assert fake_fa4[0]["sparse"] and not fake_fa4[0]["mask_mod"]


# ----------------------------------------------------------------------------------------------------------
# Lowering and the mask spec, without running anything


@pytest.mark.parametrize("lo,hi,expected", [
    (0, INF, (True, (None, None))),
    (-INF, INF, (False, (None, None))),
    (0, 99, (False, (99, 0))),
    (-8, 8, (False, (8, 8))),
    (-INF, 0, (False, (0, None))),
    (1, 10, None),          # excludes the diagonal: FA4's window cannot, the mask_mod does
])
def test_band_window(lo, hi, expected):
    assert fa4.band_window(lo, hi) == expected


def test_lowering_routes():
    for name, (mask, causal, route) in CASES.items():
        expected = "varlen" if route == "varlen" or name == "document_split_runs" else route
        assert fa4.lower(mask, causal).route == expected, name
    low = fa4.lower(masks.document(IDS) & masks.sliding_window(40), True)
    assert (low.causal, low.window) == (False, (39, 0))
    assert fa4.lower(masks.sliding_window(8) & masks.sliding_window(4, causal=False), False).window == (2, 0)


@pytest.mark.parametrize("name", [n for n, (_, _, r) in CASES.items() if r == "sparse"])
@pytest.mark.parametrize("offset", [0, 37])
def test_mask_spec_matches_predicate(name, offset):
    mask, causal, _ = CASES[name]
    if isinstance(mask, torch.Tensor):
        mask = masks.from_tensor(mask[offset:])
    pattern = mask & masks.causal if causal else mask
    nk, nq = 300, 300 - offset
    prepared = pattern.prepare(masks.BuildContext(2, 4, nq, nk, torch.device("cpu")))
    aux = []
    spec = fa4.mask_spec(prepared, nk, aux)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in aux)
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.arange(4).view(1, -1, 1, 1)
    q = torch.arange(nq).view(1, 1, -1, 1) + offset
    k = torch.arange(nk).view(1, 1, 1, -1)
    got = fa4.emit(spec, fa4.TorchOps, b, h, q, k, aux).expand(2, 4, nq, nk)
    assert torch.equal(got, pattern.to_dense(nq, nk, batch=2, heads=4))
    # The spec names every constant: its repr is the kernel's cache key.
    assert eval(repr(spec)) == spec  # noqa: S307


def test_mask_spec_drops_band_bounds_an_intersection_enforces():
    pattern = masks.bigbird(64, [0, 1, 2], random_blocks=2, block=16, seed=0, causal=True)
    prepared = pattern.prepare(masks.BuildContext(1, 1, 256, 256, torch.device("cpu")))
    spec = fa4.mask_spec(prepared, 256, [])
    # (0 <= q - k <= 63 | globals | random) & q >= k: under q >= k the window keeps only its upper bound
    assert ("band", None, 63) in spec[1][0][1] and ("band", 0, None) in spec[1]
    assert fa4._tighten(("or", (("band", -5, 5), ("band", 2, 9)))) == ("or", (("band", -5, 5), ("band", 2, 9)))
    nested = ("and", (("band", 0, 100), ("or", (("band", -4, 200), ("and", (("band", 3, None), ("band", 1, 7)))))))
    assert fa4._tighten(nested) == ("and", (("band", 0, 100), ("or", (("band", None, None),
                                                                       ("and", (("band", 3, None), ("band", 1, 7)))))))


def test_predicate_is_not_expressible():
    pattern = masks.from_predicate(lambda b, h, q, k: (q + k) % 3 == 0)
    with pytest.raises(fa4.NotExpressible, match="mask_mod"):
        fa4.mask_spec(pattern, 16, [])
    assert not fa4._expressible(pattern | masks.causal)
    assert fa4._expressible(masks.bigbird(64, [0]) & masks.causal)


def test_padding_lowers_to_varlen_and_large_ids_stay_apart():
    """``masks.padding`` is a document pattern before its ids exist: FA4's varlen route and the dispatch
    table's "document" kind take it (it fell to the sparse route, "no FA4 mask_mod form"). Document ids of
    2^31 and more collided in the mask_mod's int32 ids."""
    from subquad.ops.softmax import dispatch

    pad = masks.padding([200, 256])
    assert fa4.lower(pad, True).route == "varlen"
    assert dispatch.pattern_kind(pad, True) == "document"
    ids = torch.tensor([0] * 150 + [2 ** 32] * 150)
    prepared = masks.document(ids).prepare(masks.BuildContext(1, 1, 300, 300, torch.device("cpu")))
    aux = []
    spec = fa4.mask_spec(prepared, 300, aux)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    query, key = torch.tensor(0).view(1, 1, 1, 1), torch.tensor(299).view(1, 1, 1, 1)
    keep = fa4.emit(spec, fa4.TorchOps, zero, zero, query, key, aux)
    assert not bool(keep)


def test_prebuilt_block_mask_is_checked_for_every_backend():
    """FA4 (and flex, through the same helper) took a prebuilt BlockMask's shape and ``causal=True`` on trust:
    a causal call came back non-causal, a 256-token mask ran on 300 tokens."""
    bm = masks.sliding_window(64, causal=False).block_mask(300, heads=4)
    with pytest.raises(ValueError, match="causal"):
        fa4.block_mask_for(bm, causal=True, batch=1, heads=4, seq_q=300, seq_kv=300, device="cpu")
    with pytest.raises(ValueError, match="seq_q=300"):
        fa4.block_mask_for(masks.causal.block_mask(256), causal=False, batch=1, heads=4, seq_q=300, seq_kv=300,
                           device="cpu")


def test_varlen_offsets():
    doc = masks.document(IDS)
    cu, longest = fa4.varlen_offsets(doc, 2, 300, "cpu")
    assert cu.tolist() == [0, 70, 200, 201, 300, 370, 500, 501, 600] and longest == 130
    assert fa4.varlen_offsets(doc, 2, 300, "cpu")[0] is cu          # cached
    assert fa4.varlen_offsets(masks.document(IDS_SPLIT), 1, 300, "cpu") is None


def test_unsupported_reasons_without_fa4(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setattr(fa4, "is_installed", lambda: False)
    assert "not installed" in fa4.unsupported_reason(q, k, v)
    monkeypatch.setattr(fa4, "is_installed", lambda: True)
    assert "CUDA" in fa4.unsupported_reason(q, k, v)

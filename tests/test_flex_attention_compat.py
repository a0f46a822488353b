"""subquad.integrations.flex_attention: FlexAttention's API over subquad, against the fp64 oracle (on flex's
indices: query ``i`` at position ``i`` whatever the lengths), subquad's own patterns and, where it runs on the CPU,
PyTorch's FlexAttention itself."""

from __future__ import annotations

import warnings

import pytest
import torch

import subquad
from oracles import softmax_attention
from subquad import masks
from subquad.integrations.flex_attention import (and_masks, create_block_mask, flex_attention, noop_mask,
                                                 or_masks)
from subquad.ops.grid import interpreting

TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")


def rand(*shape, dtype=torch.float64, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def qkv(b=2, hq=2, hkv=2, nq=10, nk=10, d=8, dtype=torch.float64, grad=False):
    return (rand(b, hq, nq, d, dtype=dtype, seed=1, grad=grad), rand(b, hkv, nk, d, dtype=dtype, seed=2, grad=grad),
            rand(b, hkv, nk, d, dtype=dtype, seed=3, grad=grad))


def dense(mask_mod, b, h, nq, nk):
    """The mask_mod on flex's indices, materialised."""
    bi, hi = torch.arange(b).view(-1, 1, 1, 1), torch.arange(h).view(1, -1, 1, 1)
    qi, ki = torch.arange(nq).view(1, 1, -1, 1), torch.arange(nk).view(1, 1, 1, -1)
    return torch.as_tensor(mask_mod(bi, hi, qi, ki)).expand(b, h, nq, nk)


def oracle(q, k, v, mask_mod=None, score_mod=None, scale=None):
    """The fp64 oracle in flex's layout and indexing: (B, H, N, D) in and out, query i at position i."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    keep = None if mask_mod is None else dense(mask_mod, b, hq, nq, nk)
    out, lse = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=keep, scale=scale,
                                 score_mod=score_mod, q_pos=torch.arange(nq), kv_pos=torch.arange(nk))
    return out.transpose(1, 2), lse


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding(window):
    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mod


# ids for up to 23 queries; the keys (10) take the first ten
DOC_IDS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4])


def document(b, h, q_idx, kv_idx):
    ids = DOC_IDS.to(q_idx.device)
    return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)


def prefix_lm(prefix):
    def mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)
    return mod


# (mask_mod, the equivalent subquad pattern with as many queries as keys)
MASKS = {
    "causal": (causal, masks.causal),
    "sliding-window": (sliding(4), masks.sliding_window(4)),
    "document": (document, masks.document(DOC_IDS[:10]) & masks.causal),
    "prefix-lm": (prefix_lm(3), masks.prefix_lm(3)),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("nq", [10, 6, 23])
def test_mask_mods_match_oracle(name, nq):
    mask_mod, pattern = MASKS[name]
    q, k, v = qkv(nq=nq, nk=10)
    bm = create_block_mask(mask_mod, None, None, nq, 10, device="cpu")
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="reference")
    ref, ref_lse = oracle(q, k, v, mask_mod)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    if nq == 10:
        # as many queries as keys: subquad's own pattern is the same mask
        same = subquad.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=pattern,
                                 backend="reference").transpose(1, 2)
        torch.testing.assert_close(out, same, rtol=1e-6, atol=1e-6)


def test_fewer_queries_than_keys_start_at_position_zero():
    """flex's q_idx starts at 0 (subquad's queries sit at the end of the keys): query 0 under a causal mask sees
    key 0 alone, whatever KV_LEN."""
    bm = create_block_mask(causal, None, None, 3, 8, device="cpu")
    assert bm.shape == (1, 1, 3, 8) and bm.seq_lengths == (3, 8)
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(3, 8, dtype=torch.bool).tril())
    q, k, v = qkv(b=1, hq=1, hkv=1, nq=3, nk=8)
    out = flex_attention(q, k, v, block_mask=bm, backend="reference")
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


def test_more_queries_than_keys_run_in_chunks():
    """Cross-attention of 9 queries over 4 keys under a mask: three chunks of at most 4 queries, each placed at
    the end of the keys and shifted back to flex's q_idx; outputs, LSE and gradients as the oracle's."""
    bm = create_block_mask(causal, None, None, 9, 4, device="cpu")
    assert [(start, stop) for start, stop, _ in bm.chunks] == [(0, 4), (4, 8), (8, 9)]
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(9, 4, dtype=torch.bool).tril())
    q, k, v = qkv(nq=9, nk=4, grad=True)
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="reference")
    ref, ref_lse = oracle(q, k, v, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    g = rand(*out.shape, seed=7)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # without a block mask every query sees every key in one call
    torch.testing.assert_close(flex_attention(q, k, v, backend="reference"), oracle(q, k, v)[0],
                               rtol=1e-5, atol=1e-5)


def test_and_or_masks():
    q, k, v = qkv()
    both = and_masks(causal, sliding(3))
    either = or_masks(causal, lambda b, h, q_idx, kv_idx: kv_idx < 2)
    for mod, want in ((both, sliding(3)), (either, prefix_lm(2))):
        out = flex_attention(q, k, v, block_mask=create_block_mask(mod, None, None, 10, 10, device="cpu"),
                             backend="reference")
        torch.testing.assert_close(out, oracle(q, k, v, want)[0], rtol=1e-5, atol=1e-5)
    assert dense(and_masks(), 1, 1, 3, 4).all() and not dense(or_masks(), 1, 1, 3, 4).any()
    assert dense(noop_mask, 1, 1, 3, 4).all()
    with pytest.raises(ValueError, match="mask_mods"):
        and_masks(causal, 3)


def test_batch_and_head_dependent_masks():
    """B/H given: mask_mod sees each sequence's and head's index; None: index 0, broadcast."""
    lengths = torch.tensor([4, 7])
    mod = and_masks(causal, lambda b, h, q_idx, kv_idx: (kv_idx < lengths[b]) & (q_idx - kv_idx <= 2 + 3 * h))
    q, k, v = qkv(nq=6, nk=9)
    out = flex_attention(q, k, v, block_mask=create_block_mask(mod, 2, 2, 6, 9, device="cpu"), backend="reference")
    torch.testing.assert_close(out, oracle(q, k, v, mod)[0], rtol=1e-5, atol=1e-5)
    broadcast = flex_attention(q, k, v, block_mask=create_block_mask(mod, None, None, 6, 9, device="cpu"),
                               backend="reference")
    first = lambda b, h, q_idx, kv_idx: mod(b * 0, h * 0, q_idx, kv_idx)  # noqa: E731
    torch.testing.assert_close(broadcast, oracle(q, k, v, first)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q[:1], k[:1], v[:1], block_mask=create_block_mask(mod, 2, 2, 6, 9, device="cpu"))
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=create_block_mask(mod, None, None, 6, 8, device="cpu"))


@pytest.mark.parametrize("nq", [10, 6, 13])
def test_score_mod_on_flex_indices(nq):
    bias = rand(2, 2 * 10 + 6, seed=5)
    rel = lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx - kv_idx + 10]   # noqa: E731
    softcap = lambda s, b, h, q_idx, kv_idx: 2.0 * torch.tanh(s / 2.0)        # noqa: E731
    q, k, v = qkv(nq=nq, nk=10)
    bm = create_block_mask(document, None, None, nq, 10, device="cpu")
    for mod in (rel, softcap):
        out = flex_attention(q, k, v, score_mod=mod, block_mask=bm, scale=0.3, backend="reference")
        ref = oracle(q, k, v, document, score_mod=mod, scale=0.3)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out = flex_attention(q, k, v, score_mod=mod, scale=0.3, backend="reference")
        ref = oracle(q, k, v, score_mod=mod, scale=0.3)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gqa_needs_enable_gqa():
    q, k, v = qkv(hq=4, hkv=2, nq=6)
    bm = create_block_mask(causal, None, None, 6, 10, device="cpu")
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention(q, k, v, block_mask=bm)
    out, lse = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True, backend="reference")
    ref, ref_lse = oracle(q, k, v, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_fully_masked_rows_give_zeros_and_minus_inf_lse():
    late = lambda b, h, q_idx, kv_idx: (q_idx >= 2) & (kv_idx <= q_idx)   # noqa: E731
    q, k, v = qkv(nq=5, nk=7)
    out, lse = flex_attention(q, k, v, block_mask=create_block_mask(late, None, None, 5, 7, device="cpu"),
                              return_lse=True, backend="reference")
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    torch.testing.assert_close(out, oracle(q, k, v, late)[0], rtol=1e-5, atol=1e-5)


def test_gradients_match_oracle():
    q, k, v = qkv(nq=6, grad=True)
    bias = rand(2, 20, seed=7, grad=True)
    mod = lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx - kv_idx + 10]   # noqa: E731
    bm = create_block_mask(sliding(4), None, None, 6, 10, device="cpu")
    out = flex_attention(q, k, v, score_mod=mod, block_mask=bm, backend="reference")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
    ref = oracle(q, k, v, sliding(4), score_mod=mod)[0]
    want = torch.autograd.grad(ref.square().sum(), (q, k, v, bias))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fp16_on_triton_kernels():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=6, nk=10, d=16, dtype=torch.float16)
    dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    bm = create_block_mask(document, None, None, 6, 10, device=dev)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="triton")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), oracle(q.cpu(), k.cpu(), v.cpu(), document)[0],
                               rtol=2e-2, atol=2e-2)


def test_refusals():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block_mask"):
        flex_attention(q, k, v, block_mask=causal)
    with pytest.raises(ValueError, match="mask_mod"):
        create_block_mask(None, None, None, 4, 4)
    with pytest.raises(ValueError, match="query"):
        flex_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="kernel_options"):
        flex_attention(q, k, v, kernel_options=3)


def test_score_mod_not_callable_is_refused_by_name():
    q, k, v = qkv(nq=6, nk=10)
    for bm in (None, create_block_mask(causal, None, None, 6, 10, device="cpu")):
        with pytest.raises(ValueError, match="score_mod: expected a callable"):
            flex_attention(q, k, v, score_mod=2.0, block_mask=bm)


@pytest.mark.parametrize("nq", [6, 17])
def test_matches_torch_flex_attention(nq):
    """PyTorch's own FlexAttention, eager on the CPU (unfused, with a warning), on the same arguments; 17 queries
    over 10 keys run in two chunks."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(hq=4, hkv=2, nq=nq, nk=10, dtype=torch.float32)
    bias = rand(4, 30, dtype=torch.float32, seed=9)
    mod = lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx - kv_idx + 10]   # noqa: E731
    mask_mod = and_masks(document, lambda b, h, q_idx, kv_idx: q_idx >= 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_bm = flex.create_block_mask(mask_mod, None, None, nq, 10, device="cpu")
        want, want_lse = flex.flex_attention(q, k, v, score_mod=mod, block_mask=theirs_bm, enable_gqa=True,
                                             return_lse=True)
    got, lse = flex_attention(q, k, v, score_mod=mod, block_mask=create_block_mask(mask_mod, None, None, nq, 10,
                                                                                  device="cpu"),
                              enable_gqa=True, return_lse=True)
    assert got.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (2, 4, nq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nq", [6, 17])
def test_takes_torch_block_mask(nq):
    """A BlockMask from PyTorch's own create_block_mask runs as flex runs it (partial blocks through its mask_mod),
    per head, and at 17 queries over 10 keys in chunks."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(hq=2, hkv=2, nq=nq, nk=10, dtype=torch.float32)
    mask_mod = or_masks(document, lambda b, h, q_idx, kv_idx: (h == 1) & (kv_idx == 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_bm = flex.create_block_mask(mask_mod, None, 2, nq, 10, device="cpu", BLOCK_SIZE=4)
        want, want_lse = flex.flex_attention(q, k, v, block_mask=theirs_bm, return_lse=True)
    got, lse = flex_attention(q, k, v, block_mask=theirs_bm, return_lse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_torch_block_mask_full_blocks_skip_mask_mod():
    """flex applies mask_mod to partial blocks only: a full block listed with a mask_mod that would drop its pairs
    keeps them all, and unlisted blocks are dropped whatever mask_mod says."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(b=1, hq=1, hkv=1, nq=8, nk=8)
    # query block 0 sees key block 0 in part (causal, even keys); query block 1 sees key block 0 whole, odd keys
    # too, and key block 1 nowhere, though the mask_mod would keep some of it
    even_causal = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (kv_idx % 2 == 0)   # noqa: E731
    bm = flex.BlockMask.from_kv_blocks(torch.tensor([[[1, 0]]]), torch.tensor([[[[0, 1], [1, 0]]]]),
                                       full_kv_num_blocks=torch.tensor([[[0, 1]]]),
                                       full_kv_indices=torch.tensor([[[[1, 0], [0, 1]]]]), BLOCK_SIZE=4,
                                       mask_mod=even_causal, seq_lengths=(8, 8))
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[:4, :4] = torch.ones(4, 4, dtype=torch.bool).tril() & (torch.arange(4) % 2 == 0)
    keep[4:, :4] = True
    want, want_lse = oracle(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: keep[q_idx, kv_idx])
    got, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse.to(lse.dtype).view_as(lse), rtol=1e-5, atol=1e-5)

"""subquad.integrations.flash_attn: flash-attn 2.x's Python API over subquad, against the fp64 oracles."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from oracles import softmax_attention
from oracles import varlen_attention as varlen_oracle
from subquad.integrations.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                              flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                              flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from subquad.ops.grid import interpreting

TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
needs_flash_attn = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
                                      reason="needs flash-attn and a GPU")


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def window_keep(nq, nk, left, right):
    """FlashAttention's window as a bool mask, queries bottom-right aligned."""
    dist = (torch.arange(nq) + nk - nq).view(-1, 1) - torch.arange(nk).view(1, -1)
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        keep &= dist <= left
    if right >= 0:
        keep &= dist >= -right
    return keep


CASES = {
    "plain": dict(nq=7, nk=7),
    "causal-bottom-right": dict(nq=3, nk=9, causal=True),
    "causal-more-queries": dict(nq=9, nk=4, causal=True),
    "window-both": dict(nq=8, nk=8, window=(2, 1)),
    "window-left": dict(nq=5, nk=8, window=(3, -1)),
    "window-right": dict(nq=8, nk=8, window=(-1, 2)),
    # (``attention`` refuses this one: it runs as packed sequences, its first three rows see no key)
    "window-more-queries": dict(nq=9, nk=5, window=(2, 1), hkv=2),
    "window-causal": dict(nq=6, nk=9, window=(2, 5), causal=True),
    "softcap": dict(nq=6, nk=6, softcap=2.0, causal=True),
    "alibi": dict(nq=5, nk=7, alibi=(4,), causal=True),
    "alibi-batch": dict(nq=5, nk=7, alibi=(2, 4)),
    "gqa": dict(nq=6, nk=6, hkv=2, causal=True),
    "mqa": dict(nq=4, nk=6, hkv=1, window=(1, 1)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_func_matches_oracle(name, dtype):
    c = CASES[name]
    b, hq, d = 2, 4, 8
    nq, nk, hkv = c["nq"], c["nk"], c.get("hkv", hq)
    q, k, v = rand(b, nq, hq, d, dtype=dtype), rand(b, nk, hkv, d, dtype=dtype, seed=1), \
        rand(b, nk, hkv, d, dtype=dtype, seed=2)
    slopes = None if "alibi" not in c else rand(*c["alibi"], seed=3).abs().float()
    window = c.get("window", (-1, -1))
    causal = c.get("causal", False)
    out, lse, probs = flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                      softcap=c.get("softcap", 0.0), alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = softmax_attention(q, k, v, mask=window_keep(nq, nk, *window), causal=causal, scale=0.3,
                                     softcap=c.get("softcap"), alibi_slopes=slopes)
    tol = 1e-5  # (the reference accumulates in fp32)
    assert probs is None
    assert lse.shape == (b, hq, nq)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    plain = flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                            softcap=c.get("softcap", 0.0), alibi_slopes=slopes)
    torch.testing.assert_close(plain, out)


def test_func_lse_is_fp32_and_default_scale():
    q, k, v = (rand(1, 5, 2, 16, dtype=torch.float32, seed=s) for s in range(3))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    ref, ref_lse = softmax_attention(q, k, v)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_func_gradients_match_oracle():
    q, k, v = (rand(2, 6, 4, 8, seed=s).requires_grad_() for s in range(3))
    k2, v2 = (rand(2, 8, 2, 8, seed=s).requires_grad_() for s in (4, 5))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    grad = rand(2, 6, 4, 8, seed=6)
    out = flash_attn_func(q, k2, v2, causal=True, window_size=(3, 0), softcap=3.0, alibi_slopes=slopes)
    got = torch.autograd.grad(out, (q, k2, v2), grad)
    ref, _ = softmax_attention(q, k2, v2, mask=window_keep(6, 8, 3, 0), causal=True, softcap=3.0,
                               alibi_slopes=slopes)
    want = torch.autograd.grad(ref, (q, k2, v2), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_func_deterministic_and_dropout_pass_through():
    q, k, v = (rand(1, 6, 2, 8, seed=s) for s in range(3))
    torch.testing.assert_close(flash_attn_func(q, k, v, deterministic=True), softmax_attention(q, k, v)[0])
    torch.manual_seed(0)
    a = flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = flash_attn_func(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, softmax_attention(q, k, v)[0])


def test_func_window_size_not_a_pair_is_refused_by_name():
    q, k, v = (rand(1, 6, 2, 8, seed=s) for s in range(3))
    with pytest.raises(ValueError, match=r"window_size: expected \(left, right\)"):
        flash_attn_func(q[:, :5], k[:, :3], v[:, :3], window_size=3)


def test_packed_forms_equal_unpacked():
    qkv = rand(2, 6, 3, 4, 8)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, causal=True, window_size=(2, 0)),
                               flash_attn_func(*qkv.unbind(2), causal=True, window_size=(2, 0)))
    q, kv = rand(2, 5, 4, 8), rand(2, 7, 2, 2, 8, seed=1)
    got = flash_attn_kvpacked_func(q, kv, causal=True, softcap=1.5, return_attn_probs=True)
    want = flash_attn_func(q, *kv.unbind(2), causal=True, softcap=1.5, return_attn_probs=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_packed_forms_name_the_bad_argument():
    with pytest.raises(ValueError, match=r"qkv: expected shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_qkvpacked_func(rand(2, 6, 2, 4, 8))
    with pytest.raises(ValueError, match=r"kv: expected shape \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        flash_attn_kvpacked_func(rand(2, 6, 4, 8), rand(2, 6, 3, 4, 8))


def test_varlen_packed_forms_equal_unpacked():
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    qkv = rand(10, 3, 4, 8)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True, window_size=(2, 0)),
                               flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 5, 5, causal=True, window_size=(2, 0)))
    cu_k = torch.tensor([0, 4, 9, 16], dtype=torch.int32)
    q, kv = rand(10, 4, 8), rand(16, 2, 2, 8, seed=1)
    got = flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 5, 7, causal=True, softcap=1.5, return_attn_probs=True)
    want = flash_attn_varlen_func(q, *kv.unbind(1), cu, cu_k, 5, 7, causal=True, softcap=1.5,
                                  return_attn_probs=True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    with pytest.raises(ValueError, match=r"qkv: expected shape \(total, 3, nheads, headdim\)"):
        flash_attn_varlen_qkvpacked_func(rand(10, 2, 4, 8), cu, 5)
    with pytest.raises(ValueError, match=r"kv: expected shape \(total_k, 2, nheads_k, headdim\)"):
        flash_attn_varlen_kvpacked_func(q, rand(16, 3, 2, 8), cu, cu_k, 5, 7)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)), (True, (3, 0))])
def test_varlen_three_sequences(causal, window):
    cu_q = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9, 16], dtype=torch.int32)
    q, k, v = rand(10, 4, 8), rand(16, 2, 8, seed=1), rand(16, 2, 8, seed=2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7, softmax_scale=0.4, causal=causal,
                                             window_size=window, softcap=2.5, alibi_slopes=slopes,
                                             return_attn_probs=True)
    ref, ref_lse = varlen_oracle(q, k, v, cu_q, cu_k, causal=causal, window_size=window, scale=0.4, softcap=2.5,
                                 alibi_slopes=slopes)
    assert probs is None and lse.shape == (4, 10)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_varlen_refuses_block_table():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(rand(3, 2, 8), rand(3, 2, 8), rand(3, 2, 8), cu, cu, 3, 3,
                               block_table=torch.zeros(1, 1, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ---------------------------------------------------------------------------------------------------------------

def rotate(x, cos, sin, interleaved):
    """RoPE written out: x (B, T, H, D), cos/sin (B, T, R / 2) for the first R channels."""
    r = cos.shape[-1] * 2
    c, s = cos[:, :, None], sin[:, :, None]
    rot = x[..., :r]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = rot[..., :r // 2], rot[..., r // 2:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([out, x[..., r:]], -1)


def expected_kvcache(q, k_cache, v_cache, lengths, causal, window=(-1, -1), softcap=None, alibi=None):
    """Each sequence's queries over its first ``lengths[b]`` keys (bottom-right aligned), by the oracle."""
    outs, lses = [], []
    for b, n in enumerate(lengths):
        keep = window_keep(q.shape[1], n, *window)
        o, lse = softmax_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], mask=keep, causal=causal,
                                   softcap=softcap, alibi_slopes=alibi)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("causal,window,t", [(True, (-1, -1), 2), (False, (-1, -1), 2), (True, (2, -1), 3),
                                             (False, (1, 1), 2), (False, (2, 0), 1), (True, (-1, -1), 20)])
def test_kvcache_appends_in_place_and_attends(causal, window, t):
    b, hq, hkv, d, cap = 3, 4, 2, 8, 32
    k_cache, v_cache = rand(b, cap, hkv, d, seed=1), rand(b, cap, hkv, d, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k, v = rand(b, t, hq, d), rand(b, t, hkv, d, seed=3), rand(b, t, hkv, d, seed=4)
    seqlens = torch.tensor([2, 5, 0], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal,
                                       window_size=window, softcap=4.0, alibi_slopes=slopes, return_softmax_lse=True)
    for i, s in enumerate(seqlens.tolist()):
        want_k, want_v = before_k[i].clone(), before_v[i].clone()
        want_k[s:s + t], want_v[s:s + t] = k[i], v[i]
        torch.testing.assert_close(k_cache[i], want_k, atol=0, rtol=0)
        torch.testing.assert_close(v_cache[i], want_v, atol=0, rtol=0)
    ref, ref_lse = expected_kvcache(q, k_cache, v_cache, (seqlens + t).tolist(), causal, window, 4.0, slopes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_kvcache_without_new_keys_reads_the_prefix():
    k_cache, v_cache = rand(2, 10, 2, 8, seed=1), rand(2, 10, 2, 8, seed=2)
    q = rand(2, 1, 2, 8)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6)
    torch.testing.assert_close(out, expected_kvcache(q, k_cache, v_cache, [6, 6], causal=False)[0])
    full = flash_attn_with_kvcache(q, k_cache, v_cache)
    torch.testing.assert_close(full, expected_kvcache(q, k_cache, v_cache, [10, 10], causal=False)[0])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    b, h, d, t, r = 2, 2, 8, 3, 6
    k_cache, v_cache = rand(b, 16, h, d, seed=1), rand(b, 16, h, d, seed=2)
    q, k, v = rand(b, t, h, d), rand(b, t, h, d, seed=3), rand(b, t, h, d, seed=4)
    angles = torch.arange(16, dtype=torch.float64)[:, None] * rand(r // 2, seed=5).abs()[None]
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([4, 1], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                  causal=causal, rotary_interleaved=interleaved)
    k_pos = seqlens.long()[:, None] + torch.arange(t)
    # FlashAttention's rule: q at the new keys' positions when causal or local, else all at cache_seqlens
    q_pos = k_pos if causal else seqlens.long()[:, None].expand(b, t)
    k_rot = rotate(k, cos[k_pos], sin[k_pos], interleaved)
    for i, s in enumerate(seqlens.tolist()):
        torch.testing.assert_close(k_cache[i, s:s + t], k_rot[i])
        torch.testing.assert_close(v_cache[i, s:s + t], v[i])
    q_rot = rotate(q, cos[q_pos], sin[q_pos], interleaved)
    ref, _ = expected_kvcache(q_rot, k_cache, v_cache, (seqlens + t).tolist(), causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,t", [(True, 2), (False, 3)])
def test_kvcache_paged_equals_dense(causal, t):
    b, h, d, page, pages = 2, 2, 8, 4, 5
    dense_k, dense_v = rand(b, page * pages, h, d, seed=1), rand(b, page * pages, h, d, seed=2)
    table = torch.randperm(b * pages, generator=torch.Generator().manual_seed(7)).view(b, pages).to(torch.int32)
    pool_k = torch.zeros(b * pages, page, h, d, dtype=torch.float64)
    pool_v = torch.zeros_like(pool_k)
    pool_k[table.long()] = dense_k.view(b, pages, page, h, d)
    pool_v[table.long()] = dense_v.view(b, pages, page, h, d)
    q, k, v = rand(b, t, h, d), rand(b, t, h, d, seed=3), rand(b, t, h, d, seed=4)
    seqlens = torch.tensor([7, 13], dtype=torch.int32)
    got = flash_attn_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=seqlens, block_table=table, causal=causal,
                                  return_softmax_lse=True)
    want = flash_attn_with_kvcache(q, dense_k, dense_v, k, v, cache_seqlens=seqlens, causal=causal,
                                   return_softmax_lse=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool_k[table.long()].reshape(dense_k.shape), dense_k, atol=0, rtol=0)
    torch.testing.assert_close(pool_v[table.long()].reshape(dense_v.shape), dense_v, atol=0, rtol=0)


@pytest.mark.parametrize("causal,t", [(True, 1), (True, 3), (False, 2)])
def test_kvcache_batch_idx_reads_and_writes_the_named_rows(causal, t):
    """cache_batch_idx: sequence i reads and writes cache row idx[i] of a cache with more rows than sequences,
    in place, as the same call on the cache's rows gathered; the other rows untouched."""
    k_cache, v_cache = rand(4, 16, 2, 8, seed=5), rand(4, 16, 2, 8, seed=6)
    q, k, v = rand(2, t, 4, 8), rand(2, t, 2, 8, seed=3), rand(2, t, 2, 8, seed=4)
    idx, seqlens = torch.tensor([3, 1], dtype=torch.int32), torch.tensor([9, 4], dtype=torch.int32)
    rows_k, rows_v = k_cache[idx.long()].clone(), v_cache[idx.long()].clone()
    before_k = k_cache.clone()
    got = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                  causal=causal, softcap=3.0, return_softmax_lse=True)
    want = flash_attn_with_kvcache(q, rows_k, rows_v, k, v, cache_seqlens=seqlens, causal=causal, softcap=3.0,
                                   return_softmax_lse=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache[idx.long()], rows_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache[idx.long()], rows_v, atol=0, rtol=0)
    torch.testing.assert_close(k_cache[[0, 2]], before_k[[0, 2]], atol=0, rtol=0)


def test_kvcache_refusals_name_the_argument():
    k_cache, v_cache, q = rand(2, 8, 2, 8), rand(2, 8, 2, 8), rand(2, 1, 2, 8)
    idx = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=idx[:1])
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=idx, block_table=idx[:, None])
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_leftpad=idx)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="k, v"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=rand(2, 1, 2, 8))
    with pytest.raises(ValueError, match="k: expected"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=rand(2, 1, 3, 8), v=rand(2, 1, 3, 8), cache_seqlens=1)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=rand(2, 2, 2, 8), v=rand(2, 2, 2, 8), cache_seqlens=7)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, block_table=torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="rotary_cos"):
        flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.ones(8, 4), rotary_sin=torch.ones(8, 4))


@pytest.mark.parametrize("causal,t", [(False, 3), (True, 20)])
def test_kvcache_empty_caches_give_zeros(causal, t):
    """Every cache empty and no new keys: zeros and LSE -inf on every path (the decode kernel's steps gave them;
    the packed path refused the call)."""
    k_cache, v_cache, q = rand(2, 24, 2, 8), rand(2, 24, 2, 8), rand(2, t, 4, 8)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, causal=causal, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and lse.shape == (2, 4, t) and torch.isneginf(lse).all()


@pytest.mark.parametrize("seqlens,new_keys", [(-1, True), (9, False), ([3, -2], False)])
def test_kvcache_lengths_outside_the_cache_are_refused(seqlens, new_keys):
    """A negative length wrote the new keys at the cache's end (Python's negative index) and a length past the
    cache read beyond it; the cache is left untouched."""
    k_cache, v_cache, q = rand(2, 8, 2, 8), rand(2, 8, 2, 8), rand(2, 1, 2, 8)
    before = k_cache.clone()
    if not isinstance(seqlens, int):
        seqlens = torch.tensor(seqlens, dtype=torch.int32)
    k, v = (rand(2, 1, 2, 8, seed=1), rand(2, 1, 2, 8, seed=2)) if new_keys else (None, None)
    with pytest.raises(ValueError, match=r"cache_seqlens: expected lengths in \[0, \d\]"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(k_cache, before, atol=0, rtol=0)


def test_kvcache_batch_idx_and_rotary_out_of_range_are_refused_by_name():
    k_cache, v_cache, q = rand(2, 8, 2, 8), rand(2, 8, 2, 8), rand(2, 1, 2, 8)
    with pytest.raises(ValueError, match=r"cache_batch_idx: expected rows of k_cache in \[0, 2\)"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3,
                                cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    k, v = rand(2, 1, 2, 8, seed=1), rand(2, 1, 2, 8, seed=2)
    with pytest.raises(ValueError, match="rotary_cos: .*seqlen_ro >= 8"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5, rotary_cos=torch.ones(4, 2),
                                rotary_sin=torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter or GPU), fp16
# ---------------------------------------------------------------------------------------------------------------

def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
def test_func_on_triton_fp16():
    q, k, v = (rand(1, 16, 2, 16, seed=s).half().to(_device()) for s in range(3))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(5, 0), return_attn_probs=True, backend="triton")
    ref, ref_lse = softmax_attention(q.cpu(), k.cpu(), v.cpu(), mask=window_keep(16, 16, 5, 0), causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=2e-2, rtol=2e-2)


@needs_triton
def test_kvcache_on_triton_fp16():
    dev = _device()
    k_cache, v_cache = (rand(2, 16, 1, 16, seed=s).half().to(dev) for s in (1, 2))
    q, k, v = rand(2, 2, 2, 16).half().to(dev), rand(2, 2, 1, 16, seed=3).half().to(dev), \
        rand(2, 2, 1, 16, seed=4).half().to(dev)
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=dev)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True, num_splits=2,
                                  backend="triton")
    ref, _ = expected_kvcache(q.cpu(), k_cache.cpu(), v_cache.cpu(), [5, 11], causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)


@needs_triton
def test_kvcache_batch_idx_on_triton_fp16():
    """cache_batch_idx on the decode kernel: the dense cache read as one-row pages (a page of 16 keys)."""
    dev = _device()
    k_cache, v_cache = (rand(3, 16, 1, 16, seed=s).half().to(dev) for s in (1, 2))
    q = rand(2, 1, 2, 16).half().to(dev)
    idx, seqlens = torch.tensor([2, 0], dtype=torch.int32, device=dev), torch.tensor([5, 16], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens.to(dev), cache_batch_idx=idx,
                                  num_splits=2, backend="triton")
    ref, _ = expected_kvcache(q.cpu(), k_cache[idx.long()].cpu(), v_cache[idx.long()].cpu(), [5, 16], causal=True)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)


@needs_flash_attn
def test_against_flash_attn():
    import flash_attn

    q, k, v = (rand(2, 64, 4, 64, seed=s).half().cuda() for s in range(3))
    k2, v2 = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    for kwargs in (dict(causal=True), dict(window_size=(16, 4)), dict(softcap=5.0, causal=True)):
        torch.testing.assert_close(flash_attn_func(q[:, :32], k2, v2, **kwargs),
                                   flash_attn.flash_attn_func(q[:, :32], k2, v2, **kwargs), atol=2e-3, rtol=2e-3)
    cache_k, cache_v = torch.zeros(2, 128, 2, 64, dtype=torch.half, device="cuda"), \
        torch.zeros(2, 128, 2, 64, dtype=torch.half, device="cuda")
    ours_k, ours_v = cache_k.clone(), cache_v.clone()
    seqlens = torch.tensor([10, 40], dtype=torch.int32, device="cuda")
    want = flash_attn.flash_attn_with_kvcache(q[:, :2], cache_k, cache_v, k2[:, :2], v2[:, :2],
                                              cache_seqlens=seqlens, causal=True)
    got = flash_attn_with_kvcache(q[:, :2], ours_k, ours_v, k2[:, :2], v2[:, :2], cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours_k, cache_k, atol=0, rtol=0)

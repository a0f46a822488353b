"""Attention dropout: the random stream (PyTorch's Philox against the kernels' ``tl.randint``, bit for bit), the
reference against the fp64 oracle with the same kept pairs, the Triton kernels against the reference (outputs,
LSE, gradients), and ``attention(dropout_p=)``'s contract."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad import masks
from subquad.ops.grid import interpreting
from subquad.ops.softmax import dropout as dr
from subquad.ops.softmax.reference import Dropout, attention_reference

import oracles

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")


def _qkv(b, nq, nk, hq, hkv, d=16, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(b, n, h, d, generator=gen).to(device, dtype).requires_grad_(True)  # noqa: E731
    return mk(nq, hq), mk(nk, hkv), mk(nk, hkv)


if TRITON:
    import triton
    import triton.language as tl

    from subquad.ops.softmax.flash.tile import dropout_keep

    @triton.jit
    def _draw(RNG, OUT, seq_q, seq_kv, BLOCK: tl.constexpr, TRANS: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        start_n = tl.program_id(1) * BLOCK
        offs_n = start_n + tl.arange(0, BLOCK)
        rows = tl.program_id(2).to(tl.int64) * seq_q + offs_m
        keep = dropout_keep(RNG, rows, start_n, seq_kv, BLOCK, BLOCK, TRANS)
        if TRANS:       # (keys, rows): stored back as (rows, keys)
            keep = tl.trans(keep)
        tl.store(OUT + rows[:, None] * seq_kv + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_kv))


@needs_triton
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_philox_matches_the_kernels_draw(p, trans):
    b, h, nq, nk = 2, 3, 40, 70
    for seed in (0, 1, 2 ** 40 + 12345, 2 ** 62 - 1):
        rng = torch.tensor([seed, dr.threshold(p)], dtype=torch.int64, device=DEV)
        out = torch.zeros(b, h, nq, nk, dtype=torch.int8, device=DEV)
        _draw[(triton.cdiv(nq, 32), triton.cdiv(nk, 32), b * h)](rng, out, nq, nk, BLOCK=32, TRANS=trans)
        assert torch.equal(out.bool(), dr.keep_mask(rng, b, h, nq, nk)), seed


def test_keep_rate_and_independence():
    torch.manual_seed(0)
    rng = dr.new_rng("cpu", 0.3)
    keep = dr.keep_mask(rng, 2, 4, 128, 256).float()
    assert abs(keep.mean().item() - 0.7) < 0.01
    # rows and keys are not correlated with their neighbours
    assert abs((keep[..., 1:] * keep[..., :-1]).mean().item() - 0.49) < 0.01
    assert abs((keep[:, :, 1:] * keep[:, :, :-1]).mean().item() - 0.49) < 0.01
    other = dr.keep_mask(dr.new_rng("cpu", 0.3), 2, 4, 128, 256).float()
    assert abs((keep * other).mean().item() - 0.49) < 0.01


def test_philox_known_answer():
    """Philox-4x32-10's published test vector (Salmon et al., Random123: counter 0, key 0)."""
    words = dr.philox(torch.tensor(0), torch.tensor([0]))
    assert [w.item() for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_probability_is_a_multiple_of_1_256():
    assert dr.check_dropout_p(0.1) == 26 / 256 and dr.check_dropout_p(0.999) == 255 / 256
    assert dr.check_dropout_p(0.001) == 0.0         # below 1/512: no dropout
    torch.manual_seed(0)
    keep = dr.keep_mask(dr.new_rng("cpu", 0.1), 2, 4, 64, 512).float()
    assert abs(keep.mean().item() - (1 - 26 / 256)) < 0.005


@pytest.mark.parametrize("pattern,causal,hq,hkv,nq,nk", [
    (None, True, 4, 2, 37, 37),
    (None, False, 2, 2, 20, 45),
    (masks.sliding_window(9), False, 4, 1, 50, 50),
])
def test_reference_matches_the_oracle(pattern, causal, hq, hkv, nq, nk):
    q, k, v = _qkv(2, nq, nk, hq, hkv, dtype=torch.float64)
    rng = dr.new_rng("cpu", 0.4)
    bm = masks.resolve(pattern, causal=causal, batch=2, heads=hq, seq_q=nq, seq_kv=nk, device="cpu", block_q=16,
                       block_kv=16)
    out, lse = attention_reference(q, k, v, bm, 0.25, dropout=Dropout(0.4, rng, hq, nq, nk))
    ref, ref_lse = oracles.softmax_attention(q, k, v, mask=pattern, causal=causal, scale=0.25,
                                             dropout_keep=dr.keep_mask(rng, 2, hq, nq, nk), dropout_p=0.4)
    # (the reference accumulates in fp32 whatever the inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def _kernel_vs_reference(pattern, causal, hq, hkv, nq, nk, dtype, deterministic, softcap=None):
    from subquad.ops.softmax.flash import flash_attention

    q, k, v = _qkv(1, nq, nk, hq, hkv, dtype=dtype, device=DEV)
    rng = dr.new_rng(DEV, 0.3)
    out, lse = flash_attention(q, k, v, causal=causal, mask=pattern, scale=0.3, softcap=softcap,
                               deterministic=deterministic, dropout=(0.3, rng))
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    bm = masks.resolve(pattern, causal=causal, batch=1, heads=hq, seq_q=nq, seq_kv=nk, device=DEV)
    ref, ref_lse = attention_reference(qr, kr, vr, bm, 0.3, softcap, dropout=Dropout(0.3, rng, hq, nq, nk))
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    grads = torch.autograd.grad((out.float() * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (qr, kr, vr))
    for name, a, b_ in zip(("dq", "dk", "dv"), grads, ref_grads):
        scale = b_.abs().max().item()
        assert (a.float() - b_).abs().max().item() <= 2e-2 + 2e-2 * scale, name


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("pattern,causal,hq,hkv,nq,nk", [
    (None, True, 4, 2, 77, 77),          # a band: no lists; odd length
    (None, False, 2, 1, 40, 96),         # full, fewer queries than keys
    (masks.longformer(16, [0, 1]), False, 2, 2, 96, 96),      # a BlockMask walk with global tokens
    (masks.document(torch.tensor([0] * 30 + [1] * 50 + [2] * 16)), True, 2, 2, 96, 96),
])
def test_kernels_match_the_reference(pattern, causal, hq, hkv, nq, nk, deterministic):
    _kernel_vs_reference(pattern, causal, hq, hkv, nq, nk, torch.float16, deterministic)


@needs_triton
def test_kernels_match_the_reference_bf16_softcap():
    _kernel_vs_reference(None, True, 2, 2, 64, 64, torch.bfloat16, False, softcap=5.0)


def test_attention_contract():
    q, k, v = (t.detach() for t in _qkv(1, 24, 24, 2, 2))
    plain = subquad.attention(q, k, v, causal=True)
    assert torch.equal(subquad.attention(q, k, v, causal=True, dropout_p=0.0), plain)
    torch.manual_seed(3)
    a, lse_a = subquad.attention(q, k, v, causal=True, dropout_p=0.5, return_lse=True)
    torch.manual_seed(3)
    b = subquad.attention(q, k, v, causal=True, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    # the LSE is the undropped one
    torch.testing.assert_close(lse_a, subquad.attention(q, k, v, causal=True, return_lse=True)[1])
    # the first query sees one key: in each head, kept (scaled by 2) or dropped (0)
    for h in range(2):
        first = a[0, 0, h]
        assert torch.allclose(first, 2 * plain[0, 0, h]) or torch.equal(first, torch.zeros_like(first))
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="dropout_p"):
            subquad.attention(q, k, v, dropout_p=bad)
    for backend in ("fa4", "cudnn", "flex"):
        with pytest.raises(ValueError, match="dropout_p"):
            subquad.attention(q, k, v, dropout_p=0.1, backend=backend)
    with pytest.raises(ValueError, match="plan"):
        subquad.attention(q, k, v, mask=masks.strided(4), dropout_p=0.1, plan=True)


def test_dropout_is_unbiased_and_masked_rows_stay_zero():
    q, k, v = (t.detach() for t in _qkv(1, 16, 16, 2, 2))
    ids = torch.tensor([0] * 8 + [1] * 8)
    # keys 8.. are hidden from queries 0..7 and the reverse; queries of a document with no key: none here, so
    # hide every key from query 3 with a bool mask
    hidden = torch.ones(16, 16, dtype=torch.bool)
    hidden[3] = False
    plain = subquad.attention(q, k, v, mask=masks.document(ids))
    mean = torch.stack([subquad.attention(q, k, v, mask=masks.document(ids), dropout_p=0.3) for _ in range(400)])
    assert (mean.mean(0) - plain).abs().max() < 0.15
    out = subquad.attention(q, k, v, mask=hidden, dropout_p=0.3)
    assert torch.isfinite(out).all() and torch.equal(out[0, 3], torch.zeros_like(out[0, 3]))


def test_planned_patterns_run_unplanned_with_dropout():
    q, k, v = (t.detach() for t in _qkv(1, 64, 64, 2, 2))
    torch.manual_seed(0)
    out = subquad.attention(q, k, v, mask=masks.strided(8), dropout_p=0.2)
    torch.manual_seed(0)
    same = subquad.attention(q, k, v, mask=masks.strided(8), dropout_p=0.2, plan=False)
    assert torch.equal(out, same)


def test_compiles_whole_with_dropout():
    """Traced whole; the compiled call draws its seed on the device as eager does (inductor's own random numbers
    differ from eager's unless ``fallback_random``)."""
    q, k, v = (t.detach() for t in _qkv(1, 32, 32, 2, 2))
    fn = lambda q, k, v: subquad.attention(q, k, v, causal=True, dropout_p=0.25)   # noqa: E731
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(fn, fullgraph=True)
        torch.manual_seed(5)
        got = compiled(q, k, v)
    torch.manual_seed(5)
    want = fn(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(compiled(q, k, v), got)      # a fresh seed each call


def test_compiled_draws_match_eager_at_lengths_not_a_multiple_of_16():
    """Traced whole with gradients, GQA, 20 keys (16 keys share a Philox call: the last call's 4 keys): inductor
    fused the reference's int64 Philox into the attention's loops and left those 4 keys' words unwritten (CPU,
    torch 2.13: the compiled call read uninitialised memory for them); the draws now run as one op of their own."""
    q, k, v = _qkv(1, 20, 20, 4, 2, d=8)
    fn = lambda q, k, v: subquad.attention(q, k, v, causal=True, dropout_p=0.3)   # noqa: E731
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(fn, fullgraph=True)
        compiled(q, k, v)
        torch.manual_seed(7)
        got = compiled(q, k, v)
    torch.manual_seed(7)
    want = fn(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    for a, b_ in zip(torch.autograd.grad((got * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)

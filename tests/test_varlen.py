"""``subquad.varlen_attention``: FlashAttention's ``flash_attn_varlen_func`` contract (packed sequences whose query
and key lengths may differ, bottom-right causal and windows per sequence). The reference path against the fp64
oracle (``oracles.varlen_attention``, one sequence at a time); the flash kernels against the reference (under
TRITON_INTERPRET=1 on CPU, natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

import oracles
import subquad
from subquad import masks
from subquad.ops.grid import interpreting

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}

#: (cu_seqlens_q, cu_seqlens_k): chunked prefill (fewer queries than keys), then a mix with a sequence without
#: keys, one with more queries than keys and one of a single query
CASES = {
    "prefill": ([0, 5, 17, 40], [0, 9, 30, 70]),
    "ragged": ([0, 4, 10, 25, 26], [0, 0, 16, 20, 40]),
}
WINDOWS = [(-1, -1), (6, 2), (9, -1)]


def _inputs(case, dtype, hq=4, hkv=2, d=16, seed=0):
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEV) for c in CASES[case])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=g)
    k = torch.randn(int(cu_k[-1]), hkv, d, generator=g)
    v = torch.randn(int(cu_k[-1]), hkv, d, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)], cu_q, cu_k


def _close(name, got, ref, dtype):
    atol, rtol = TOL[dtype]
    got, ref = got.double().cpu(), ref.double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - ref).abs().max().item()
    bound = atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def _lse_close(got, ref, atol=2e-3):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse: -inf rows differ"
    finite = ~torch.isinf(ref)
    assert (got[finite] - ref[finite]).abs().max().item() <= atol


def _run(fn, q, k, v):
    """Output, LSE and the gradients of a fixed random projection of both."""
    out, lse = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    loss = (out.double() * w.double()).sum() + torch.where(torch.isinf(lse), 0, lse).double().sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_reference_matches_oracle(case, causal, window):
    """fp32 inputs run the reference: outputs, LSE and gradients against the fp64 oracle; GQA, softcap, ALiBi."""
    (q, k, v), cu_q, cu_k = _inputs(case, torch.float32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEV)
    options = dict(causal=causal, window_size=window, softcap=4.0, alibi_slopes=slopes)
    got = _run(lambda q, k, v: subquad.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **options), q, k, v)
    ref = _run(lambda q, k, v: oracles.varlen_attention(q, k, v, cu_q, cu_k, **options), q, k, v)
    _close("out", got[0], ref[0], torch.float32)
    _lse_close(got[1], ref[1], atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), got[2], ref[2]):
        _close(name, a, b, torch.float32)


def test_rows_without_keys_are_zero():
    """A sequence without keys, and the leading queries of a causal sequence with more queries than keys: zeros,
    LSE -inf, finite gradients."""
    (q, k, v), cu_q, cu_k = _inputs("ragged", torch.float32)
    out, lse = subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    # sequence 0 has no keys; sequence 2 has 15 queries and 4 keys: its first 11 see none
    empty = torch.zeros(q.shape[0], dtype=torch.bool)
    empty[0:4] = True
    empty[10:21] = True
    assert torch.equal(torch.isneginf(lse).all(0).cpu(), empty)
    assert out[empty.to(DEV)].abs().max() == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cu_q, cu_k", [([0, 3, 5], [0, 0, 0]), ([0, 0, 0], [0, 4, 6])])
def test_no_sequence_with_both_queries_and_keys(cu_q, cu_k):
    """Every sequence without keys (or without queries), as a batch over empty KV caches makes: zeros and LSE
    -inf (with sinks, the sink's logit), not a refusal; the arguments still checked."""
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEV) for c in (cu_q, cu_k))
    q = torch.randn(int(cu_q[-1]), 4, 8, device=DEV)
    k, v = torch.randn(2, int(cu_k[-1]), 2, 8, device=DEV).unbind(0)
    out, lse = subquad.varlen_attention(q, k, v[..., :6], cu_q, cu_k, causal=True, return_lse=True)
    assert out.shape == (q.shape[0], 4, 6) and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    out, lse = subquad.varlen_attention(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, sinks[:, None].expand_as(lse))
    with pytest.raises(ValueError, match="k: expected H_kv dividing H_q=4"):
        subquad.varlen_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_q, cu_k)


@pytest.mark.parametrize("causal", [False, True])
def test_equal_lengths_are_packed_documents(causal):
    """Equal query and key offsets: the ``document`` pattern through ``subquad.attention`` (any backend), and
    the same numbers as the oracle."""
    (q, k, v), _, _ = _inputs("prefill", torch.float32)
    cu = torch.tensor([0, 9, 30, 40], device=DEV)
    q = q[:40].detach()
    k, v = (t[:40].detach() for t in (k, v))
    out = subquad.varlen_attention(q, k, v, cu, cu, causal=causal, window_size=(7, 7))
    ref, _ = oracles.varlen_attention(q, k, v, cu, cu, causal=causal, window_size=(7, 7))
    _close("out", out, ref, torch.float32)
    ids = torch.tensor([0] * 9 + [1] * 21 + [2] * 10, device=DEV)
    band = masks.patterns.Band(-7, 7)
    doc = subquad.attention(q[None], k[None], v[None], causal=causal, mask=masks.document(ids) & band)
    torch.testing.assert_close(out, doc[0], rtol=0, atol=1e-6)


def test_sinks():
    """Sinks on the positions path: the oracle's extra key, a sequence without keys included."""
    (q, k, v), cu_q, cu_k = _inputs("ragged", torch.float32)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    out, lse = subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, return_lse=True)
    ref, ref_lse = oracles.varlen_attention(q, k, v, cu_q, cu_k, causal=True, sinks=sinks)
    _close("out", out, ref, torch.float32)
    _lse_close(lse, ref_lse, atol=1e-5)


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal, window, dtype", [(False, (-1, -1), torch.float16), (True, (-1, -1), torch.bfloat16),
                                                   (True, (9, -1), torch.float16), (False, (6, 2), torch.bfloat16)])
def test_kernels_match_reference(case, causal, window, dtype):
    """The flash kernels at the sequences' positions against the reference on the same inputs: outputs, LSE and
    gradients; GQA, softcap and ALiBi."""
    (q, k, v), cu_q, cu_k = _inputs(case, dtype, d=32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEV)
    results = [_run(lambda q, k, v: subquad.varlen_attention(
        q, k, v, cu_q, cu_k, causal=causal, window_size=window, softcap=4.0, alibi_slopes=slopes, return_lse=True,
        backend=backend), q, k, v) for backend in ("triton", "reference")]
    (out, lse, grads), (ref, ref_lse, ref_grads) = results
    _close("out", out, ref, dtype)
    _lse_close(lse, ref_lse)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, dtype)


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
def test_kernels_deterministic():
    """The deterministic backward at the sequences' positions: the same gradients twice, bit for bit."""
    (q, k, v), cu_q, cu_k = _inputs("prefill", torch.float16, d=32)
    runs = [_run(lambda q, k, v: subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True,
                                                         backend="triton", deterministic=True), q, k, v)
            for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
    ref = _run(lambda q, k, v: subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True,
                                                       backend="reference"), q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), runs[0][2], ref[2]):
        _close(name, a, b, torch.float16)


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.zeros(1, 40, 4, 16)), "q: expected shape \\(total_tokens"),
    (dict(cu_seqlens_q=torch.tensor([1, 5, 40])), "cu_seqlens_q: expected non-decreasing offsets from 0 to 40"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 39])), "cu_seqlens_q: expected non-decreasing offsets from 0 to 40"),
    (dict(cu_seqlens_k=torch.tensor([0, 20, 10, 70])), "cu_seqlens_k: expected non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 70])), "cu_seqlens_k: expected 4 offsets"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 40.0])), "cu_seqlens_q: expected an integer tensor"),
    (dict(window_size=(3,)), "window_size: expected \\(left, right\\)"),
    (dict(window_size=(-2, 0)), "left: expected an integer >= 0, or -1"),
    (dict(max_seqlen_q=10), "max_seqlen_q: expected an integer at least the longest sequence \\(23\\)"),
    (dict(alibi_slopes=torch.ones(2, 4)), "alibi_slopes: expected shape \\(4,\\)"),
    (dict(backend="flex"), "backend: sequences whose query and key lengths differ"),
    (dict(backend="nope"), "backend: expected one of"),
    (dict(cu_seqlens_k=None), "cu_seqlens_k: expected the keys' offsets \\(70 keys, 40 queries\\)"),
    (dict(max_seqlen_q=torch.tensor(10)), "max_seqlen_q: expected an integer at least"),
    (dict(dropout_p=0.1, backend="fa4"), "dropout_p: runs on the 'triton' and 'reference' backends"),
    (dict(dropout_p=1.5), "dropout_p: expected a probability in \\[0, 1\\)"),
])
def test_bad_arguments(change, match):
    (q, k, v), cu_q, cu_k = _inputs("prefill", torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    for name in ("cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"):   # (a max_seqlen tensor stays on the CPU)
        if isinstance(change.get(name), torch.Tensor):
            change[name] = change[name].to(DEV)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        subquad.varlen_attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available() or not subquad.ops.softmax.fa4.is_installed(),
                    reason="needs flash-attn-4 on a GPU")
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (40, -1))])
def test_fa4_route(causal, window):
    """``backend="fa4"`` with unequal lengths: FA4's varlen kernels, against the flash kernels' positions path."""
    cu_q = torch.tensor([0, 100, 228, 229], device=DEV)
    cu_k = torch.tensor([0, 300, 428, 1000], device=DEV)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 128, generator=g).to(DEV, torch.bfloat16).requires_grad_()
               for n, h in ((229, 8), (1000, 2), (1000, 2)))
    results = [_run(lambda q, k, v: subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                                                            return_lse=True, backend=backend), q, k, v)
               for backend in ("fa4", "triton")]
    (out, lse, grads), (ref, ref_lse, ref_grads) = results
    _close("out", out, ref, torch.bfloat16)
    _lse_close(lse, ref_lse, atol=1e-2)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, torch.bfloat16)


def test_offsets_are_prepared_once():
    """A second call with the same offsets (a model's next layer) reuses the positions and BlockMask."""
    from subquad.ops.softmax import varlen

    (q, k, v), cu_q, cu_k = _inputs("prefill", torch.float32)
    with torch.no_grad():
        subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
        kept = dict(varlen._PREPARED)
        assert kept
        subquad.varlen_attention(q, k, v, cu_q.clone(), cu_k.clone(), causal=True)
    assert all(varlen._PREPARED[key] is value for key, value in kept.items()) and len(varlen._PREPARED) == len(kept)


def test_flash_attention_conventions():
    """What code ported from FlashAttention passes: softcap=0.0 (off) and max_seqlen as a tensor or NumPy
    integer."""
    import numpy as np

    (q, k, v), cu_q, cu_k = _inputs("prefill", torch.float32)
    with torch.no_grad():
        ref = subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
        got = subquad.varlen_attention(q, k, v, cu_q, cu_k, torch.tensor(23), np.int64(40), causal=True, softcap=0.0)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_dropout_reference_matches_oracle(case):
    """Dropout at the sequences' positions: the reference drops the pairs that ``dropout.keep_mask`` gives for
    the packed rows, against the oracle run per sequence with those pairs dropped."""
    from subquad.ops.softmax import dropout as dr

    (q, k, v), cu_q, cu_k = _inputs(case, torch.float32)
    torch.manual_seed(7)
    out = subquad.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="reference", dropout_p=0.3)
    torch.manual_seed(7)
    rng = dr.new_rng(q.device, 0.3)
    keep = dr.keep_mask(rng, 1, q.shape[1], q.shape[0], k.shape[0])[0]      # (heads, total_q, total_k)
    ref = torch.zeros_like(out, dtype=torch.float64)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if q1 == q0:
            continue
        o, _ = oracles.softmax_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True,
                                         dropout_keep=keep[None, :, q0:q1, k0:k1], dropout_p=dr.quantized(0.3))
        ref[q0:q1] = o[0]
    _close("out", out, ref, torch.float32)


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
def test_dropout_kernels_match_reference():
    (q, k, v), cu_q, cu_k = _inputs("ragged", torch.float16, d=32)
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(11)
        results.append(_run(lambda q, k, v: subquad.varlen_attention(
            q, k, v, cu_q, cu_k, causal=True, window_size=(9, -1), return_lse=True, backend=backend,
            dropout_p=0.25), q, k, v))
    (out, lse, grads), (ref, ref_lse, ref_grads) = results
    _close("out", out, ref, torch.float16)
    _lse_close(lse, ref_lse)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, torch.float16)

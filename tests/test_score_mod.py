"""``attention(score_mod=...)``: FlexAttention's score modification (a T5-style relative bias table with its
gradient, a score that depends on batch and head) on the reference against the fp64 oracle, on eager flex (CPU)
against the reference, and the backends that refuse it."""

from __future__ import annotations

import pytest
import torch

import oracles
import subquad
from subquad import masks

N, HQ, HKV, D = 40, 4, 2, 16


def _qkv(dtype=torch.float32, nq=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, h, D, generator=g).to(dtype).requires_grad_()
            for n, h in ((nq, HQ), (N, HKV), (N, HKV))]


def _relative_bias(seed=1):
    """A learned bias per head and distance (T5 without buckets), and the score_mod that reads it."""
    table = (0.5 * torch.randn(HQ, 2 * N - 1, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    return table, lambda s, b, h, q, k: s + table[h, q - k + N - 1]


@pytest.mark.parametrize("mask, causal", [(None, False), (None, True), (masks.sliding_window(9), False),
                                          (masks.longformer(8, [0, 1]), False)])
def test_reference_matches_oracle(mask, causal):
    """Outputs, LSE and the gradients of q, k, v and the bias table, with softcap and GQA."""
    q, k, v = _qkv()
    table, mod = _relative_bias()
    results = []
    for fn in (lambda: subquad.attention(q, k, v, causal=causal, mask=mask, softcap=5.0, score_mod=mod,
                                         return_lse=True),
               lambda: oracles.softmax_attention(q, k, v, causal=causal, mask=mask, softcap=5.0, score_mod=mod)):
        out, lse = fn()
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        loss = (out.double() * w).sum() + torch.where(torch.isinf(lse), 0, lse).double().sum()
        results.append((out, lse, torch.autograd.grad(loss, (q, k, v, table))))
    (out, lse, grads), (ref, ref_lse, ref_grads) = results
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        err, scale = (a.double() - b.double()).abs().max().item(), b.abs().max().item()
        assert err <= 1e-5 + 1e-5 * scale, (name, err, scale)
    assert grads[3].abs().sum() > 0


def test_batch_and_head_and_more_queries_than_keys():
    """A score_mod that reads the batch and head indices; bottom-right causal with more queries than keys (the
    positions it sees are the masks' positions)."""
    q, k, v = _qkv(nq=N + 5)
    # (absolute positions too: a shifted position would change the result)
    mod = lambda s, b, h, qp, kp: s * (1.0 + 0.5 * b) - 0.1 * h * (qp - kp) + 0.05 * qp    # noqa: E731
    out, lse = subquad.attention(q, k, v, causal=True, score_mod=mod, return_lse=True)
    ref, ref_lse = oracles.softmax_attention(q, k, v, causal=True, score_mod=mod)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isneginf(ref_lse[:, :, :5]).all()


@pytest.mark.parametrize("nq", [N, N - 13])
def test_no_grad_sinks_alibi(nq):
    """The no-grad path of the reference (in place where it can be), with ALiBi, sinks and fewer queries than
    keys, against the oracle; the score_mod reads absolute positions."""
    q, k, v = (t.detach() for t in _qkv(nq=nq))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    mod = lambda s, b, h, qp, kp: s + 0.03 * qp - 0.02 * kp    # noqa: E731
    with torch.no_grad():
        out, lse = subquad.attention(q, k, v, mask=masks.sliding_window(9), alibi_slopes=slopes, sinks=sinks,
                                     score_mod=mod, return_lse=True)
    ref, ref_lse = oracles.softmax_attention(q, k, v, mask=masks.sliding_window(9), alibi_slopes=slopes,
                                             sinks=sinks, score_mod=mod)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_flex_forward_matches_reference():
    """Eager FlexAttention (the CPU, no backward there) with the same score_mod and pattern."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (t.detach() for t in _qkv(nq=N - 13))       # fewer queries: flex's indices are offset to positions
    table, _ = _relative_bias()
    mod = lambda s, b, h, qp, kp: s + table[h, qp - kp + N - 1] + 0.05 * qp    # noqa: E731
    with torch.no_grad():
        got = subquad.attention(q, k, v, mask=masks.sliding_window(9), score_mod=mod, backend="flex")
        ref = subquad.attention(q, k, v, mask=masks.sliding_window(9), score_mod=mod, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_trainable_capture_alone_keeps_memory_linear(monkeypatch):
    """Only the captured table needs a gradient: the reference still takes its checkpointed path (autograd would
    otherwise keep every score tile)."""
    from subquad.ops.softmax import reference

    calls = []
    monkeypatch.setattr(reference, "checkpoint", lambda fn, *a, **kw: calls.append(1) or fn(*a))
    q, k, v = (t.detach() for t in _qkv())
    table, mod = _relative_bias()
    out = subquad.attention(q, k, v, causal=True, score_mod=mod)
    assert calls and out.requires_grad


def test_compiles_whole():
    """Traced (fullgraph), the reference applies the score_mod as eager does."""
    q, k, v = (t.detach() for t in _qkv())
    table, mod = _relative_bias()
    fn = lambda q, k, v: subquad.attention(q, k, v, causal=True, score_mod=mod)    # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(score_mod=3), "score_mod: expected a callable"),
    (dict(score_mod=lambda s, b, h, q, k: s, backend="triton"), "backend: a score_mod runs on 'flex' or "
                                                                "'reference'"),
    (dict(score_mod=lambda s, b, h, q, k: s, plan=True), "plan: a score_mod"),
    (dict(score_mod=lambda s, b, h, q, k: s, backend="flex", deterministic=True), "use backend='reference'"),
])
def test_refused(kwargs, match):
    q, k, v = _qkv(torch.float16)
    with pytest.raises(ValueError, match=match), torch.no_grad():    # (flex has no CPU backward to refuse first)
        subquad.attention(q, k, v, mask=masks.strided(8), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_gpu_gradients():
    """Compiled flex on CUDA (``auto`` picks it): outputs and the gradients of q, k, v and the bias table against
    the reference."""
    q, k, v = (t.detach().cuda().to(torch.bfloat16).requires_grad_() for t in _qkv())
    table, _ = _relative_bias()
    table = table.detach().cuda().requires_grad_()
    mod = lambda s, b, h, qp, kp: s + table[h, qp - kp + N - 1]    # noqa: E731
    results = []
    for backend in ("auto", "reference"):
        out = subquad.attention(q, k, v, mask=masks.sliding_window(9), score_mod=mod, backend=backend)
        results.append((out, torch.autograd.grad((out.float() ** 2).sum(), (q, k, v, table))))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
        assert err <= 1e-2 + 2e-2 * scale, (name, err, scale)


def test_flex_compiles_whole():
    """``backend="flex"`` inside ``torch.compile(fullgraph=True)`` (its warning filter was not traceable), with a
    pattern and a score_mod; the CPU's compiled flex against eager."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (t.detach() for t in _qkv())
    mask = masks.sliding_window(9)
    fn = lambda q, k, v: subquad.attention(q, k, v, mask=mask, backend="flex",    # noqa: E731
                                           score_mod=lambda s, b, h, qp, kp: s + 0.01 * qp)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), rtol=1e-5, atol=1e-5)

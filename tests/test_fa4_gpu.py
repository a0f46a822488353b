"""FA4 through subquad (``backend="fa4"``) against the reference on the GPU, outputs, LSE and gradients, for
every route and pattern the adapter supports. Skipped without CUDA or without flash-attn-4.

The patterns use the benchmark suite's parameters (``subquad.bench.suites.backends``) at a shorter length
(not a multiple of the 128-token block): FA4's kernels are compiled per mask, not per length, so the
device run compiles each once for the tests and the benchmark together."""

from __future__ import annotations

import logging

import pytest
import torch

from subquad import attention, masks
from subquad.bench.suites.backends import GLOBAL, _doc_ids, _layout
from subquad.ops.softmax import dispatch, fa4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
    pytest.mark.skipif(not fa4.is_installed(), reason="needs flash-attn-4"),
]

N = 2304
CASES = {
    "full": (None, False),
    "causal": (None, True),
    "window": (masks.sliding_window(512), False),
    "document": (masks.document(_doc_ids(N, docs=6)), True),
    "document_window": (masks.document(_doc_ids(N, docs=6)) & masks.sliding_window(512), True),
    "longformer": (masks.longformer(512, GLOBAL, causal=True), False),
    "bigbird": (masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0, causal=True), False),
    "prefix_lm": (masks.prefix_lm(2048), False),
    "block_sparse": (masks.block_sparse(_layout(N, 0.25), 128), True),
    "strided": (masks.strided(256), False),
}
#: patterns that auto leaves to the Triton kernel unless measured (backend="fa4" still runs them)
OTHER_CASES = {
    "fixed": (masks.fixed(128, 8), False),
    "dilated": (masks.dilated(1024, 4), False),
    "scattered_globals": (masks.longformer(256, [0, 7, 300, 1111, 2000]), True),
    "union": (masks.sliding_window(256) | masks.prefix_lm(64), False),
    "bool_tensor": (torch.rand(N, N, generator=torch.Generator().manual_seed(0)) < 0.3, True),
}


def _inputs(batch=1, nq=N, nk=N, hq=16, hkv=16, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, nq, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, nk, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, nk, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def _run(backend, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, return_lse=True, backend=backend, **kw)
    (out.float() * dout).sum().backward()
    return out.float(), lse, [t.grad.float() for t in (q, k, v)]


def _close(name, got, ref, rel, abs_=1e-3):
    # rows that see no key (a block layout can leave some): -inf LSE on both sides, compared as equal
    both_inf = torch.isinf(got) & torch.isinf(ref) & (got == ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{name}: infinities differ"
    err = torch.where(both_inf, torch.zeros_like(got), got - ref).abs().max().item()
    bound = rel * ref[~both_inf].abs().max().item() + abs_
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _check(mask, causal, q, k, v, **kw):
    assert fa4.unsupported_reason(q, k, v, causal=causal, mask=mask, softcap=kw.get("softcap")) is None
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    out, lse, grads = _run("fa4", q, k, v, dout, causal=causal, mask=mask, **kw)
    ref, ref_lse, ref_grads = _run("reference", *(t.float() for t in (q, k, v)), dout, causal=causal, mask=mask,
                                   **kw)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    _close("out", out, ref, 2e-2)
    _close("lse", lse, ref_lse, 0.0, 2e-2)
    for name, g, r in zip("dq dk dv".split(), grads, ref_grads):
        _close(name, g, r, 4e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_fa4_matches_reference(name):
    mask, causal = CASES[name]
    _check(mask, causal, *_inputs())


@pytest.mark.parametrize("name", list(OTHER_CASES))
def test_fa4_other_patterns(name):
    mask, causal = OTHER_CASES[name]
    _check(mask, causal, *_inputs())


def test_fa4_gqa_softcap_and_batch():
    """GQA (16 query heads on 4 KV heads), softcap, batch 2, causal."""
    _check(None, True, *_inputs(batch=2, hkv=4), softcap=30.0)


@pytest.mark.parametrize("name", ["causal", "window"])
def test_fa4_fewer_queries_than_keys(name):
    mask, causal = CASES[name]
    _check(mask, causal, *_inputs(nq=1000))


def test_auto_runs_a_backend_that_can_run_and_says_which(caplog):
    q, k, v = _inputs()
    with caplog.at_level(logging.DEBUG, logger="subquad"):
        out = attention(q, k, v, mask=masks.longformer(512, GLOBAL, causal=True))
    chosen = dispatch.choose(q, k, v, mask=masks.longformer(512, GLOBAL, causal=True))
    assert any(f"auto -> {chosen}" in r.getMessage() for r in caplog.records)
    ref = attention(q, k, v, mask=masks.longformer(512, GLOBAL, causal=True), backend="reference")
    _close("out", out.float(), ref.float(), 2e-2)
    assert "fa4" in dispatch.available_backends()

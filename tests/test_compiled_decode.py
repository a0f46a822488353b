"""Compiled decoding steps (gpt-fast's recipe): a model's one-token forward over its caches compiled whole
(``fullgraph``), once for every step, with the same outputs and cache contents as eager steps."""

from __future__ import annotations

import pytest
import torch

from subquad import masks
from subquad.cache import PagedKVCache, RollingKVCache, StaticKVCache
from subquad.models import HybridLM, hybrid
from subquad.nn import Attention
from subquad.ops.decode import decode
from subquad.ops.grid import interpreting


def _counting_compile(fn, compile=torch.compile):
    """``torch.compile(fn, fullgraph=True)`` run eagerly (aot_eager), and the list of graphs it compiled."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, inputs)

    return compile(fn, backend=backend, fullgraph=True), graphs


@pytest.mark.parametrize("layers", ["ALDK", "LM"])
def test_compiled_steps_equal_eager_steps(layers):
    """Static, rolling (past its window: the ring wraps) and latent caches, and a recurrent state: six
    compiled steps after an eager prefill give the eager steps' logits, lengths and ring contents, from one
    compilation (a host length read while tracing would be a constant: a recompile per token). A recurrent
    state counts its tokens in a host int, which costs one more (dynamo then makes it symbolic)."""
    torch.manual_seed(0)
    model = HybridLM(64, 32, layers, heads=2, mixer_options={"L": {"window": 4}}).eval()
    prompt = torch.randint(0, 64, (2, 5))
    tokens = torch.randint(0, 64, (2, 6))
    eager_caches, traced_caches = model.new_caches(2, 16), model.new_caches(2, 16)
    step, graphs = _counting_compile(model)
    with torch.no_grad():
        model(prompt, eager_caches)
        model(prompt, traced_caches)
        for i in range(tokens.shape[1]):
            want = model(tokens[:, i:i + 1], eager_caches)
            got = step(tokens[:, i:i + 1], traced_caches)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(graphs) == (2 if "M" in layers else 1)
    for e, t in zip(eager_caches, traced_caches):
        if hasattr(e, "seqlens"):
            assert t._lengths == e._lengths == [11, 11]
            torch.testing.assert_close(t.seqlens, e.seqlens)
        if isinstance(e, RollingKVCache):
            assert t._written == e._written
            torch.testing.assert_close(t.k, e.k)


@pytest.mark.parametrize("mask, position", [
    (masks.longformer(3, global_tokens=[0], causal=True), "rope"),
    (masks.strided(3), "alibi"),
    (masks.causal & ~masks.sliding_window(2), "rope"),
])
def test_compiled_pattern_steps_equal_eager_steps(mask, position):
    """A layer with a general pattern decodes sequences of 0 and 5 tokens (then 1 and 6, ...) in one graph:
    the pattern is evaluated at every sequence's own positions over the padded cache, as the eager steps'
    per-length groups evaluate it; the complement's first token sees no key (zeros, not NaN)."""
    torch.manual_seed(3)
    layer = Attention(16, 2, kv_heads=1, mask=mask, position=position, softcap=30.0).eval()
    eager_cache, traced_cache = layer.new_cache(2, 12), layer.new_cache(2, 12)
    prompt = torch.randn(2, 5, 16)
    step, graphs = _counting_compile(layer)
    with torch.no_grad():
        for cache in (eager_cache, traced_cache):
            layer(prompt, cache)
            cache._set_lengths([0, 5])
        for i in range(4):
            x = torch.randn(2, 1, 16)
            want, got = layer(x, eager_cache), step(x, traced_cache)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not got.isnan().any()
    assert len(graphs) == 1
    assert traced_cache.seqlens.tolist() == eager_cache._lengths == [4, 9]


def test_eager_updates_after_compiled_steps_see_the_device_lengths():
    """After traced appends the host copy of the lengths is read back once: an eager rewind of one draft
    token is accepted (it is checked against the lengths), and a rewind past ``max_step - 1`` refused."""
    cache = RollingKVCache(1, window=3, heads_kv=1, head_dim=4, dtype=torch.float32, max_step=2)
    kv = torch.randn(1, 1, 1, 4)
    append, _ = _counting_compile(lambda k: cache.update(k, k).seqlens)
    for _ in range(4):
        append(kv)
    assert cache.seqlens.tolist() == [4] and cache._host_stale
    cache.update(kv, kv, positions=3)        # the last token rewritten
    assert cache._lengths == [4] and cache._written == [4]
    with pytest.raises(ValueError, match="positions: a ring of window 3 and max_step 2 can rewind at most 1"):
        cache.update(kv, kv, positions=2)


def test_traced_ring_update_refuses_a_prefill():
    cache = RollingKVCache(1, window=3, heads_kv=1, head_dim=4, dtype=torch.float32)
    step = torch.compile(lambda k: cache.update(k, k).seqlens, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="run the prefill eagerly"):
        step(torch.randn(1, 3, 1, 4))


# the Triton kernels take CUDA tensors, or CPU ones under the interpreter (a GPU machine's tests without it use CUDA)
KERNEL_DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                   reason="needs the Triton kernels (a GPU or TRITON_INTERPRET=1)")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_compiled_decode_over_uneven_lengths(backend):
    """``decode`` traced over a static cache whose sequences have 0, fewer than ``T``, and more keys: the
    reference masks every sequence at its own length in one call, the kernel runs as a custom op."""
    torch.manual_seed(1)
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    cache = StaticKVCache(3, 24, heads_kv=2, head_dim=16, dtype=torch.float16, device=dev)
    for b, n in enumerate([0, 1, 9]):
        if n:
            kv = torch.randn(1, n, 2, 16, dtype=torch.float16).to(dev)
            cache.k[b, :n], cache.v[b, :n] = kv[0], -kv[0]
    cache._set_lengths([0, 1, 9])
    q = torch.randn(3, 2, 4, 16, dtype=torch.float16).to(dev)
    slopes = torch.rand(4).to(dev)

    def fn(q):
        return decode(q, cache, window=5, softcap=20.0, alibi_slopes=slopes, return_lse=True, backend=backend)

    compiled, graphs = _counting_compile(fn)
    want, got = fn(q), compiled(q)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
    assert len(graphs) == 1
    assert got[0][0].abs().max() == 0 and torch.isinf(got[1][0]).all()      # no key: zeros, LSE -inf
    assert got[0][1, 0].abs().max() == 0 and got[0][1, 1].abs().max() > 0    # the token at position -1 sees none


@needs_kernels
def test_decode_custom_op_passes_opcheck():
    from subquad.ops.decode.op import decode_op

    k = torch.randn(2, 8, 1, 16, dtype=torch.float16).to(KERNEL_DEVICE)
    q = torch.randn(2, 1, 2, 16, dtype=torch.float16).to(KERNEL_DEVICE)
    seqlens = torch.tensor([3, 8], dtype=torch.int32).to(KERNEL_DEVICE)
    torch.library.opcheck(decode_op, (q, k, k.clone(), seqlens, None, None, "dense", 0, 0, 0.25, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_kernels
def test_decode_custom_op_keeps_no_buffer_across_calls(monkeypatch):
    """The custom op (a compiled step's decode) zeroes its own arrival counters instead of keeping a buffer per
    stream across calls: run inside a CUDA graph's memory pool (``mode="reduce-overhead"``), a kept buffer is a
    live allocation the graph does not own, and cudagraph trees refused the step (H100, 2026-12-05). Its outputs
    equal the eager kernel's."""
    from subquad.ops.decode import splitkv
    from subquad.ops.decode.op import decode_op

    dev = KERNEL_DEVICE
    monkeypatch.setattr(splitkv, "_COUNTERS", {})
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 40, 1, 16, generator=g).to(dev, torch.float16) for _ in range(2))
    q = torch.randn(2, 1, 4, 16, generator=g).to(dev, torch.float16)
    seqlens = torch.tensor([17, 40], dtype=torch.int32, device=dev)
    out, lse = decode_op(q, k, v, seqlens, None, None, "dense", 0, 0, 0.25, 0.0)
    assert splitkv._COUNTERS == {}
    want, want_lse = decode(q, k, v, seqlens=seqlens, scale=0.25, return_lse=True, backend="triton")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_step_equals_eager(mode):
    """bf16 GQA on the GPU: cache update + split-KV decode compiled by inductor (and captured in a CUDA graph
    with ``reduce-overhead``: the cache's storage is a static address, written in place) over eight steps."""
    torch.manual_seed(0)
    b, hq, hkv, d, prefill = 2, 8, 2, 64, 300
    caches = [StaticKVCache(b, 512, hkv, d, device="cuda") for _ in range(2)]
    kv = torch.randn(b, prefill, hkv, d, device="cuda", dtype=torch.bfloat16)
    for c in caches:
        c.update(kv, kv)

    def step(cache, q, k, v):
        return decode(q, cache.update(k, v), backend="triton")

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for _ in range(8):
        q, k, v = (torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        want = step(caches[0], q, k, v)
        got = compiled(caches[1], q, k, v).clone()
        assert (got.float() - want.float()).abs().max() < 2e-2
    assert caches[1]._lengths == caches[0]._lengths == [prefill + 8] * b
    torch.testing.assert_close(caches[1].k, caches[0].k)


def test_generate_with_a_compiled_step(monkeypatch):
    """``generate(compile_step=True)`` gives greedy generation's tokens, compiling the step once for two
    calls of different lengths (the caches' storage is rounded up, so its shape repeats; inductor swapped for
    aot_eager: a C++ build per test is minutes on the CI machine)."""
    graphs = []
    real_compile = torch.compile

    def compile_counting(fn, **options):
        compiled, made = _counting_compile(fn)
        graphs.append(made)
        return compiled

    monkeypatch.setattr(torch, "compile", compile_counting)
    monkeypatch.setattr(hybrid, "_COMPILED_FORWARD", None)    # (compiled by an earlier test, if any)
    torch.manual_seed(0)
    model = HybridLM(64, 32, "AL", heads=2, mixer_options={"L": {"window": 4}}).eval()
    prompt = torch.randint(0, 64, (2, 3))
    want = model.generate(prompt, 7, temperature=0)
    assert torch.equal(model.generate(prompt, 7, temperature=0, compile_step=True), want)
    assert torch.equal(model.generate(prompt[:, :2], 4, temperature=0, compile_step=True),
                       model.generate(prompt[:, :2], 4, temperature=0))
    assert len(graphs) == 1 and len(graphs[0]) == 1
    assert real_compile is not torch.compile
    with pytest.raises(ValueError, match="compile_step: expected use_cache=True"):
        model.generate(prompt, 2, use_cache=False, compile_step=True)


def test_compiled_steps_over_reserved_pages_equal_static_ones():
    """A paged cache's traced update writes through the block table into pages reserved beforehand
    (``reserve``): compiled steps give what eager steps over a static cache give; reserving past the pool
    or the table is refused."""
    torch.manual_seed(2)
    static = StaticKVCache(2, 32, heads_kv=1, head_dim=8, dtype=torch.float32)
    paged = PagedKVCache(num_pages=11, page_size=4, heads_kv=1, head_dim=8, dtype=torch.float32, batch=2,
                         max_pages_per_seq=6)
    kv = torch.randn(2, 5, 1, 8)
    for c in (static, paged):
        c.update(kv, -kv)
    paged.reserve([9, 13])

    def step(cache, q, k):
        return decode(q, cache.update(k, k), backend="reference")

    compiled, graphs = _counting_compile(step)
    for _ in range(4):
        q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 1, 8)
        torch.testing.assert_close(compiled(paged, q, k), step(static, q, k))
    assert len(graphs) == 1 and paged._lengths == [9, 9] and paged.pages_in_use == 3 + 4
    with pytest.raises(ValueError, match="tokens: sequence 1 would need 7 pages"):
        paged.reserve([4, 28])
    with pytest.raises(ValueError, match="tokens: the pool is out of pages"):
        paged.reserve(24)


def test_compiled_step_does_not_keep_its_model_alive():
    """The compiled step was kept per model in a weak-keyed table whose value, the compiled bound
    ``model.forward``, held its key: no model that compiled a step was ever freed (nor its parameters)."""
    import gc
    import weakref

    model = HybridLM(64, 32, "A", heads=2).eval()
    step = model.compiled_step()
    ref = weakref.ref(model)
    del model, step
    gc.collect()
    assert ref() is None

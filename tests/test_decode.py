"""subquad.decode: the split-KV kernel (under the interpreter on CPU) against the per-layout reference, the
reference against the fp64 oracle over the whole stream of tokens, for every cache layout."""

from __future__ import annotations

import pytest
import torch

from oracles import decode_attention
from subquad.cache import LatentKVCache, PagedKVCache, RollingKVCache, StaticKVCache
from subquad.ops.decode import decode
from subquad.ops.grid import interpreting

TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles, several splits: the merge, empty splits and partial tiles all run
SMALL = dict(block_n=16, num_splits=3)


def _cache(layout, b, hkv, d, max_len, window=None, max_step=1, dtype=torch.float32):
    if layout == "static":
        return StaticKVCache(b, max_len, hkv, d, dtype, DEV)
    if layout == "paged":
        return PagedKVCache(b * (max_len // 8 + 1), 8, hkv, d, dtype, DEV, batch=b)
    return RollingKVCache(b, window, hkv, d, dtype, DEV, max_step=max_step)


def _fill(cache, k_stream, v_stream, lengths, t):
    """Write stream[b, :lengths[b]] into the cache: the common prefix, then the last ``t`` tokens of each
    sequence at its own position (rewriting the tail of the shorter ones)."""
    n = max(lengths)
    if n > t:
        cache.update(k_stream[:, :n - t], v_stream[:, :n - t])
    idx = torch.tensor(lengths).view(-1, 1) - t + torch.arange(t)
    bidx = torch.arange(len(lengths)).view(-1, 1)
    starts = torch.tensor(lengths) - t if len(set(lengths)) > 1 else None
    return cache.update(k_stream[bidx, idx], v_stream[bidx, idx], positions=starts), idx


def _inputs(b, t, hq, hkv, d, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, n, hkv, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, n, hkv, d, generator=g).to(DEV, dtype)
    return q, k, v


def _oracle(q, k, v, lengths, **kw):
    """The fp64 oracle runs on the CPU whatever the device of the inputs."""
    kw = {n: (x.cpu() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    return decode_attention(q.cpu(), k.cpu(), v.cpu(), lengths, **kw)


def _close(a, b, tol=2e-5):
    assert torch.allclose(a.double().cpu(), b.double().cpu(), atol=tol, rtol=tol), (a.double().cpu() - b.double().cpu()).abs().max()


@pytest.mark.parametrize("layout", ["static", "paged"])
@pytest.mark.parametrize("opts", [{}, {"window": 9, "softcap": 3.0}, {"alibi": True}])
def test_reference_matches_oracle(layout, opts):
    b, t, hq, hkv, d = 2, 3, 4, 2, 16
    lengths = [37, 21]
    q, k, v = _inputs(b, t, hq, hkv, d, max(lengths))
    view, _ = _fill(_cache(layout, b, hkv, d, 64), k, v, lengths, t)
    slopes = torch.rand(hq, device=DEV) if opts.get("alibi") else None
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"), alibi_slopes=slopes)
    out = decode(q, view, backend="reference", **kw)
    _close(out, _oracle(q, k, v, lengths, **kw), 1e-5)


def test_rolling_reference_is_sliding_window_at_every_step():
    """Stream 40 tokens through a ring of W = 8 slots: after each step, the output over the ring equals
    sliding-window attention over the whole stream, and the ring never grows."""
    b, hq, hkv, d, w = 2, 4, 2, 16, 8
    q, k, v = _inputs(b, 40, hq, hkv, d, 40)
    cache = _cache("ring", b, hkv, d, 0, window=w)
    nbytes = cache.nbytes
    for i in range(40):
        view = cache.update(k[:, i:i + 1], v[:, i:i + 1])
        out = decode(q[:, i:i + 1], view, backend="reference")
        _close(out, _oracle(q[:, i:i + 1], k, v, [i + 1] * b, window=w), 1e-5)
        assert cache.nbytes == nbytes
    assert cache.k.shape[1] == w


def test_rolling_prefill_then_speculative_steps():
    """A prefill longer than the ring returns a dense view; then steps of 3 tokens (max_step=3) read the ring."""
    b, hq, hkv, d, w = 1, 2, 1, 16, 6
    q, k, v = _inputs(b, 30, hq, hkv, d, 30)
    cache = _cache("ring", b, hkv, d, 0, window=w, max_step=3)
    view = cache.update(k[:, :20], v[:, :20])
    assert view.layout == "dense"
    _close(decode(q[:, :20], view, backend="reference"), _oracle(q[:, :20], k, v, [20], window=w), 1e-5)
    for i in (20, 23, 26):
        view = cache.update(k[:, i:i + 3], v[:, i:i + 3])
        assert view.layout == "ring"
        _close(decode(q[:, i:i + 3], view, backend="reference"),
               _oracle(q[:, i:i + 3], k, v, [i + 3], window=w), 1e-5)


@needs_triton
@pytest.mark.parametrize("layout,t,opts", [
    ("static", 1, {}),
    ("static", 4, {"window": 11, "alibi": True}),
    ("paged", 1, {"softcap": 2.0}),
    ("paged", 4, {"window": 11}),
])
def test_triton_matches_reference(layout, t, opts):
    b, hq, hkv, d = 2, 8, 2, 32
    lengths = [45, 17]
    q, k, v = _inputs(b, t, hq, hkv, d, max(lengths))
    view, _ = _fill(_cache(layout, b, hkv, d, 64), k, v, lengths, t)
    slopes = torch.rand(b, hq, device=DEV) if opts.get("alibi") else None
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"), alibi_slopes=slopes)
    out, lse = decode(q, view, backend="triton", return_lse=True, **kw, **SMALL)
    ref, ref_lse = decode(q, view, backend="reference", return_lse=True, **kw)
    _close(out, ref)
    _close(lse, ref_lse)


@needs_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_one_split_and_v_column_blocks(splits):
    """One split writes the output itself; with V cut into column blocks, the program that merges a column
    block finds every split's LSE written; the arrival counters are back at zero after each call."""
    from subquad.ops.decode.splitkv import _COUNTERS

    b, hq, hkv, d = 2, 4, 2, 64
    lengths = [45, 17]
    q, k, v = _inputs(b, 1, hq, hkv, d, max(lengths))
    view, _ = _fill(_cache("static", b, hkv, d, 64), k, v, lengths, 1)
    ref, ref_lse = decode(q, view, backend="reference", return_lse=True)
    for _ in range(2):
        out, lse = decode(q, view, backend="triton", return_lse=True, block_n=16, num_splits=splits, block_dv=16)
        _close(out, ref)
        _close(lse, ref_lse)
        assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())


@needs_triton
def test_triton_ring_matches_sliding_window():
    """The kernel reads the ring in place (slot -> position mapping) with 2 new tokens per step."""
    b, hq, hkv, d, w = 2, 4, 1, 32, 13
    q, k, v = _inputs(b, 40, hq, hkv, d, 40)
    cache = _cache("ring", b, hkv, d, 0, window=w, max_step=2)
    cache.update(k[:, :30], v[:, :30])
    for i in (30, 32):
        view = cache.update(k[:, i:i + 2], v[:, i:i + 2])
        out = decode(q[:, i:i + 2], view, backend="triton", **SMALL)
        _close(out, _oracle(q[:, i:i + 2], k, v, [i + 2] * b, window=w))


@needs_triton
def test_triton_paged_equals_static():
    b, hq, hkv, d = 3, 4, 2, 16
    lengths = [50, 9, 33]
    q, k, v = _inputs(b, 2, hq, hkv, d, 50)
    outs = [decode(q, _fill(_cache(layout, b, hkv, d, 64), k, v, lengths, 2)[0], backend="triton", **SMALL)
            for layout in ("static", "paged")]
    _close(outs[0], outs[1], 1e-6)


@needs_triton
def test_triton_mqa_odd_head_dim_plain_tensors():
    """MQA (one KV head), head_dim 48 (not a power of 2), K/V as tensors with per-sequence lengths, more
    splits than blocks (empty splits merge to nothing)."""
    b, hq, d = 2, 3, 48
    q, k, v = _inputs(b, 1, hq, 1, d, 24)
    seqlens = torch.tensor([24, 5], device=DEV)
    out = decode(q, k, v, seqlens=seqlens, backend="triton", block_n=16, num_splits=4)
    _close(out, _oracle(q, k, v, [24, 5]))


@needs_triton
def test_triton_latent_layout():
    """MLA's shared K/V rows: K = [c_kv, k_rope] (32 + 16), V = c_kv (a view of the same storage)."""
    b, hq, r, dr = 2, 16, 32, 16
    g = torch.Generator().manual_seed(1)
    cache = LatentKVCache(b, 40, r, dr, torch.float32, DEV)
    c = torch.randn(b, 30, r, generator=g).to(DEV)
    kr = torch.randn(b, 30, dr, generator=g).to(DEV)
    view = cache.update(c, kr)
    q = torch.randn(b, 2, hq, r + dr, generator=g).to(DEV)
    out = decode(q, view, backend="triton", **SMALL)
    assert out.shape == (b, 2, hq, r)
    k = torch.cat([c, kr], -1).unsqueeze(2)
    _close(out, _oracle(q, k, c.unsqueeze(2), [30, 30]))
    _close(out, decode(q, view, backend="reference"))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_latent_scores_split_by_keys(dtype):
    """64 heads a tile and 8 warps (the MLA suite's configuration): the scores' tile split between the warpgroups
    (``split_score_tile``), over several tiles a split, a ragged last tile and a sequence shorter than the other;
    equal to the chained dots and to the oracle."""
    b, hq, r, dr = 2, 64, 32, 16
    g = torch.Generator().manual_seed(2)
    cache = LatentKVCache(b, 80, r, dr, dtype, DEV)
    c = torch.randn(b, 75, r, generator=g).to(DEV, dtype)
    kr = torch.randn(b, 75, dr, generator=g).to(DEV, dtype)
    view = cache.update(c, kr)
    view.seqlens[1] = 40
    q = torch.randn(b, 1, hq, r + dr, generator=g).to(DEV, dtype)
    opts = dict(block_n=16, num_splits=2, block_m=64, num_warps=8)
    out = decode(q, view, backend="triton", split_score_tile=True, **opts)
    direct = decode(q, view, backend="triton", split_score_tile=False, **opts)
    k = torch.cat([c, kr], -1).unsqueeze(2)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    _close(out, _oracle(q.float(), k.float(), c.unsqueeze(2).float(), [75, 40]), tol)
    _close(out, direct, tol)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_sequences_shorter_than_the_new_tokens_see_no_key(backend):
    """Three new tokens against lengths 7, 2 and 0 (a freed slot of a batch): a token at a position below 0
    sees no key (zeros, LSE -inf), the others their keys as usual; the reference raised on the empty one."""
    q, k, v = _inputs(3, 3, 4, 2, 16, 7)
    lengths = [7, 2, 0]
    out, lse = decode(q, k, v, seqlens=torch.tensor(lengths), backend=backend, return_lse=True,
                      **(SMALL if backend == "triton" else {}))
    _close(out, _oracle(q, k, v, lengths))
    assert torch.isneginf(lse[1, :, 0]).all() and torch.isneginf(lse[2]).all() and torch.isfinite(lse[0]).all()
    assert out[2].abs().max() == 0 and out[1, 0].abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_sinks(backend):
    """GPT-OSS's per-head sinks in decoding: a key every query sees, with a zero value."""
    q, k, v = _inputs(2, 2, 4, 2, 16, 12)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    out = decode(q, k, v, seqlens=torch.tensor([12, 3]), sinks=sinks, backend=backend,
                 **(SMALL if backend == "triton" else {}))
    _close(out, _oracle(q, k, v, [12, 3], sinks=sinks))
    with pytest.raises(ValueError, match="sinks"):
        decode(q, k, v, sinks=sinks[:2], backend=backend)


@needs_triton
def test_triton_reads_strided_key_rows():
    """K and V whose last dimension is not contiguous (every second column of a wider tensor): the kernel
    reads rows with unit stride, so such views are copied first (it read the wrong columns)."""
    q, k, v = _inputs(2, 1, 4, 2, 16, 12)
    wide = torch.randn(2, 12, 2, 32, device=DEV)
    out = decode(q, wide[..., ::2], v.transpose(1, 3).contiguous().transpose(1, 3), backend="triton", **SMALL)
    _close(out, _oracle(q, wide[..., ::2], v, [12, 12]))


def test_bad_inputs():
    q, k, v = _inputs(2, 1, 4, 2, 16, 10)
    with pytest.raises(ValueError, match="seqlens"):
        decode(q, k, v, seqlens=torch.tensor([11, 3]))
    with pytest.raises(ValueError, match="seqlens"):
        decode(q, k, v, seqlens=torch.tensor([10, -3]))
    with pytest.raises(ValueError, match="softcap"):
        decode(q, k, v, softcap=float("inf"))
    with pytest.raises(ValueError, match="window"):
        decode(q, k, v, window=True)
    with pytest.raises(ValueError, match="v: expected dtype"):
        decode(q, k, v.half())
    with pytest.raises(ValueError, match="q"):
        decode(q[..., :8], k, v)
    with pytest.raises(ValueError, match="heads_q"):
        decode(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="seqlens"):
        decode(q, k, v, seqlens=torch.tensor([3]))
    with pytest.raises(ValueError, match="window"):
        decode(q, k, v, window=0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        decode(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        decode(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="kv"):
        decode(q, k)
    cache = RollingKVCache(2, 4, 2, 16, torch.float32, DEV)
    cache.update(k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="new tokens per step"):
        decode(q.expand(2, 2, 4, 16), cache)
    with pytest.raises(ValueError, match="the cache's window 4"):
        decode(q, cache, window=5)       # the ring keeps only the keys its own window needs
    with pytest.raises(ValueError, match="16 new tokens"):
        decode(torch.randn(2, 17, 4, 16, device=DEV), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("layout,t", [("static", 1), ("paged", 1), ("static", 4), ("ring", 2)])
def test_gpu_bf16_matches_reference(layout, t):
    """bf16 on the GPU (compiled kernel, default launch options): GQA 32/8, head_dim 128, lengths not
    multiples of any block, against the reference (fp32 accumulation)."""
    b, hq, hkv, d = 3, 32, 8, 128
    lengths = [3001, 517, 1800] if layout != "ring" else [3001] * 3
    q, k, v = _inputs(b, t, hq, hkv, d, 3001, dtype=torch.bfloat16)
    if layout == "ring":
        cache = _cache("ring", b, hkv, d, 0, window=1000, max_step=2, dtype=torch.bfloat16)
        cache.update(k[:, :-t], v[:, :-t])
        view = cache.update(k[:, -t:], v[:, -t:])
    else:
        view, _ = _fill(_cache(layout, b, hkv, d, 3072, dtype=torch.bfloat16), k, v, lengths, t)
    out = decode(q, view, backend="triton", softcap=30.0)
    ref = decode(q, view, backend="reference", softcap=30.0)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2, err
    assert torch.isfinite(out).all()


@needs_triton
def test_device_lengths_far_below_the_storage():
    """Lengths given only as a device tensor: the grid is sized by the storage (no read-back of the lengths),
    so most splits of the short sequences are empty; the result is unchanged."""
    b, hq, hkv, d = 2, 4, 2, 32
    q, k, v = _inputs(b, 1, hq, hkv, d, 256)
    seqlens = torch.tensor([5, 40], device=DEV)
    out = decode(q, k, v, seqlens=seqlens, backend="triton", block_n=16)
    _close(out, _oracle(q, k, v, [5, 40]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_decode_step_never_waits_on_the_device():
    """A decode step on device lengths launches without a device-to-host read (CUDA's sync debug mode
    raises on one)."""
    q, k, v = _inputs(2, 1, 8, 2, 64, 512, dtype=torch.bfloat16)
    seqlens = torch.tensor([100, 512], device=DEV, dtype=torch.int32)
    decode(q, k, v, seqlens=seqlens, backend="triton")          # compiles and allocates first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode(q, k, v, seqlens=seqlens, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_decode_replays_in_a_cuda_graph():
    """A decode step captured once in a CUDA graph serves later steps: the lengths are read on the device
    (updated in place between replays) and the split-KV arrival counters reset themselves."""
    q, k, v = _inputs(2, 1, 8, 2, 64, 512, dtype=torch.bfloat16)
    seqlens = torch.tensor([100, 300], device=DEV, dtype=torch.int32)
    decode(q, k, v, seqlens=seqlens, backend="triton")          # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = decode(q, k, v, seqlens=seqlens, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for lengths in ([100, 300], [101, 512], [7, 250]):
        seqlens.copy_(torch.tensor(lengths))
        graph.replay()
        want = decode(q, k, v, seqlens=seqlens, backend="reference")
        assert (out.float() - want.float()).abs().max() < 2e-2, lengths


def test_split_count_fills_whole_waves():
    from subquad.ops.decode.splitkv import _split_count

    slots = 3 * 132
    assert _split_count(64, slots, 32) == 6           # the H100 sweep's best: one wave of 384 programs
    for programs, most in ((512, 32), (128, 16), (4096, 64), (8, 32), (1000, 1)):
        s = _split_count(programs, slots, most)
        assert 1 <= s <= most
        waves = -(-programs * s // slots)
        fill = programs * s / (waves * slots)
        best = max(programs * t / (-(-programs * t // slots) * slots) for t in range(1, most + 1))
        assert fill >= 0.95 or fill == best


@needs_triton
def test_ring_rewinds_are_measured_from_the_furthest_token_written():
    """Window 4, drafts of up to 3 tokens (6 slots): drafts at 10-12, then rewinds to 11, 10 and 9, each at
    most 2 behind the current length, were all accepted; but draft 12 overwrote the slot of position 6, which
    the query at 9 sees (the reference dropped the key, the kernel read the draft as position 6). A rewind
    reaching at most ``max_step`` behind the furthest token written stays exact; one further is refused."""
    q, k, v = _inputs(1, 13, 2, 1, 8, 13)
    cache = _cache("ring", 1, 1, 8, 0, window=4, max_step=3)
    cache.update(k[:, :10], v[:, :10])
    junk = torch.full_like(k[:, :2], 9.0)
    cache.update(torch.cat([k[:, 10:11], junk], 1), torch.cat([v[:, 10:11], junk], 1))    # drafts at 10-12
    for s in (11, 10):
        view = cache.update(k[:, s:s + 1], v[:, s:s + 1], positions=s)
        want = _oracle(q[:, s:s + 1], k, v, [s + 1], window=4)
        _close(decode(q[:, s:s + 1], view, backend="reference"), want)
        _close(decode(q[:, s:s + 1], view, backend="triton", **SMALL), want)
    with pytest.raises(ValueError, match=r"positions: a ring of window 4 and max_step 3 keeps .* got 9"):
        cache.update(k[:, 9:10], v[:, 9:10], positions=9)
    assert cache._lengths == [11] and cache._written == [13]     # a refused update changes nothing

"""Triton chunk kernels of the linear engine (run by the interpreter on CPU) against the chunked reference:
outputs and gradients of q, k, v, log_decay and initial_state, for every decay kind, chunk sizes 16/32/64,
lengths not a multiple of the chunk, packed sequences, decays near 0 and 1, and the recurrent decode kernel."""

import pytest
import torch

import subquad
from subquad.ops.grid import interpreting

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, DK, DV = 2, 16, 32


def _inputs(kind, b, t, seed=0, low=-1.0, n_states=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, H, DK, generator=gen) for _ in range(2))
    v = torch.randn(b, t, H, DV, generator=gen)
    shape = {"none": None, "head": (H,), "scalar": (b, t, H), "vector": (b, t, H, DK)}[kind]
    g = None if shape is None else torch.rand(*shape, generator=gen) * low
    s0 = torch.randn(n_states or b, H, DK, DV, generator=gen)
    return [None if x is None else x.to(DEV) for x in (q, k, v, g, s0)]


def _run(backend, tensors, **kw):
    # the reference in fp64: the specification without rounding errors of its own. In fp32 on this CPU (torch
    # 2.13, AMX) its first gated call in some processes came out up to 8e-4 (1e-5 relative) off, failing the
    # 2e-4 tolerance at random, while the kernels stayed within 2e-6 of fp64
    dtype = torch.float64 if backend == "reference" else None
    leaves = [None if x is None else x.to(dtype or x.dtype).clone().requires_grad_() for x in tensors]
    q, k, v, g, s0 = leaves
    o, s = subquad.gla(q, k, v, g, initial_state=s0, output_state=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    ((o * do).sum() + (s * ds).sum()).backward()
    return [o, s] + [None if x is None else x.grad for x in leaves]


def _assert_match(got, want, atol=2e-4, rtol=2e-4):
    names = ["o", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]
    for name, a, b in zip(names, got, want):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind, chunk, t", [("none", 16, 40), ("head", 32, 50), ("scalar", 64, 70),
                                            ("scalar", 16, 33), ("vector", 16, 40), ("vector", 32, 45)])
def test_chunk_kernel_matches_reference(kind, chunk, t, forward_form):
    tensors = _inputs(kind, 2, t)
    _assert_match(_run("triton", tensors, chunk_size=chunk), _run("reference", tensors, chunk_size=chunk))


def test_constant_decay_without_its_gradient(forward_form):
    """A per-head decay that takes no gradient (RetNet's fixed gammas) runs the backward kernels on the constant
    too (GATE 3) rather than on a per-token copy: packed sequences, one longer than a segment."""
    cu = torch.tensor([0, 13, 13, 60], device=DEV)
    q, k, v, g, s0 = _inputs("head", 1, 60, n_states=3)

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
        o, s = subquad.gla(*leaves[:3], g, initial_state=leaves[3], output_state=True, cu_seqlens=cu,
                           chunk_size=16, backend=backend)
        ((o * o.detach().sin()).sum() + s.sum()).backward()
        return [o, s] + [x.grad for x in leaves]

    for got, want in zip(run("triton"), run("reference")):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["head", "scalar", "vector"])
def test_chunk_kernel_varlen(kind, forward_form):
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    tensors = _inputs(kind, 1, 60, n_states=4)
    _assert_match(_run("triton", tensors, chunk_size=16, cu_seqlens=cu),
                  _run("reference", tensors, chunk_size=16, cu_seqlens=cu))


@pytest.mark.parametrize("kind, low", [("scalar", -40.0), ("vector", -40.0), ("vector", -1e-6)])
def test_chunk_kernel_decay_extremes(kind, low, forward_form):
    tensors = _inputs(kind, 1, 40, low=low)
    got = _run("triton", tensors, chunk_size=32)
    assert all(torch.isfinite(x).all() for x in got if x is not None)
    _assert_match(got, _run("reference", tensors, chunk_size=32))


@pytest.mark.parametrize("decay_grad", [False, True])
def test_strong_constant_decay_in_a_short_last_chunk(decay_grad, forward_form):
    """A per-head decay of e^-10 a token (GATE 3) with the last chunk 8 of 32 rows long: the 24 rows past the
    sequence's end once took exp(b_last - b_i) = e^240 = inf, times their zero values a NaN state (forward) and
    NaN gradients (backward, which runs GATE 3 when the decay takes no gradient)."""
    q, k, v, g, s0 = _inputs("head", 1, 40, low=-40.0)
    assert float(g.min()) < -88 / 24      # e^(24 |g|) past fp32's range

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
        if not decay_grad:
            leaves[3].requires_grad_(False)
        o, s = subquad.gla(*leaves[:4], initial_state=leaves[4], output_state=True, chunk_size=32, backend=backend)
        ((o * o.detach().sin()).sum() + s.sum()).backward()
        return [o, s] + [x.grad for x in leaves]

    got, want = run("triton"), run("reference")
    assert all(torch.isfinite(x).all() for x in got if x is not None)
    _assert_match(got[:5] + got[6:], want[:5] + want[6:])
    if decay_grad:
        # it sums q.dq - k.dk over the tokens, terms of ~10 cancelling to ~1e-3: fp32 leaves ~1e-5 a token in it
        # (the reference differentiates the decayed products instead)
        torch.testing.assert_close(got[5], want[5], atol=2e-3, rtol=2e-4)


@pytest.mark.parametrize("safe_only", [False, True])
def test_vector_decay_both_intra_chunk_forms(safe_only, monkeypatch):
    """chunk_intra takes one matmul per chunk where the chunk's decays spread little and sub-blocks elsewhere:
    chunks of both kinds in one call (the first two spread by hundreds, the last by < 16), then the safe form
    forced on every chunk."""
    from subquad.ops.linear import chunk

    if safe_only:
        monkeypatch.setattr(chunk, "_max_spread", lambda dtype: 0.0)
    q, k, v, g, s0 = _inputs("vector", 2, 48)
    g = g.clone()
    g[:, :20] *= 40.0
    tensors = [q, k, v, g, s0]
    _assert_match(_run("triton", tensors, chunk_size=16), _run("reference", tensors, chunk_size=16))


def test_chunk_kernel_state_handoff(forward_form):
    q, k, v, g, s0 = _inputs("vector", 1, 50)
    o_all, s_all = subquad.gla(q, k, v, g, initial_state=s0, output_state=True, chunk_size=16, backend="triton")
    o1, s1 = subquad.gla(q[:, :21], k[:, :21], v[:, :21], g[:, :21], initial_state=s0, output_state=True,
                         chunk_size=16, backend="triton")
    o2, s2 = subquad.gla(q[:, 21:], k[:, 21:], v[:, 21:], g[:, 21:], initial_state=s1, output_state=True,
                         chunk_size=16, backend="triton")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s_all, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["none", "scalar", "vector"])
def test_recurrent_kernel_matches_reference(kind):
    q, k, v, g, s0 = _inputs(kind, 2, 3)
    with torch.no_grad():
        o, s = subquad.gla_step(q, k, v, s0, g, backend="triton")
        o_ref, s_ref = subquad.gla_step(q, k, v, s0, g, backend="reference")
        o1, s1 = subquad.gla_step(q[:, 0], k[:, 0], v[:, 0], s0, None if g is None else g[:, 0], backend="triton")
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o1, o_ref[:, 0], atol=1e-5, rtol=1e-5)


# The Triton 3.9 interpreter multiplies bf16 tiles in tl.dot as raw integers, so half precision is checked with
# fp16 there and with bf16 on the GPU.
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


@pytest.mark.parametrize("kind", ["head", "scalar", "vector"])
def test_chunk_kernel_half_close_to_fp32_reference(kind, forward_form):
    q, k, v, g, s0 = _inputs(kind, 1, 64, low=-0.2)
    o = subquad.gla(q.to(HALF), k.to(HALF), v.to(HALF), g, chunk_size=32, backend="triton")
    ref = subquad.gla(q, k, v, g, chunk_size=32, backend="reference")
    assert o.dtype == HALF
    assert (o.float() - ref).abs().max() < 2e-2 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at model sizes: the GPU check of gated gradients")
@pytest.mark.parametrize("kind", ["none", "head", "scalar", "vector"])
def test_chunk_kernel_bf16_gradients_on_gpu(kind, forward_form):
    """Triton 3.6 on Hopper miscompiles some gated chunk kernels (fla refuses its gated backward there), so the
    gated gradients are checked on the GPU, in bf16, at K = V = 128 and chunk 64, against the fp32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, d = 2, 300, 4, 128
    q, k, v = (torch.randn(b, t, h, d, generator=gen, device="cuda") for _ in range(3))
    g = None
    if kind != "none":
        shape = {"head": (h,), "scalar": (b, t, h), "vector": (b, t, h, d)}[kind]
        g = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, device="cuda") + 3.0)
    s0 = torch.randn(b, h, d, d, generator=gen, device="cuda") * 0.1
    do = torch.randn(b, t, h, d, generator=gen, device="cuda")

    def grads(dtype, backend):
        leaves = [None if x is None else x.to(dtype if x is not g and x is not s0 else x.dtype).requires_grad_()
                  for x in (q, k, v, g, s0)]
        o, s = subquad.gla(*leaves[:4], initial_state=leaves[4], output_state=True, backend=backend)
        ((o.float() * do).sum() + s.sum()).backward()
        return [o] + [x.grad for x in leaves if x is not None]

    for got, want in zip(grads(torch.bfloat16, "triton"), grads(torch.float32, "reference")):
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on the GPU only")
@pytest.mark.parametrize("op", ["linear", "retention", "ssd", "gla", "delta", "gated_delta"])
def test_fwd_bwd_never_waits_for_the_gpu(op):
    """A host sync in the middle of a backward leaves the GPU idle while the host queues what follows (the
    gated delta rule's fwd+bwd took 5.0 ms for 3.8 ms of kernels with a boolean index in its backward)."""
    from subquad.bench.suites.linear import _make_inputs, _ours

    x = _make_inputs(op, 2, 256, 4, 64, torch.bfloat16, True)(torch.device("cuda"))
    run = _ours(op, "triton")
    out = run(x)
    out.backward(torch.ones_like(out))                 # compiles and tunes first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(x)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fixed_length_tables_are_made_once_per_shape():
    """Equal-length batches reuse their chunk tables (eight small launches each time otherwise); packed
    sequences get their own; both equal a fresh build."""
    from subquad.ops.linear.chunk import ChunkTables, chunk_tables

    first = chunk_tables(None, 3, 100, 16, "cpu")
    assert chunk_tables(None, 3, 100, 16, torch.device("cpu")) is first
    fresh = ChunkTables(None, 3, 100, 16, "cpu")
    for name in ("cu", "chunk_indices", "chunk_offsets"):
        assert torch.equal(getattr(first, name), getattr(fresh, name))
    assert (first.n_seqs, first.n_chunks, first.tune_key) == (fresh.n_seqs, fresh.n_chunks, fresh.tune_key)
    cu = torch.tensor([0, 100, 300])
    assert chunk_tables(cu, 1, 300, 16, "cpu") is not chunk_tables(cu, 1, 300, 16, "cpu")


def test_segment_split_cuts_whole_chunks(monkeypatch):
    """Segments are whole chunks of each sequence (the last one shorter; none for an empty sequence), and by
    default only sequences too few to fill the GPU are cut: 1 x 32k with 16 heads into 8 segments of 64 chunks
    (256 programs), 4 x 8k (128 programs) not; a sequence into 32 segments at most."""
    from conftest import set_forward_form
    from subquad.ops.linear.chunk import chunk_tables
    from subquad.ops.linear.chunk_split import segment_split

    long_one = chunk_tables(None, 1, 32768, 64, "cpu")
    assert segment_split(long_one, 16, 128, 128).n_segs == 8
    assert segment_split(long_one, 16, 128, 128) is segment_split(long_one, 16, 128, 128)  # made once per shape
    assert segment_split(chunk_tables(None, 4, 8192, 64, "cpu"), 16, 128, 128) is None
    assert segment_split(chunk_tables(None, 1, 32768, 64, "cpu"), 16, 256, 128) is None
    assert segment_split(chunk_tables(None, 1, 1 << 20, 64, "cpu"), 1, 64, 64).n_segs == 32   # not 128
    set_forward_form(monkeypatch, "split", segment_chunks=2)
    split = segment_split(chunk_tables(torch.tensor([0, 13, 13, 47, 60]), 1, 60, 16, "cpu"), H, DK, DV)
    assert split.tables.cu.tolist() == [0, 13, 45, 47, 60]
    assert split.first.tolist() == [0, 1, 1, 3, 4]


@pytest.mark.parametrize("kind", ["none", "scalar", "vector"])
def test_split_form_walks_segments_in_two_passes_too(kind, monkeypatch):
    """Segments whose programs are too few for the fused walk take the two passes: the forward computes each
    segment's own state, then walks the segments; the backward recomputes the states on the segments, computes
    each segment's own d initial_state, then walks them in reverse. Outputs and gradients match the reference,
    with an empty sequence among the packed ones."""
    from conftest import set_forward_form
    from subquad.ops.linear import chunk

    set_forward_form(monkeypatch, "split-two-pass")
    walks = []
    for name in ("launch_state_fwd", "launch_state_bwd", "launch_fused_fwd"):
        def spy(*a, _launch=getattr(chunk, name), _name=name, **kw):
            walks.append((_name, kw.get("segments") is not None))
            return _launch(*a, **kw)
        monkeypatch.setattr(chunk, name, spy)
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    tensors = _inputs(kind, 1, 60, n_states=4)
    _assert_match(_run("triton", tensors, chunk_size=16, cu_seqlens=cu),
                  _run("reference", tensors, chunk_size=16, cu_seqlens=cu))
    assert walks == [("launch_state_fwd", False), ("launch_state_fwd", True), ("launch_state_fwd", True),
                     ("launch_state_bwd", False), ("launch_state_bwd", True)]


@pytest.mark.parametrize("kind", ["none", "head", "scalar", "vector"])
def test_launches_split_past_the_grid_limit(kind, forward_form, monkeypatch):
    """CUDA takes at most 65,535 programs on grid axes 1 and 2 (2,048 packed sequences x 32 heads, or 1M tokens in
    chunks of 16, are past it): the launchers then split the axis into launches with a program offset. With the
    limit lowered to 3, packed sequences x heads (8; 10 segments x heads for the split walk) take a launch per
    sequence (its 2 heads kept together) and chunks (5) two launches, in every forward form, an empty sequence
    among the packed ones; outputs, final states and gradients match the reference."""
    from conftest import small_grid_limit, split_kernels

    launches = small_grid_limit(monkeypatch)
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    tensors = _inputs(kind, 1, 60, n_states=4)
    _assert_match(_run("triton", tensors, chunk_size=16, cu_seqlens=cu),
                  _run("reference", tensors, chunk_size=16, cu_seqlens=cu))
    want = {"state_fwd", "state_bwd", "dv_bwd", "dqk_bwd", "output_fwd" if forward_form == "two-pass" else "fused_fwd"}
    assert split_kernels(launches) == want | ({"decay_grad"} if kind != "none" else set())


def test_retention_launches_split_past_the_grid_limit(forward_form, monkeypatch):
    """Retention's fixed decay (GATE 3 in the backward too, no decay gradient) with the grid limit lowered to 3."""
    from conftest import small_grid_limit, split_kernels

    launches = small_grid_limit(monkeypatch)
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    q, k, v, _, s0 = _inputs("none", 1, 60, n_states=4)

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
        o, s = subquad.retention(*leaves[:3], initial_state=leaves[3], output_state=True, cu_seqlens=cu,
                                 chunk_size=16, backend=backend)
        ((o * o.detach().sin()).sum() + s.sum()).backward()
        return [o, s] + [x.grad for x in leaves]

    for got, want in zip(run("triton"), run("reference")):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert {"state_fwd", "state_bwd", "dv_bwd", "dqk_bwd"} <= split_kernels(launches)


@pytest.mark.parametrize("kind", ["none", "scalar", "vector"])
def test_recurrent_launches_split_past_the_grid_limit(kind, monkeypatch):
    """The decode step's batch x heads programs (4 here; 1,024 x 64 heads on a GPU) in launches of at most 3, GLA's
    step and the (gated) delta rule's, against the reference."""
    from conftest import small_grid_limit, split_kernels

    launches = small_grid_limit(monkeypatch)
    q, k, v, g, s0 = _inputs(kind, 2, 3)
    beta = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(2)).to(DEV)
    with torch.no_grad():
        for step, extra in ((subquad.gla_step, ()), (subquad.delta_rule_step, (beta,))):
            if step is subquad.delta_rule_step and kind == "vector":
                continue
            o, s = step(q, k, v, *extra, s0, g, backend="triton")
            o_ref, s_ref = step(q, k, v, *extra, s0, g, backend="reference")
            torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    assert split_kernels(launches) == {"recurrent_step"}
    # (a launch keeps a batch row's heads together: 2 programs of the 3 allowed)
    assert all(pieces == [2, 2] for _, _, pieces in launches)


@pytest.mark.parametrize("op", ["gla", "retention", "linear_attention", "gla_step"])
@pytest.mark.parametrize("with_state", [False, True])
def test_no_tokens(op, with_state):
    """T = 0 (or packed sequences all empty): the ops return the empty output and the initial state (zeros
    without one) before the chunk tables and launches, which need tokens."""
    from test_linear_reference import check_no_tokens

    check_no_tokens(op, "triton", with_state, DEV)


def _state_rows_past_two_to_the_31(which):
    """One segment (``chunk_split``'s SPLIT walks) of sequence 2^20 of (2^20 + 1, 1, 64, 64) fp32 states: its row's
    offset, 2^20 x 64 x 64 = 2^32 elements, wrapped to 0 in int32 (the walks read and wrote sequence 0's state).
    The states are address space only: two rows of each are touched (``torch.empty``'s pages are mapped lazily)."""
    import types

    from subquad.ops.linear.chunk import ChunkTables, launch_fused_fwd, launch_state_bwd, launch_state_fwd

    heads, d, c, t, seq = 1, 64, 64, 64, 1 << 20
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, heads, d, generator=gen).to(DEV) for _ in range(3))
    try:
        h0 = torch.empty(seq + 1, heads, d, d, device=DEV)
    except RuntimeError as e:        # an address-space limit (ulimit -v, no overcommit) or a small GPU
        pytest.skip(f"16 GiB of states: {e}")
    h0[0] = 0.0
    h0[seq] = torch.randn(heads, d, d, generator=gen).to(DEV)
    first = torch.zeros(seq + 2, dtype=torch.int32, device=DEV)
    first[seq + 1] = 1
    split = types.SimpleNamespace(tables=ChunkTables(torch.tensor([0, t]), 1, 0, c, DEV), n_seqs=seq + 1,
                                  has_empty=False, seq=torch.tensor([seq], dtype=torch.int32, device=DEV),
                                  first=first)
    segments = (split, torch.zeros(1, heads, d, d, device=DEV), None)
    if which == "state_bwd":         # no decay: d initial_state = dht + q^T do
        do = torch.randn(t, heads, d, generator=gen).to(DEV)
        want = h0[seq] + torch.einsum("thk,thv->hkv", q, do)
        _, out, _ = launch_state_bwd(q, k, do, None, h0, split.tables, 1.0, c, store_dh=False, segments=segments)
    else:                            # final state = h0 + k^T v
        want = h0[seq] + torch.einsum("thk,thv->hkv", k, v)
        if which == "state_fwd":
            _, out, _ = launch_state_fwd(k, v, None, h0, split.tables, c, store_h=False, segments=segments)
        else:
            _, out = launch_fused_fwd(q, k, v, None, None, h0, split.tables, 1.0, c, segments=segments)
    torch.testing.assert_close(out[seq], want, atol=1e-4, rtol=1e-4)
    assert not out[0].any(), "the walk wrote sequence 0's state"


@pytest.mark.gpu_alone      # (16 GiB of states where the device is a GPU)
@pytest.mark.parametrize("which", ["state_fwd", "fused_fwd", "state_bwd"])
def test_state_rows_past_two_to_the_31_elements(which):
    _state_rows_past_two_to_the_31(which)


@pytest.mark.parametrize("kind", ["none", "scalar", "vector"])
def test_recurrent_kernel_wide_rows(kind, monkeypatch):
    """The decode kernel's int64 rows (``WIDE_ROWS``, taken where q, k, v or o reach 2^31 elements) forced on small
    tensors, GLA's step and the (gated) delta rule's, against the reference."""
    from subquad.ops.linear import recurrent

    monkeypatch.setattr(recurrent, "_wide_rows", lambda *sizes: True)
    q, k, v, g, s0 = _inputs(kind, 2, 3)
    with torch.no_grad():
        o, s = subquad.gla_step(q, k, v, s0, g, backend="triton")
        o_ref, s_ref = subquad.gla_step(q, k, v, s0, g, backend="reference")
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
        if kind != "vector":
            beta = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(2)).to(DEV)
            o, s = subquad.delta_rule_step(q, k, v, beta, s0, g, backend="triton")
            o_ref, s_ref = subquad.delta_rule_step(q, k, v, beta, s0, g, backend="reference")
            torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.gpu_alone
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16 GiB of q, k, v and o: on the GPU only")
def test_gpu_recurrent_rows_past_two_to_the_31_elements():
    """A decode call of 2^17 + 64 tokens of 64 heads of 256: from token 2^17 on, a row's offset (row x 256) was
    2^31 elements or more and wrapped in int32. Zeros before the last 64 tokens leave the state at zero, so their
    outputs equal the same call on them alone (a call small enough for int32)."""
    n, heads, d, tail = (1 << 17) + 64, 64, 256, 64
    q, k, v = (torch.zeros(1, n, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for x in (q, k, v):
        x[:, -tail:] = torch.randn(1, tail, heads, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(1, n, heads, generator=gen, device="cuda") * 0.1
    s0 = torch.zeros(1, heads, d, d, device="cuda")
    with torch.no_grad():
        o, s = subquad.gla_step(q, k, v, s0, g, backend="triton")
        o_tail, s_tail = subquad.gla_step(q[:, -tail:], k[:, -tail:], v[:, -tail:], s0, g[:, -tail:],
                                          backend="triton")
    torch.testing.assert_close(o[:, -tail:], o_tail)
    torch.testing.assert_close(s, s_tail)

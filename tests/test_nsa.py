"""Native Sparse Attention and top-k block attention: the reference against the fp64 oracles (outputs, gradients
of q, k, v and gates, the selection itself), the Triton path against the reference under the interpreter (fp16,
bf16, gradients; the dK/dV pass's segments), GQA / MQA, lengths off the blocks, more blocks asked than exist,
the first tokens (a branch with no key), queries aligned to the end of the keys (decoding), bad input."""

import pytest
import torch

import subquad as sq
from subquad.ops.grid import interpreting
from subquad.ops.nsa import reference, selected
from subquad.ops.nsa.compression import mean_pool

from oracles import (nsa_attention, nsa_selection, selected_blocks_mask, softmax_attention, topk_block_selection,
                     window_mask)

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _inputs(b, nq, hq, hkv, d, nkv=None, dtype=torch.float64, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    nkv = nq if nkv is None else nkv
    q = torch.randn(b, nq, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, nkv, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, nkv, hkv, dv or d, generator=gen, dtype=torch.float64)
    gates = torch.rand(b, nq, hq, 3, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, gates)]


def _grads(out, leaves, seed=1):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return torch.autograd.grad((out * do).sum(), leaves)


# name -> (batch, seq_q, seq_kv, heads_q, heads_kv, options)
NSA_CASES = {
    "gqa-overlapping": (2, 45, 45, 4, 2, dict(block=8, compress_block=8, compress_stride=4, top_k=5, window=6)),
    "mqa-group-3": (1, 37, 37, 3, 1, dict(block=4, compress_block=4, compress_stride=4, top_k=4, window=5)),
    "decode-rows": (1, 7, 40, 2, 2, dict(block=8, compress_block=8, compress_stride=2, top_k=2, window=9)),
}


@pytest.mark.parametrize("case", list(NSA_CASES))
def test_nsa_reference_matches_the_oracle(case):
    b, nq, nkv, hq, hkv, opts = NSA_CASES[case]
    q, k, v, gates = (x.requires_grad_() for x in _inputs(b, nq, hq, hkv, 8, nkv, seed=3))
    out, idx = sq.nsa(q, k, v, gates, return_indices=True, backend="reference", **opts)
    rule = {n: opts[n] for n in ("block", "compress_block", "compress_stride", "top_k")}
    k_cmp, v_cmp = (mean_pool(x, opts["compress_block"], opts["compress_stride"]) for x in (k, v))
    assert torch.equal(idx, nsa_selection(q.detach(), k_cmp.detach(), nkv, **rule))
    want = nsa_attention(q, k, v, gates, k_cmp, v_cmp, idx, window=opts["window"],
                         **{n: opts[n] for n in ("block", "compress_block", "compress_stride")})
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, (q, k, v, gates)), _grads(want, (q, k, v, gates))):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_reference_matches_the_oracle(causal):
    q, k, v, _ = (x.requires_grad_() for x in _inputs(2, 30, 4, 2, 8, 35, seed=4))
    out, idx = sq.topk_block_attention(q, k, v, block=4, top_k=3, causal=causal, return_indices=True,
                                       backend="reference")
    assert torch.equal(idx, topk_block_selection(q.detach(), k.detach(), block=4, top_k=3, causal=causal))
    want, _ = softmax_attention(q, k, v, mask=selected_blocks_mask(idx, 4, 35, 4, causal))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


def test_the_selection_ranks_blocks_by_the_group_s_summed_probability():
    """Keys of block 2 aligned with every query head of group 0 and block 1 with group 1's: each group picks its
    own block beside the forced ones (own, initial, previous), the other group's not."""
    d, block = 8, 4
    q = torch.zeros(1, 24, 4, d, dtype=torch.float64)
    k = torch.zeros(1, 24, 2, d, dtype=torch.float64)
    q[..., :2, 0] = 4.0
    q[..., 2:, 1] = 4.0
    k[0, 8:12, :, 0] = 1.0
    k[0, 4:8, :, 1] = 1.0
    idx = sq.nsa(q, k, k, torch.ones(1, 24, 4, 3, dtype=torch.float64), block=block, compress_block=block,
                 compress_stride=block, top_k=4, window=1, return_indices=True)[1]
    assert idx[0, 23, 0].tolist() == [0, 2, 4, 5] and idx[0, 23, 1].tolist() == [0, 1, 4, 5]


def test_chunked_reference_equals_one_chunk(monkeypatch):
    q, k, v, gates = (x.requires_grad_() for x in _inputs(1, 50, 4, 2, 8, seed=5))
    opts = dict(block=8, compress_block=8, compress_stride=4, top_k=3, window=7)
    whole = sq.nsa(q, k, v, gates, **opts)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)     # one query a chunk
    chunked = sq.nsa(q, k, v, gates, **opts)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(chunked, (q, k, v, gates)), _grads(whole, (q, k, v, gates))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_top_k_beyond_the_blocks_keeps_every_candidate():
    """top_k = 20 over 5 blocks: each query keeps the blocks that start at or before it, then -1; top-k block
    attention is then exact causal attention, and NSA's selected branch too."""
    q, k, v, gates = _inputs(1, 19, 2, 1, 8, seed=6)
    out, idx = sq.topk_block_attention(q, k, v, block=4, top_k=20, return_indices=True)
    for t in range(19):
        assert idx[0, t, 0].tolist() == list(range(t // 4 + 1)) + [-1] * (20 - t // 4 - 1)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=True)[0], atol=1e-10, rtol=1e-10)
    selected_only = torch.zeros_like(gates)
    selected_only[..., 1] = 1.0
    out = sq.nsa(q, k, v, selected_only, block=4, compress_block=4, compress_stride=2, top_k=20, window=3)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=True)[0], atol=1e-10, rtol=1e-10)


def test_first_tokens_have_a_zero_compressed_branch_and_no_nan():
    q, k, v, _ = (x.requires_grad_() for x in _inputs(1, 12, 2, 2, 8, seed=7))
    compressed_only = torch.zeros(1, 12, 2, 3, dtype=torch.float64)
    compressed_only[..., 0] = 1.0
    out = sq.nsa(q, k, v, compressed_only, block=4, compress_block=8, compress_stride=4, top_k=2, window=4)
    assert torch.equal(out[:, :7], torch.zeros_like(out[:, :7])) and out[:, 7:].abs().min() > 0
    assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v)))


# name -> (seq_q, seq_kv, options): fewer keys than compress_block, so no compressed key at all (M = 0)
SHORT_CASES = {
    "defaults": (10, 10, dict()),
    "ties-by-index": (19, 19, dict(block=4, compress_block=32, compress_stride=4, top_k=4, window=3)),
    "decode-rows": (3, 21, dict(block=8, compress_block=24, compress_stride=4, top_k=2, window=5)),
}


@pytest.mark.parametrize("case", list(SHORT_CASES))
def test_fewer_keys_than_a_compression_block(case):
    """No complete compression block (M = 0): the reference matches the oracle (selection, output, gradients),
    the compressed branch is 0 (out = gates[..., 1] * o_slc + gates[..., 2] * o_win), the selection is the forced
    blocks then the lowest indices (every importance 0), and nothing is NaN."""
    nq, nkv, opts = SHORT_CASES[case]
    sizes = dict(dict(block=64, compress_block=32, compress_stride=16, top_k=16, window=512), **opts)
    q, k, v, gates = (x.requires_grad_() for x in _inputs(1, nq, 4, 2, 16, nkv, seed=17))
    out, idx = sq.nsa(q, k, v, gates, return_indices=True, backend="reference", **opts)
    k_cmp, v_cmp = (mean_pool(x, sizes["compress_block"], sizes["compress_stride"]) for x in (k, v))
    assert k_cmp.shape[1] == 0
    rule = {n: sizes[n] for n in ("block", "compress_block", "compress_stride", "top_k")}
    assert torch.equal(idx, nsa_selection(q.detach(), k_cmp.detach(), nkv, **rule))
    block, top_k = sizes["block"], sizes["top_k"]
    for i in range(nq):
        t = nkv - nq + i
        own = t // block
        ranked = list(dict.fromkeys([own, 0, own - 1] if own else [0]))
        ranked += [j for j in range(own + 1) if j not in ranked]
        kept = sorted(ranked[:top_k])
        assert idx[0, i, 0].tolist() == idx[0, i, 1].tolist() == kept + [-1] * (top_k - len(kept))
    want = nsa_attention(q, k, v, gates, k_cmp, v_cmp, idx, window=sizes["window"],
                         **{n: sizes[n] for n in ("block", "compress_block", "compress_stride")})
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    o_slc, _ = softmax_attention(q, k, v, mask=selected_blocks_mask(idx, 4, nkv, block, True))
    o_win, _ = softmax_attention(q, k, v, mask=window_mask(nq, nkv, sizes["window"]))
    torch.testing.assert_close(out, gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win, atol=1e-10, rtol=1e-10)
    got, exp = _grads(out, (q, k, v, gates)), _grads(want, (q, k, v, gates))
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.equal(got[3][..., 0], torch.zeros_like(got[3][..., 0]))
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_fewer_keys_than_a_compression_block_in_fp32():
    """The reported case: fp32, (1, 10, 2, 16), the default sizes."""
    q, k, v, gates = (x.requires_grad_() for x in _inputs(1, 10, 2, 2, 16, dtype=torch.float32, seed=18))
    out = sq.nsa(q, k, v, gates, backend="reference")
    selected_and_window = gates.detach().clone()
    selected_and_window[..., 0] = 0.0
    torch.testing.assert_close(out, sq.nsa(q, k, v, selected_and_window, backend="reference"), atol=0, rtol=0)
    want, _ = softmax_attention(q, k, v, causal=True)    # 10 keys: one selection block and the whole window
    torch.testing.assert_close(out, ((gates[..., 1:2] + gates[..., 2:3]) * want).float(), atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v, gates)))


@pytest.mark.parametrize("causal", [True, False])
def test_topk_with_fewer_keys_than_a_block(causal):
    """10 keys in blocks of 64: one short block, kept by every query; exact attention over all the keys."""
    q, k, v, _ = (x.requires_grad_() for x in _inputs(1, 10, 4, 2, 16, seed=19))
    out, idx = sq.topk_block_attention(q, k, v, causal=causal, return_indices=True, backend="reference")
    assert torch.equal(idx, topk_block_selection(q.detach(), k.detach(), block=64, top_k=16, causal=causal))
    assert idx[..., 0].eq(0).all() and idx[..., 1:].eq(-1).all()
    want, _ = softmax_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for got, exp in zip(_grads(out, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-10)


def test_a_learnable_compression_gets_gradients_and_a_given_pair_is_used_as_is():
    q, k, v, gates = _inputs(1, 20, 2, 1, 8, seed=8)
    weight = torch.randn(4, requires_grad=True, dtype=torch.float64)
    pool = lambda x: torch.einsum("bmhdl,l->bmhd", x.unfold(1, 4, 2), weight)
    opts = dict(block=4, compress_block=4, compress_stride=2, top_k=2, window=3)
    out = sq.nsa(q, k, v, gates, compress=lambda k, v: (pool(k), pool(v)), **opts)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(sq.nsa(q, k, v, gates, compress=(pool(k), pool(v)), **opts), out, atol=0, rtol=0)


def test_the_last_rows_of_a_call_equal_a_call_on_the_last_queries():
    """Queries aligned to the end of the keys (a decoding step over a cache) see what they see in the whole call."""
    q, k, v, gates = _inputs(2, 33, 4, 2, 8, seed=9)
    opts = dict(block=4, compress_block=8, compress_stride=4, top_k=3, window=5)
    whole, idx = sq.nsa(q, k, v, gates, return_indices=True, **opts)
    tail, idx_tail = sq.nsa(q[:, -5:], k, v, gates[:, -5:], return_indices=True, **opts)
    torch.testing.assert_close(tail, whole[:, -5:], atol=1e-12, rtol=1e-12)
    assert torch.equal(idx_tail, idx[:, -5:])


def _q(b=1, n=8, h=2, d=8):
    return torch.randn(b, n, h, d)


@pytest.mark.parametrize("call, match", [
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 2)), r"gates: expected .*\(1, 8, 2, 3\)"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3, device="meta")), "gates: expected device"),
    (lambda: sq.nsa(_q(), _q(h=3), _q(h=3), torch.rand(1, 8, 2, 3)), "H_kv dividing"),
    (lambda: sq.nsa(_q(n=9), _q(), _q(), torch.rand(1, 9, 2, 3)), r"q: expected at most seq_kv=8"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), compress_stride=3), "compress_stride: expected a "
     "divisor of compress_block=32 and block=64"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), top_k=0), "top_k: expected a positive int"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), window=1.5), "window: expected a positive int"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), compress_block=4, compress_stride=2,
                    compress=lambda k, v: (k, v)), r"compress: expected k_cmp of shape \(1, 3, 2, 8\)"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), compress="mean"), "compress: expected None, a "
     "callable"),
    (lambda: sq.nsa(_q(), _q(), _q(), torch.rand(1, 8, 2, 3), backend="fa4"), "backend: expected one of"),
    (lambda: sq.nsa(_q().half(), _q().half(), _q().half(), torch.rand(1, 8, 2, 3), block=24, compress_block=8,
                    compress_stride=8, backend="triton"), "block: the Triton kernels take a power of two"),
    (lambda: sq.topk_block_attention(_q(), _q(), _q(), block=0), "block: expected a positive int"),
    (lambda: sq.topk_block_attention(_q(), _q(), _q(), causal=1), "causal: expected a bool"),
    (lambda: sq.topk_block_attention(_q(), _q(d=4), _q()), r"k: expected head_dim 8"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- Triton kernels (interpreter on CPU) ---------------------------------------------------------------------

TOL = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
GRAD_TOL = {torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=1.2e-1, rtol=6e-2)}


def _half(tensors, dtype):
    return [x.to(dtype=dtype, device=DEV).requires_grad_() for x in tensors]


def _fp32(tensors):
    """The kernels' inputs for the reference, in fp32 on the CPU (where the comparisons are made)."""
    return [x.detach().float().cpu().requires_grad_() for x in tensors]


@needs_triton
@pytest.mark.parametrize("dtype, causal, nq, hq", [(torch.float16, True, 21, 6), (torch.bfloat16, False, 21, 2),
                                                    (torch.float16, True, 9, 16)])
def test_selected_kernel_matches_the_reference_on_given_indices(monkeypatch, dtype, causal, nq, hq):
    """Random selections (-1 included; groups of 3, 1 and 8 padded to a 16-row tile), 37 keys in blocks of
    16, queries aligned to the end; segments of 2 tokens, so that long block lists are cut and add atomically."""
    monkeypatch.setattr(selected, "SEGMENT_TOKENS", 2)
    q, k, v, _ = _inputs(1, nq, hq, 2, 16, 37, dtype=torch.float32, seed=10, dv=32)
    gen = torch.Generator().manual_seed(11)
    idx = torch.stack([torch.randperm(3, generator=gen) for _ in range(nq * 2)]).view(1, nq, 2, 3)
    idx[0, ::4, 0, 2] = -1
    if causal:   # blocks after the query are not candidates
        idx = torch.where(idx * 16 <= torch.arange(37 - nq, 37).view(1, -1, 1, 1), idx, -1)
    leaves = _half((q, k, v), dtype)
    out = selected.selected_attention(*leaves, idx.to(DEV), block=16, scale=0.25, causal=causal)
    ref32 = _fp32(leaves)
    qc = (ref32[0] * 0.25).view(1, nq, 2, hq // 2, 16)
    blocks = [reference.as_blocks(x, 16) for x in ref32[1:]]
    want = reference._selected(qc, *blocks, idx, torch.arange(37 - nq, 37), 37, 16, causal).reshape(1, nq, hq, 32)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])
    for got, exp in zip(_grads(out, leaves), _grads(want, ref32)):
        torch.testing.assert_close(got.float().cpu(), exp, **GRAD_TOL[dtype])


@pytest.mark.skipif(not interpreting(),
                    reason="a CPU buffer of 2^32 elements (8 GiB reserved, a few pages written)")
def test_selected_kernel_addresses_queries_past_2_to_the_31_elements():
    """q's tokens 2^30 elements apart in a larger buffer (a token's offset passes 2^31 from the third on, as at
    128k tokens of 128 heads of 128): the output and dQ of each token are those of the same queries packed. In
    int32 the third token's offset wrapped to 2^31 elements before q (q starts that far into the buffer, so the
    wrapped read stays inside it)."""
    n, d, token_stride = 3, 16, 1 << 30
    try:
        buffer = torch.empty((1 << 32) + 2 * d, dtype=torch.float16)    # untouched pages are not backed by memory
    except RuntimeError:     # (a machine that refuses to reserve 8 GiB of address space)
        pytest.skip("8 GiB of address space not granted")
    q = buffer.as_strided((1, n, 2, d), (n * token_stride, token_stride, d, 1), storage_offset=1 << 31)
    q.copy_(torch.randn(1, n, 2, d, generator=torch.Generator().manual_seed(22)))
    packed = q.detach().clone().requires_grad_()
    q.requires_grad_()
    k, v, _, _ = _inputs(1, n, 1, 1, d, dtype=torch.float16, seed=23)
    idx = torch.zeros(1, n, 1, 1, dtype=torch.long)
    out = selected.selected_attention(q, k, v, idx, block=16, scale=0.25, causal=True)
    want = selected.selected_attention(packed, k, v, idx, block=16, scale=0.25, causal=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(_grads(out, (q,))[0], _grads(want, (packed,))[0], atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nsa_triton_matches_the_reference(dtype):
    """GQA 4:2, 70 tokens (blocks of 16: the last short), overlapping compression blocks (8 every 4), a seed
    with no near-tie in the selection; gradients of q, k, v and gates."""
    tensors = _inputs(1, 70, 4, 2, 16, dtype=torch.float32, seed=12)
    opts = dict(block=16, compress_block=8, compress_stride=4, top_k=3, window=20)
    leaves = _half(tensors, dtype)
    out, idx = sq.nsa(*leaves, return_indices=True, backend="triton", **opts)
    ref32 = _fp32(leaves)
    want, idx_want = sq.nsa(*ref32, return_indices=True, backend="reference", **opts)
    assert torch.equal(idx.cpu(), idx_want)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])
    for got, exp in zip(_grads(out, leaves), _grads(want, ref32)):
        torch.testing.assert_close(got.float().cpu(), exp, **GRAD_TOL[dtype])


@needs_triton
def test_nsa_triton_first_tokens_and_decoding_rows():
    """The first tokens (no compressed key yet) give no NaN on the kernels; 5 queries over 40 keys give the last
    rows of the whole call."""
    tensors = _inputs(1, 40, 2, 1, 16, dtype=torch.float32, seed=13)
    opts = dict(block=16, compress_block=16, compress_stride=8, top_k=2, window=8)
    q, k, v, gates = _half(tensors, torch.float16)
    whole = sq.nsa(q, k, v, gates, backend="triton", **opts)
    assert all(torch.isfinite(g).all() for g in _grads(whole, (q, k, v, gates)))
    tail = sq.nsa(q[:, -5:], k, v, gates[:, -5:], backend="triton", **opts)
    torch.testing.assert_close(tail, whole[:, -5:], atol=1e-3, rtol=1e-3)


@needs_triton
def test_nsa_triton_matches_the_reference_with_fewer_keys_than_a_compression_block():
    """20 tokens, compression blocks of 32: no compressed key (M = 0) on either path; same selection, output and
    gradients."""
    tensors = _inputs(1, 20, 4, 2, 16, dtype=torch.float32, seed=20)
    opts = dict(block=16, compress_block=32, compress_stride=16, top_k=2, window=8)
    leaves = _half(tensors, torch.float16)
    out, idx = sq.nsa(*leaves, return_indices=True, backend="triton", **opts)
    ref32 = _fp32(leaves)
    want, idx_want = sq.nsa(*ref32, return_indices=True, backend="reference", **opts)
    assert torch.equal(idx.cpu(), idx_want)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[torch.float16])
    for got, exp in zip(_grads(out, leaves), _grads(want, ref32)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float().cpu(), exp, **GRAD_TOL[torch.float16])


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_topk_triton_matches_the_reference(causal):
    tensors = _inputs(2, 40, 4, 2, 16, 50, dtype=torch.float32, seed=14)[:3]
    leaves = _half(tensors, torch.float16)
    out, idx = sq.topk_block_attention(*leaves, block=16, top_k=2, causal=causal, return_indices=True,
                                       backend="triton")
    ref32 = _fp32(leaves)
    want, idx_want = sq.topk_block_attention(*ref32, block=16, top_k=2, causal=causal, return_indices=True,
                                             backend="reference")
    assert torch.equal(idx.cpu(), idx_want)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[torch.float16])
    for got, exp in zip(_grads(out, leaves), _grads(want, ref32)):
        torch.testing.assert_close(got.float().cpu(), exp, **GRAD_TOL[torch.float16])


@needs_triton
def test_triton_selection_reads_a_transposed_head_dim():
    """q a transposed view (head_dim not of unit stride): the selection kernel ranks the blocks by q's numbers,
    as the reference does (it read the head dim as contiguous and picked other blocks)."""
    q, k, v, _ = _inputs(1, 48, 2, 1, 16, dtype=torch.float16, seed=21)
    q = q.transpose(2, 3).contiguous().transpose(2, 3).to(DEV)
    assert q.stride(-1) != 1
    out, idx = sq.topk_block_attention(q, k.to(DEV), v.to(DEV), block=16, top_k=2, return_indices=True,
                                       backend="triton")
    want, idx_want = sq.topk_block_attention(*_fp32((q, k, v)), block=16, top_k=2, return_indices=True,
                                             backend="reference")
    assert torch.equal(idx.cpu(), idx_want)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[torch.float16])


def test_the_nn_layer_is_nsa_on_its_projections_gates_and_compression():
    """sigmoid gates from the gate projection, keys compressed by the layer's MLPs, RoPE on q and k: the oracle's
    NSA on those, through the output projection."""
    from subquad.nn import NSA

    torch.manual_seed(15)
    layer = NSA(16, 4, kv_heads=2, block=4, compress_block=4, compress_stride=2, top_k=3, window=3).double()
    x = torch.randn(1, 19, 16, dtype=torch.float64)
    pos = torch.arange(19)
    q = layer.rope(layer.q_proj(x).view(1, 19, 4, 4), pos)
    k, v = layer.kv_proj(x).view(1, 19, 2, 2, 4).unbind(2)
    k = layer.rope(k, pos)
    gates = torch.sigmoid(layer.gate_proj(x)).view(1, 19, 4, 3)
    k_cmp, v_cmp = layer.compress(k, v)
    idx = nsa_selection(q, k_cmp, 19, block=4, compress_block=4, compress_stride=2, top_k=3)
    o = nsa_attention(q, k, v, gates, k_cmp, v_cmp, idx, block=4, compress_block=4, compress_stride=2, window=3)
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(1, 19, 16)), atol=1e-10, rtol=1e-10)


@needs_triton
def test_the_nn_layer_decodes_from_its_cache_on_the_kernels():
    """fp16 on the Triton path: a prefill of 33 tokens (three compression blocks of 16 every 8), then single steps,
    one of which completes a fourth (at 40 tokens), against the whole sequence."""
    from subquad.nn import NSA

    torch.manual_seed(16)
    layer = NSA(32, 2, kv_heads=1, block=16, compress_block=16, compress_stride=8, top_k=2, window=8,
                backend="triton").to(device=DEV, dtype=torch.float16)
    x = torch.randn(1, 41, 32, device=DEV, dtype=torch.float16)
    whole = layer(x)
    cache = layer.new_cache(1, 48)
    steps = [layer(x[:, :33], cache)] + [layer(x[:, t:t + 1], cache) for t in range(33, 41)]
    assert cache.compressed == [4]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=2e-3, rtol=2e-3)


def test_the_nn_layer_before_its_first_compression_block():
    """10 tokens with the default sizes (compression blocks of 32): no summary yet, the layer runs, and cached
    steps equal the whole sequence (the reference raised on an empty compressed branch before 4665434)."""
    from subquad.nn import NSA

    torch.manual_seed(17)
    layer = NSA(32, 2, kv_heads=1).double()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    whole = layer(x)
    cache = layer.new_cache(1, 16)
    steps = [layer(x[:, :6], cache)] + [layer(x[:, t:t + 1], cache) for t in range(6, 10)]
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-10, rtol=1e-10)


def test_the_nn_layer_after_rewound_drafts():
    """Two rejected draft tokens rewound by writing token 9's K/V back at position 9: the compressed blocks that
    held a draft are compressed again, and the next step equals the whole sequence's (it reused the drafts')."""
    from subquad.nn import NSA

    torch.manual_seed(23)
    layer = NSA(16, 2, block=2, compress_block=2, compress_stride=1, top_k=3, window=3).double()
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    clean = layer.new_cache(1, 16)
    layer(x[:, :10], clean)
    cache = layer.new_cache(1, 16)
    layer(x[:, :9], cache)
    layer(torch.randn(1, 2, 16, dtype=torch.float64), cache)          # the drafts, at positions 9 and 10
    cache.update(clean.k[:, 9:10], clean.v[:, 9:10], positions=9)     # token 9 accepted in their place
    torch.testing.assert_close(layer(x[:, 10:11], cache), layer(x)[:, 10:11], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("batch, max_len, match", [(-1, 16, "batch: expected a positive int, got -1"),
                                                   (1, None, "max_len: expected a positive int, got None")])
def test_the_nn_layer_s_cache_rejects_bad_sizes(batch, max_len, match):
    """A ValueError naming the size, not torch.zeros' RuntimeError (batch -1) or a TypeError (max_len None)."""
    from subquad.nn import NSA

    with pytest.raises(ValueError, match=match):
        NSA(32, 2).new_cache(batch, max_len)


def _nsa_selection_in_torch(q, k_cmp, seq_kv, *, block, compress_block, compress_stride, top_k):
    """``selection.select_nsa`` on fp32 probabilities of the summary keys (the reference's rule, whole)."""
    from subquad.ops.nsa.compression import block_ends
    from subquad.ops.nsa.selection import select_nsa

    b, nq, hq, d = q.shape
    hkv = k_cmp.shape[2]
    q_pos = torch.arange(seq_kv - nq, seq_kv)
    s = torch.einsum("bchgd,bmhd->bchgm", q.float().view(b, nq, hkv, hq // hkv, d), k_cmp.float()) * d ** -0.5
    seen = (block_ends(k_cmp.shape[1], compress_block, compress_stride, "cpu").view(1, -1) <= q_pos.view(-1, 1))
    s = s.masked_fill(~seen.view(1, nq, 1, 1, -1), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return select_nsa(p, q_pos, compress_block=compress_block, compress_stride=compress_stride, block=block,
                      top_k=top_k, n_blocks=-(-seq_kv // block))


# name -> (heads_q, heads_kv, seq_q, seq_kv, block, compress_block, compress_stride, top_k): groups of 1, 3 and 16
# (rows padded to a power of two), segments spanning 1, 2 and 4 stride steps, selection blocks of 1, 2 and 4
# segments, more blocks than one tile of the kernel (15 a tile at span 2, 4 segments a block), decoding rows, more
# blocks kept than a tile holds (20: the kept keys are a tile of 32)
SELECTION_CASES = {
    "nsa-defaults-shape": (16, 1, 300, 300, 16, 8, 4, 5),
    "group-3-span-4": (3, 1, 200, 200, 16, 32, 8, 4),
    "mha-long": (2, 2, 20, 700, 16, 8, 8, 6),
    "span-1-two-segments": (4, 2, 130, 130, 32, 16, 16, 3),
    "top-20-of-44": (2, 2, 20, 700, 16, 8, 8, 20),
}


@needs_triton
@pytest.mark.parametrize("case, keep_top", [(case, False) for case in SELECTION_CASES]
                         # (the interpreter's sort is slow: the top kept in the kernel on two cases, a tile kept and
                         # two tiles kept)
                         + [("nsa-defaults-shape", True), ("top-20-of-44", True)])
def test_selection_kernel_ranks_blocks_as_the_torch_rule(monkeypatch, case, keep_top):
    """The kernel picks what ``select_nsa`` picks from fp32 probabilities, for every token, KV head and batch
    element, whether it keeps the top-k itself or writes every block's key for ``torch.topk``."""
    from subquad.ops.nsa import selection_kernel
    from subquad.ops.nsa.selection_kernel import select_top_blocks

    monkeypatch.setattr(selection_kernel, "KEEP_TOP_IN_KERNEL", keep_top)

    hq, hkv, nq, nkv, block, cb, cs, top_k = SELECTION_CASES[case]
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(2, nq, hq, 32, generator=gen).half()
    k_cmp = mean_pool(torch.randn(2, nkv, hkv, 32, generator=gen), cb, cs)
    got = select_top_blocks(q.to(DEV), k_cmp.to(DEV), q_pos0=nkv - nq, seq_kv=nkv, compress_block=cb,
                            compress_stride=cs, block=block, n_blocks=-(-nkv // block), top_k=top_k, causal=True,
                            forced=True, bound=float((hq // hkv) * (cb // cs) + 1), scale=32 ** -0.5)
    want = _nsa_selection_in_torch(q, k_cmp, nkv, block=block, compress_block=cb, compress_stride=cs, top_k=top_k)
    assert torch.equal(got.cpu(), want)


@needs_triton
@pytest.mark.parametrize("causal, keep_top", [(True, False), (False, False), (True, True)])
def test_selection_kernel_breaks_ties_by_the_lower_block(monkeypatch, causal, keep_top):
    """Equal keys give equal importances: the forced block first, then the lowest blocks (the sort's rule)."""
    from subquad.ops.nsa import selection_kernel
    from subquad.ops.nsa.selection_kernel import select_top_blocks

    monkeypatch.setattr(selection_kernel, "KEEP_TOP_IN_KERNEL", keep_top)

    q = torch.randn(1, 70, 2, 16, generator=torch.Generator().manual_seed(3)).half()
    k_pool = torch.ones(1, 5, 1, 16)                            # 70 keys in blocks of 16: 5 summaries, all equal
    got = select_top_blocks(q.to(DEV), k_pool.to(DEV), q_pos0=0, seq_kv=70, compress_block=16, compress_stride=16,
                            block=16, n_blocks=5, top_k=3, causal=causal, forced=False, bound=3.0,
                            scale=0.25).cpu()
    if causal:
        assert got[0, 20, 0].tolist() == [0, 1, -1] and got[0, 40, 0].tolist() == [0, 1, 2]
        assert got[0, 69, 0].tolist() == [0, 1, 4]               # own block forced, then the lowest
    else:
        assert got[0, :, 0].eq(torch.tensor([0, 1, 2])).all()


@needs_triton
def test_selection_in_chunks_equals_one_chunk(monkeypatch):
    from subquad.ops.nsa import selection_kernel

    q, k, v, gates = _half(_inputs(1, 50, 4, 2, 16, seed=13), torch.float16)
    opts = dict(block=16, compress_block=16, compress_stride=8, top_k=3, window=4)
    _, whole = sq.nsa(q, k, v, gates, return_indices=True, backend="triton", **opts)
    monkeypatch.setattr(selection_kernel, "SELECTION_ELEMENTS", 2 * 4 * 3)   # 3 tokens a chunk (2 KV heads, 4 blocks)
    _, chunked = sq.nsa(q, k, v, gates, return_indices=True, backend="triton", **opts)
    assert torch.equal(chunked, whole)


@needs_triton
@pytest.mark.parametrize("dtype, gate_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_gate_mix_kernel_matches_the_fp32_sum(dtype, gate_dtype):
    """37 rows (not a multiple of the program's 16) of 24 columns (not a power of two): output and all four
    gradients against the fp32 sum."""
    from subquad.ops.nsa.gate_mix import gate_mix

    gen = torch.Generator().manual_seed(41)
    branches = [torch.randn(1, 37, 1, 24, generator=gen).to(dtype) for _ in range(3)]
    gates = torch.rand(1, 37, 1, 3, generator=gen).to(gate_dtype)
    leaves = [x.to(DEV).requires_grad_() for x in (*branches, gates)]
    out = gate_mix(*leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in (*branches, gates)]
    want = sum(ref_leaves[3][..., i:i + 1] * ref_leaves[i] for i in range(3))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), want, **TOL[dtype])
    for got, exp in zip(_grads(out, leaves), _grads(want, ref_leaves)):
        torch.testing.assert_close(got.double().cpu(), exp, **TOL[got.dtype if got.dtype in TOL else dtype])


@needs_triton
def test_bf16_nsa_selects_what_the_reference_selects_on_the_same_inputs():
    """The default summary keys stay in fp32 for the ranking: at 384 tokens of 16 heads in bf16 their rounding to
    bf16 tips two near-ties (the reference on the same inputs, upcast, then picks other blocks); unrounded, the
    kernels' selection equals the reference's and the outputs agree to bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 384, h, 32, generator=gen).bfloat16() for h in (16, 1, 1))
    gates = torch.rand(1, 384, 16, 3, generator=gen).bfloat16()
    opts = dict(block=16, compress_block=16, compress_stride=8, top_k=4, window=32)
    out, idx = sq.nsa(*(x.to(DEV) for x in (q, k, v, gates)), return_indices=True, backend="triton", **opts)
    want, idx_want = sq.nsa(*(x.float() for x in (q, k, v, gates)), return_indices=True, backend="reference",
                            **opts)
    assert torch.equal(idx.cpu(), idx_want)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[torch.bfloat16])

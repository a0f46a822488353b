"""The plain-PyTorch reference of exact attention against the fp64 oracle: every pattern, GQA/MQA, softcap,
ALiBi, LSE, seq_q < seq_kv, dtypes, gradients, fully masked rows and permuted positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import subquad
from subquad import masks
from subquad.masks import PARTIAL
from subquad.ops.softmax import reference
from subquad.ops.softmax.reference import attention_reference

from oracles import softmax_attention

SEQ = 70  # not a multiple of any block size below
IDS = torch.tensor([0] * 13 + [1] * 30 + [2] * 2 + [3] * 25)


@pytest.fixture(autouse=True)
def small_kv_chunks(monkeypatch):
    # Several online-softmax chunks per query block even at these small sizes.
    monkeypatch.setattr(reference, "KV_CHUNK", 24)


def _inputs(b=2, nq=SEQ, nkv=SEQ, hq=4, hkv=2, d=16, dv=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, nkv, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, nkv, hkv, dv or d, generator=g).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _layout(heads, n):
    return torch.rand(heads, n, n, generator=torch.Generator().manual_seed(1)) < 0.4


PATTERNS = {
    "causal": masks.causal,
    "full": masks.full,
    "sliding_window": masks.sliding_window(9),
    "sliding_window_nc": masks.sliding_window(9, causal=False),
    "strided": masks.strided(6),
    "fixed": masks.fixed(8, 2),
    "dilated": masks.dilated(20, 3),
    "block_sparse": masks.block_sparse(_layout(1, 5)[0], 16),
    "block_sparse_per_head": masks.block_sparse(_layout(4, 8), 9),
    "longformer": masks.longformer(6, [0, 40]),
    "bigbird": masks.bigbird(6, [0], random_blocks=2, seed=3, block=8),
    "document": masks.document(IDS),
    "document_per_batch": masks.document(torch.stack([IDS, IDS.flip(0).max() - IDS.flip(0)])),
    "prefix_lm": masks.prefix_lm(11),
    "from_tensor": masks.from_tensor(torch.rand(SEQ, SEQ, generator=torch.Generator().manual_seed(2)) < 0.3),
    "from_predicate": masks.from_predicate(lambda b, h, q, k: ((q + 2 * k + b + h) % 4) != 0),
    "composed": (masks.sliding_window(12) | masks.strided(7)) & masks.document(IDS),
}


def _close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=False)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("blocks", [(16, 8), (128, 128)])
def test_reference_matches_oracle(name, blocks):
    pattern = PATTERNS[name]
    q, k, v = _inputs(grad=True)
    bm = pattern.block_mask(SEQ, batch=2, heads=4, block_q=blocks[0], block_kv=blocks[1])
    out, lse = subquad.attention(q, k, v, mask=bm, return_lse=True, backend="reference")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = softmax_attention(qd, kd, vd, mask=pattern)
    assert out.dtype == torch.float32 and lse.shape == (2, 4, SEQ)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)
    do = torch.randn_like(ref)
    (out * do.float()).sum().backward()
    (ref * do).sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        _close(got, want, 2e-5)


@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("seq_q", [SEQ, 23, 1])
def test_causal_gqa_mqa_bottom_right(hkv, seq_q):
    q, k, v = _inputs(nq=seq_q, hkv=hkv, dv=24, grad=True)
    out, lse = subquad.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = softmax_attention(qd, kd, vd, causal=True)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)
    out.sum().backward()
    ref.sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        _close(got, want, 2e-5)


@pytest.mark.parametrize("name", ["sliding_window", "document_per_batch", "block_sparse_per_head", "bigbird"])
def test_patterns_with_fewer_queries_than_keys(name):
    # Queries sit at the end of the keys; the pattern and causal are intersected.
    q, k, v = _inputs(nq=29)
    out, lse = subquad.attention(q, k, v, mask=PATTERNS[name], causal=True, return_lse=True, backend="reference")
    ref, ref_lse = softmax_attention(q, k, v, mask=PATTERNS[name], causal=True)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4), (1, 4)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("mask_name", ["window_globals", "per_batch_and_head"])
def test_softcap_alibi(slopes_shape, softcap, mask_name):
    q, k, v = _inputs(grad=True)
    with torch.no_grad():
        q.mul_(3)  # large logits, so that the softcap matters
    slopes = torch.rand(slopes_shape, generator=torch.Generator().manual_seed(5))
    if mask_name == "window_globals":
        mask = masks.sliding_window(30) | masks.longformer(4, [3])
    else:  # one plan per (batch, head): slopes must follow each slice
        mask = PATTERNS["document_per_batch"] | PATTERNS["block_sparse_per_head"]
    out, lse = subquad.attention(q, k, v, mask=mask, softcap=softcap, alibi_slopes=slopes, return_lse=True,
                                 backend="reference")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = softmax_attention(qd, kd, vd, mask=mask, softcap=softcap, alibi_slopes=slopes)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        _close(got, want, 1e-4)


def test_alibi_seq_q_shorter():
    q, k, v = _inputs(nq=17)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    out = subquad.attention(q, k, v, causal=True, alibi_slopes=slopes, scale=0.3, backend="reference")
    _close(out, softmax_attention(q, k, v, causal=True, alibi_slopes=slopes, scale=0.3)[0], 1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs(dtype, atol):
    q, k, v = _inputs(dtype=dtype, grad=True)
    mask = masks.sliding_window(20) & masks.document(IDS)
    out, lse = subquad.attention(q, k, v, mask=mask, return_lse=True, backend="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = softmax_attention(qd, kd, vd, mask=mask)
    _close(out, ref, atol, rtol=atol)
    _close(lse, ref_lse, 1e-4)  # LSE is fp32 from fp32 scores of the same (rounded) inputs
    out.float().sum().backward()
    ref.sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert got.dtype == dtype
        _close(got, want, 4 * atol, rtol=4 * atol)


@pytest.mark.parametrize("mask", [
    masks.Band(5, 9),                                     # queries 0..4 see no key
    masks.from_tensor((torch.arange(SEQ).view(-1, 1) % 3 != 0).expand(SEQ, SEQ)) & masks.causal,  # rows 0, 3, 6...
    masks.block_sparse(torch.eye(5, dtype=torch.bool).index_fill(0, torch.tensor([0, 3]), False), 16),  # blocks 0, 3 see nothing
])
def test_fully_masked_rows(mask):
    q, k, v = _inputs(grad=True)
    bm = mask.block_mask(SEQ, block_q=16, block_kv=16)
    out, lse = subquad.attention(q, k, v, mask=bm, return_lse=True, backend="reference")
    ref, ref_lse = softmax_attention(q.detach(), k.detach(), v.detach(), mask=mask)
    empty = torch.isinf(ref_lse)
    assert bool(empty.any())
    assert bool((lse[empty] == float("-inf")).all())
    assert bool((out.transpose(1, 2)[empty] == 0).all())
    assert not bool(out.isnan().any()) and not bool(lse.isnan().any())
    _close(out, ref, 1e-5)
    out.sum().backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((q.grad.transpose(1, 2)[empty] == 0).all())


def test_every_row_masked():
    q, k, v = _inputs(grad=True)
    out, lse = subquad.attention(q, k, v, mask=masks.Band(SEQ, SEQ + 5), return_lse=True, backend="reference")
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("mask", [masks.causal, masks.document(IDS) & masks.sliding_window(5),
                                  masks.Band(SEQ, SEQ + 5)], ids=["causal", "document-window", "every-row-empty"])
def test_sinks_match_the_oracle(mask):
    """A per-head sink logit that every query sees with a zero value: outputs, LSE and the gradients of q, k,
    v and the sinks themselves, rows that see no key included (their output stays 0, their LSE is the sink)."""
    q, k, v = _inputs(grad=True)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    out, lse = subquad.attention(q, k, v, mask=mask, return_lse=True, backend="reference", sinks=sinks)
    ref, ref_lse = softmax_attention(q, k, v, mask=mask, sinks=sinks)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)
    gen = torch.Generator().manual_seed(3)
    g_out, g_lse = torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(lse.shape, generator=gen)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((ref * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v, sinks))
    for a, b in zip(got, want):
        _close(a, b, 1e-4)
    assert sinks.grad is None and float(got[3].abs().sum()) > 0
    with pytest.raises(ValueError, match="sinks"):
        subquad.attention(q, k, v, causal=True, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="sinks"):
        subquad.attention(q, k, v, causal=True, sinks=torch.zeros(4), backend="cudnn")


def test_a_minus_inf_sink_is_no_sink():
    """A head whose sink is -inf is that head without a sink, its rows that see no key included: output 0, LSE
    -inf, finite gradients (logaddexp(-inf, -inf) made them NaN)."""
    q, k, v = _inputs(grad=True)
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), 0.0], requires_grad=True)
    mask = masks.Band(4, SEQ)      # the first 4 rows see no key
    out, lse = subquad.attention(q, k, v, mask=mask, return_lse=True, backend="reference", sinks=sinks)
    plain, plain_lse = subquad.attention(q, k, v, mask=mask, return_lse=True, backend="reference")
    for head in (0, 2):
        assert torch.equal(out[:, :, head], plain[:, :, head]) and torch.equal(lse[:, head], plain_lse[:, head])
    (out.sum() + lse.masked_fill(lse == float("-inf"), 0).sum()).backward()
    for t in (q, k, v, sinks):
        assert bool(torch.isfinite(t.grad).all())
    assert float(sinks.grad[0]) == 0 and float(sinks.grad[1]) != 0


@pytest.mark.parametrize("mask_kind", ["tensor", "predicate", "pattern_with_causal"])
def test_mask_argument_forms(mask_kind):
    q, k, v = _inputs(nq=40)
    dense = torch.rand(40, SEQ, generator=torch.Generator().manual_seed(9)) < 0.5
    if mask_kind == "tensor":
        out = subquad.attention(q, k, v, mask=dense, backend="reference")
        ref = softmax_attention(q, k, v, mask=dense)[0]
    elif mask_kind == "predicate":
        out = subquad.attention(q, k, v, mask=lambda b, h, qp, kp: (qp - kp) % 5 < 3, backend="reference")
        ref = softmax_attention(q, k, v, mask=((torch.arange(40) + 30).view(-1, 1) - torch.arange(SEQ)) % 5 < 3)[0]
    else:
        out = subquad.attention(q, k, v, mask=masks.strided(5, causal=False), causal=True, backend="reference")
        ref = softmax_attention(q, k, v, mask=masks.strided(5), causal=True)[0]
    _close(out, ref, 1e-5)


@pytest.mark.parametrize("mask", [None, masks.sliding_window(9), "tensor", "from_tensor", "window_and_tensor"])
def test_causal_with_more_queries_than_keys(mask):
    """FlashAttention's bottom-right causal alignment with seq_q > seq_kv: the first seq_q - seq_kv queries sit
    before every key (output 0, LSE -inf, no gradient); the rest as with seq_q = seq_kv. It was refused. A
    (seq_q, seq_kv) tensor inside a pattern (``masks.from_tensor``, ``pattern & tensor``) was refused as not of
    shape (seq_kv, seq_kv), the shape of the queries that see keys."""
    q, k, v = _inputs(nq=SEQ + 12, grad=True)
    dense = torch.rand(SEQ + 12, SEQ, generator=torch.Generator().manual_seed(2)) < 0.7
    window = (torch.arange(-12, SEQ).view(-1, 1) - torch.arange(SEQ)) < 9
    mask, want = {"tensor": (dense, dense), "from_tensor": (masks.from_tensor(dense), dense),
                  "window_and_tensor": (masks.sliding_window(9) & dense, window & dense)}.get(mask, (mask, mask))
    out, lse = subquad.attention(q, k, v, causal=True, mask=mask, return_lse=True, backend="reference")
    mask = window if isinstance(want, masks.Pattern) else want   # (the oracle: at the queries' positions, -12 up)
    ref, ref_lse = softmax_attention(q, k, v, causal=True, mask=mask)
    _close(out, ref, 1e-5)
    assert torch.isneginf(lse[:, :, :12]).all() and (out[:, :12] == 0).all()
    _close(lse[:, :, 12:], ref_lse[:, :, 12:], 1e-5)
    out.sum().backward()
    assert (q.grad[:, :12] == 0).all() and torch.isfinite(k.grad).all()


def test_full_attention_without_mask_and_more_queries_than_keys():
    q, k, v = _inputs(nq=90, nkv=33, hkv=1)
    out, lse = subquad.attention(q, k, v, return_lse=True, backend="reference")
    ref, ref_lse = softmax_attention(q, k, v)
    _close(out, ref, 1e-5)
    _close(lse, ref_lse, 1e-5)


def _all_partial(bm):
    """The same plan with every visited block masked element by element: valid for any order of positions."""
    return dataclasses.replace(bm, kind=torch.full_like(bm.kind, PARTIAL), _cache={})


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document_per_batch", "block_sparse_per_head", "longformer"])
@pytest.mark.parametrize("seq_q", [SEQ, 45])
def test_permuted_positions(name, seq_q):
    # Permuting queries and keys and passing their positions equals the unpermuted result, permuted back.
    q, k, v = _inputs(nq=seq_q, grad=True)
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.02])
    scale = 16 ** -0.5
    bm = PATTERNS[name].block_mask(seq_q, SEQ, batch=2, heads=4, block_q=16, block_kv=16)
    want, want_lse = attention_reference(q, k, v, bm, scale, alibi_slopes=slopes)
    gen = torch.Generator().manual_seed(4)
    pq, pk = torch.randperm(seq_q, generator=gen), torch.randperm(SEQ, generator=gen)
    got, got_lse = attention_reference(q[:, pq], k[:, pk], v[:, pk], _all_partial(bm), scale, alibi_slopes=slopes,
                                       q_pos=pq + SEQ - seq_q, kv_pos=pk)
    inv = torch.argsort(pq)
    _close(got[:, inv], want, 1e-5)
    _close(got_lse[:, :, inv], want_lse, 1e-5)
    ref, _ = softmax_attention(q, k, v, mask=PATTERNS[name], alibi_slopes=slopes)
    _close(want, ref, 1e-5)
    dq, dk, dv = torch.autograd.grad(got[:, inv].sum(), (q, k, v))
    eq, ek, ev = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in ((dq, eq), (dk, ek), (dv, ev)):
        _close(a, b, 2e-5)


def test_block_mask_cache_reused():
    q, k, v = _inputs()
    pattern = masks.sliding_window(9)
    subquad.attention(q, k, v, mask=pattern, backend="reference")
    cached = dict(pattern._block_masks)
    subquad.attention(q, k, v, mask=pattern, backend="reference")
    assert pattern._block_masks == cached and len(cached) == 1


_MEMORY_SCRIPT = """
import torch, subquad
from subquad import masks
torch.set_num_threads(1)  # timing-insensitive, and no thread oversubscription on a loaded CI machine
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
base = hwm()
for n in (16384, 32768):
    q, k, v = (torch.randn(1, n, 2, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        out = subquad.attention(q, k, v, mask=masks.sliding_window(512), backend='reference')
    fwd = hwm() - base
    out = subquad.attention(q, k, v, mask=masks.sliding_window(512), backend='reference')
    out.sum().backward()
    print(fwd, hwm() - base)
    del q, k, v, out
"""


def test_memory_follows_the_window_not_n_squared():
    # N = 16k: the (heads x N x N) fp32 scores would be 2 GiB; the tiled reference needs a few MB of tiles
    # beside its inputs and outputs (each 4 MB here), with and without autograd (checkpointed query blocks).
    # Doubling N to 32k must add memory linearly (dense scores would add 6 GiB more).
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (fwd_mb, fwdbwd_mb), (_, fwdbwd_2n_mb) = (map(float, line.split()) for line in res.stdout.splitlines())
    assert fwd_mb < 100, fwd_mb
    # ~80 MB of this is the autograd machinery's own first-use overhead, which varies between machines.
    assert fwdbwd_mb < 300, fwdbwd_mb
    assert fwdbwd_2n_mb - fwdbwd_mb < 200, (fwdbwd_mb, fwdbwd_2n_mb)


def test_backward_does_not_slice_full_length_tensors():
    """Query and key blocks come from one split each: no backward node slices a sequence-long tensor (each
    would fill a zero gradient of full length, per block: a quadratic backward for a linear pattern)."""
    from autograd_graph import slices_of_length

    q, k, v = (torch.randn(1, 1000, 2, 16, requires_grad=True) for _ in range(3))
    out = subquad.attention(q, k, v, mask=masks.sliding_window(64))
    assert slices_of_length(out, 1000) == 0



@pytest.mark.parametrize("mask", [None, masks.sliding_window(9), masks.padding([SEQ, 21]) & masks.causal],
                         ids=["causal", "window", "padding"])
def test_compiles_whole_and_equals_eager(mask):
    """``torch.compile(fullgraph=True)`` over the reference (the CPU's backend): the block walk read the
    BlockMask's lists on the host and broke the graph; traced, every key chunk is masked by the predicate."""
    q, k, v = _inputs(grad=True)

    def run(q, k, v):
        return subquad.attention(q, k, v, causal=mask is None, mask=mask, return_lse=True, backend="reference")

    eager = run(q, k, v)
    traced = torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    got = torch.autograd.grad(traced[0].square().sum(), (q, k, v))
    want = torch.autograd.grad(eager[0].square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

"""The Triton flash kernels (under TRITON_INTERPRET=1 on CPU, natively on a GPU) against the reference
attention: outputs, LSE and dq/dk/dv, for every pattern of subquad.masks, GQA/MQA, odd lengths, softcap,
ALiBi, fully masked rows, gathered positions, the LSE gradient and the deterministic backward."""

from __future__ import annotations

import os

import pytest
import torch

import subquad
from subquad import masks
from subquad.masks import PARTIAL, BlockMask
from subquad.ops.grid import interpreting
from subquad.ops.softmax.reference import attention_reference

# many small shapes: take each kernel's first Hopper configuration instead of autotuning every new key
os.environ.setdefault("SUBQUAD_FLASH_AUTOTUNE", "0")
TRITON = interpreting() or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 128 if DEV == "cuda" else 32  # the BlockMask block the engine builds on this device

# max |err| <= ATOL + RTOL * max |ref|, per dtype, for outputs and gradients; LSE is fp32 throughout
TOL = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}
LSE_TOL = 2e-3


def _qkv(b, nq, nkv, hq, hkv, d, dtype, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, hq, d, generator=g)
    k = torch.randn(b, nkv, hkv, d, generator=g)
    v = torch.randn(b, nkv, hkv, dv or d, generator=g)
    return [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)]


def _close(name, got, ref, dtype):
    atol, rtol = TOL[dtype]
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - ref).abs().max().item()
    bound = atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def _lse_close(got, ref):
    both_inf = torch.isinf(got) & torch.isinf(ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "lse: -inf rows differ"
    assert (got[~both_inf] - ref[~both_inf]).abs().max().item() <= LSE_TOL if (~both_inf).any() else True


def _check(q, k, v, *, causal=False, mask=None, softcap=None, alibi=None, grad_lse=False, deterministic=False,
           plan=None):
    """Run the Triton path and the reference on the same inputs and BlockMask; compare out, lse, grads
    (``plan=False``: the one-kernel BlockMask path even for patterns that the planner would split)."""
    bsz, nq, hq, d = q.shape
    nkv = k.shape[1]
    scale = d ** -0.5
    out, lse = subquad.attention(q, k, v, causal=causal, mask=mask, softcap=softcap, alibi_slopes=alibi,
                                 return_lse=True, backend="triton", deterministic=deterministic, plan=plan)
    bm = masks.resolve(mask, causal=causal, batch=bsz, heads=hq, seq_q=nq, seq_kv=nkv, device=q.device,
                       block_q=BLOCK, block_kv=BLOCK)
    ref, ref_lse = attention_reference(q, k, v, bm, scale, softcap, alibi)
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    g = torch.randn_like(out)
    loss, ref_loss = (out.float() * g).sum(), (ref.float() * g).sum()
    if grad_lse:
        gl = torch.randn_like(lse)
        loss = loss + (lse * gl).sum()
        ref_loss = ref_loss + (ref_lse * gl).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, q.dtype)
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_odd_length(dtype, causal):
    _check(*_qkv(2, 67, 67, 2, 2, 32, dtype), causal=causal)


def test_lse_gradient():
    # the LSE output is differentiable: dS = P * (dP - delta + dlse)
    _check(*_qkv(1, 50, 50, 2, 2, 32, torch.float16), causal=True, grad_lse=True)


def _patterns(n):
    g = torch.Generator().manual_seed(1)
    nb = -(-n // 32)
    layout = torch.rand(nb, nb, generator=g) < 0.4
    ids = torch.cat([torch.zeros(30), torch.ones(41), torch.full((n - 71,), 2)]).long()
    return {
        "window_causal": masks.sliding_window(16),
        "window_bidir": masks.sliding_window(20, causal=False),
        "strided": masks.strided(8),
        "fixed": masks.fixed(16, 4),
        "dilated": masks.dilated(24, 3),
        "block_sparse": masks.block_sparse(layout, 32),
        "longformer": masks.longformer(12, [0, 5]),
        "bigbird": masks.bigbird(12, [0], random_blocks=1, block=32),
        "document": masks.document(ids),
        "document_causal": masks.document(ids) & masks.causal,
        "prefix_lm": masks.prefix_lm(20),
        "tensor": masks.from_tensor(torch.rand(n, n, generator=g) < 0.3),
        "predicate": masks.from_predicate(lambda b, h, q, k: (q + 2 * k) % 5 != 0, name="mod5"),
    }


@pytest.mark.parametrize("name", list(_patterns(90)))
def test_pattern(name):
    n = 90
    mask = _patterns(n)[name]
    if DEV == "cuda" and isinstance(mask, masks.Pattern):
        mask = _patterns(n)[name]
    _check(*_qkv(1, n, n, 2, 2, 32, torch.bfloat16, seed=3), mask=mask)


def test_gqa_per_head_mask():
    # GQA (4 query heads on 2 KV heads) with a pattern that differs per head: the bitmask path, Hm > 1
    g = torch.Generator().manual_seed(2)
    mask = masks.from_tensor(torch.rand(4, 40, 40, generator=g) < 0.5)
    _check(*_qkv(1, 40, 40, 4, 2, 32, torch.bfloat16), mask=mask)


def test_mqa_causal_softcap_alibi():
    q, k, v = _qkv(2, 61, 61, 4, 1, 32, torch.float16)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEV)
    _check(q, k, v, causal=True, softcap=5.0, alibi=slopes)
    # the dQ programs' softcap gradient (the atomic path's dQ comes from the dK/dV programs)
    _check(q, k, v, causal=True, softcap=5.0, alibi=slopes, deterministic=True)


def test_alibi_per_batch_window():
    q, k, v = _qkv(2, 45, 45, 2, 2, 32, torch.bfloat16)
    slopes = torch.tensor([[0.3, 0.1], [0.2, 0.05]], device=DEV)
    _check(q, k, v, mask=masks.sliding_window(16, causal=False), alibi=slopes)


def test_fewer_queries_than_keys():
    # queries aligned to the end of the keys (decode-like prefill chunk)
    _check(*_qkv(1, 37, 90, 2, 1, 32, torch.bfloat16), causal=True)
    _check(*_qkv(1, 37, 90, 2, 2, 32, torch.float16), mask=masks.sliding_window(20))


def test_more_queries_than_keys_full():
    _check(*_qkv(1, 50, 29, 2, 2, 32, torch.float16))


@pytest.mark.parametrize("d,dv", [(48, 48), (64, 32)])
def test_head_dims(d, dv):
    # 48 pads to 64 in-kernel (as 96 pads to 128 on the GPU); dv may differ from d
    _check(*_qkv(1, 40, 40, 2, 2, d, torch.bfloat16, dv=dv), causal=True)


@pytest.mark.parametrize("layout", ["heads-major", "packed-kv", "k-packed-v-not"])
def test_inputs_whose_rows_are_not_heads_times_head_dim_apart(layout):
    """Views as models pass them: (B, H, N, D) tensors transposed (rows head_dim apart), K and V from one packed
    tensor (rows 2 x heads x head_dim apart), and K's row stride unlike V's. A band walk's kernels take a row
    stride that the tensors share as a constant and the others at run time (``launch._row_stride``): both must
    read the right rows, in the forward and the backward."""
    g = torch.Generator().manual_seed(3)
    b, n, hq, hkv, d = 1, 45, 4, 2, 32
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEV, torch.bfloat16).requires_grad_()  # noqa: E731
    if layout == "heads-major":
        q, k, v = (make(b, h, n, d).transpose(1, 2) for h in (hq, hkv, hkv))
    else:
        q = make(b, n, hq, d)
        kv = make(b, n, 2, hkv, d)
        k, v = kv.unbind(2) if layout == "packed-kv" else (kv[:, :, 0], make(b, n, hkv, d))
    _check(q, k, v, causal=True)


def test_fully_masked_rows():
    n = 50
    m = torch.rand(n, n, generator=torch.Generator().manual_seed(4)) < 0.4
    m[3] = False
    m[40:45] = False
    out, lse, grads = _check(*_qkv(1, n, n, 2, 2, 32, torch.float16), mask=masks.from_tensor(m))
    assert torch.all(out[:, 3] == 0) and torch.all(out[:, 40:45] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 3]))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, 40:45] == 0)


def test_document_rows_without_keys_under_window_and_causal():
    """The document term with a band that leaves each document's first token no key (keys 1 to 4 back):
    those rows give zeros and LSE -inf through the in-kernel terms, no bitmask."""
    q, k, v = _qkv(1, 40, 60, 2, 2, 32, torch.float16)
    ids = torch.tensor([0] * 25 + [1] * 17 + [2] * 18)
    mask = masks.document(ids) & masks.Band(1, 4)
    out, lse, _ = _check(q, k, v, mask=mask)
    _uses_terms(mask, False, 1, 2, 40, 60)
    first = [25 - 20, 42 - 20]                  # the queries sit at positions 20..59
    assert torch.isneginf(lse[0, :, first]).all() and (out[0, first] == 0).all()


def test_deterministic_backward():
    q, k, v = _qkv(1, 50, 50, 2, 1, 32, torch.bfloat16)
    _check(q, k, v, mask=masks.sliding_window(24), deterministic=True)
    out = subquad.attention(q, k, v, mask=masks.sliding_window(24), backend="triton", deterministic=True)
    g2 = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    out = subquad.attention(q, k, v, mask=masks.sliding_window(24), backend="triton", deterministic=True)
    g3 = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(g2, g3))


@pytest.mark.parametrize("torch_flag,asked,want", [(True, None, True), (False, None, False), (True, False, False)])
def test_deterministic_follows_torch_flag(torch_flag, asked, want, monkeypatch):
    """The Triton backward is the deterministic one where ``torch.use_deterministic_algorithms`` is on and the
    call leaves ``deterministic`` unset."""
    from subquad.ops.softmax.flash import launch

    seen = []
    real = launch.backward
    monkeypatch.setattr(launch, "backward", lambda *a, **kw: seen.append(a[-1]) or real(*a, **kw))
    q, k, v = _qkv(1, 40, 40, 2, 1, 32, torch.bfloat16)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(torch_flag)
        out = subquad.attention(q, k, v, causal=True, backend="triton", deterministic=asked)
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [want]


@pytest.mark.parametrize("mask,nq,nkv", [("causal", 256, 256), ("causal", 128, 256), ("window", 128, 200),
                                         ("window", 200, 256), ("full", 128, 200), ("bidirectional", 128, 200),
                                         ("bidirectional", 200, 256)])
def test_masked_tiles_at_even_and_ragged_lengths(mask, nq, nkv):
    # lengths at the kernels' even unit (128) load masked tiles without bounds and test no query bounds; a
    # ragged key end (200) keeps the key bounds where the pattern would keep the padding keys (not causal);
    # fewer queries than keys move the band's edge
    q, k, v = _qkv(1, nq, nkv, 2, 1, 32, torch.bfloat16, seed=5)
    pattern = {"causal": masks.causal, "window": masks.sliding_window(40), "full": None,
               "bidirectional": masks.sliding_window(40, causal=False)}[mask]
    _check(q, k, v, mask=pattern)
    if nkv == 200:
        _check(q, k, v, mask=pattern, deterministic=True)


@pytest.mark.parametrize("name", ["longformer", "document_causal"])
def test_partial_blocks_at_even_lengths(name):
    # the BlockMask path's partial blocks at lengths where every tile is inside the sequence
    n = 256
    pattern = {"longformer": masks.longformer(24, [0, 1, 77]),
               "document_causal": masks.document(torch.arange(n) // 100) & masks.causal}[name]
    _check(*_qkv(1, n, n, 2, 2, 32, torch.bfloat16, seed=6), mask=pattern)


def _all_partial(pattern, b, h, nq, nkv, block):
    """A BlockMask whose blocks are all partial: valid for any positions (the predicate decides)."""
    kind = torch.full((1, 1, -(-nq // block), -(-nkv // block)), PARTIAL, dtype=torch.int8, device=DEV)
    return BlockMask(pattern, kind, nq, nkv, block, block, b, h)


def test_positions_gathered_and_permuted():
    """q_pos / kv_pos: permuted queries (LSH-style) and gathered keys against causal + ALiBi."""
    from subquad.ops.softmax.flash import flash_attention_masked

    n, nk = 70, 45
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(1, n, nk, 2, 2, 32, torch.bfloat16)
    q_pos = torch.randperm(100, generator=g)[:n].to(DEV)
    kv_pos = torch.sort(torch.randperm(100, generator=g)[:nk]).values.to(DEV)
    slopes = torch.tensor([0.2, 0.05], device=DEV)
    bm = _all_partial(masks.causal, 1, 2, n, nk, BLOCK)
    out, lse = flash_attention_masked(q, k, v, bm, 32 ** -0.5, None, slopes, q_pos, kv_pos)
    ref, ref_lse = attention_reference(q, k, v, bm, 32 ** -0.5, None, slopes, q_pos, kv_pos)
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    gr = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * gr).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref.float() * gr).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, q.dtype)
    # the same positions through the bitmask path (a pattern with no kernel terms)
    bm2 = _all_partial(masks.from_predicate(lambda b, h, qp, kp: (qp >= kp) & ((qp - kp) % 3 != 1)), 1, 2, n, nk, BLOCK)
    out, lse = flash_attention_masked(q, k, v, bm2, 32 ** -0.5, None, None, q_pos, kv_pos)
    ref, ref_lse = attention_reference(q, k, v, bm2, 32 ** -0.5, None, None, q_pos, kv_pos)
    _close("out(bits)", out, ref, q.dtype)
    _lse_close(lse, ref_lse)


def test_varlen_cu_seqlens_is_document():
    from subquad.ops.softmax.flash import varlen_mask

    cu = torch.tensor([0, 13, 40, 64])
    m = varlen_mask(cu)
    assert torch.equal(m.to_dense(64), masks.document(torch.tensor([0] * 13 + [1] * 27 + [2] * 24)).to_dense(64))
    _check(*_qkv(1, 64, 64, 2, 2, 32, torch.float16), mask=m, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_mask(torch.tensor([1, 5]))


def test_fp32_runs_reference():
    q, k, v = _qkv(1, 20, 20, 1, 1, 16, torch.float32)
    out = subquad.attention(q, k, v, causal=True, backend="triton")
    ref, _ = attention_reference(q, k, v, masks.resolve(None, causal=True, batch=1, heads=1, seq_q=20, seq_kv=20,
                                                        device=q.device), 16 ** -0.5)
    assert torch.equal(out, ref)


def test_kernel_terms():
    from subquad.ops.softmax.flash.masking import KEY_FLAG, QUERY_FLAG, kernel_terms, pure_band

    assert pure_band(masks.causal) == (0, 1 << 30)
    assert pure_band(masks.sliding_window(8)) == (0, 7)
    assert pure_band(masks.sliding_window(8) & masks.causal) == (0, 7)
    assert pure_band(masks.sliding_window(8, causal=False)) == (-4, 4)
    t = kernel_terms(masks.prefix_lm(5))
    assert t.prefix == 5 and t.band == (0, 1 << 30) and not t.and_causal
    t = kernel_terms(masks.document(torch.zeros(8, dtype=torch.long)) & masks.causal)
    assert t.doc_ids is not None and t.band == (0, 1 << 30)
    # Longformer: contiguous globals are comparisons, scattered ones a flag per position
    t = kernel_terms(masks.longformer(8, list(range(16))))
    assert (t.band, t.prefix, t.q_prefix, t.flags, t.and_causal) == ((-4, 4), 16, 16, None, False)
    t = kernel_terms(masks.longformer(8, [3, 0, 1, 2], causal=True))
    assert (t.band, t.prefix, t.q_prefix, t.flags, t.and_causal) == ((0, 7), 4, 4, None, True)
    t = kernel_terms(masks.longformer(8, [0, 5], causal=True))
    assert t.prefix == t.q_prefix == 0 and t.and_causal
    assert t.flags.tolist() == [KEY_FLAG | QUERY_FLAG, 0, 0, 0, 0, KEY_FLAG | QUERY_FLAG]
    assert pure_band(masks.longformer(8, [0])) is None
    # BigBird: the random blocks become a layout once drawn (the BlockMask holds the prepared pattern)
    for causal in (False, True):
        bm = masks.bigbird(8, [0, 1], random_blocks=2, block=16, causal=causal).block_mask(100, block_q=32,
                                                                                           block_kv=32)
        t = kernel_terms(bm.pattern)
        assert t.layout is not None and t.layout_block == 16 and t.prefix == 2 and t.and_causal == causal
        assert t.layout.shape[-2:] == (7, 7)
    t = kernel_terms(masks.bigbird(8, (), random_blocks=1, block=16).block_mask(64, block_q=32, block_kv=32).pattern)
    assert t.layout is not None and t.prefix == 0 and t.flags is None
    # everything else keeps the bitmask
    for p in (masks.strided(4), masks.fixed(8, 2), masks.dilated(8, 2), masks.from_tensor(torch.ones(8, 8).bool()),
              masks.from_predicate(lambda b, h, q, k: q >= k), masks.prefix_lm(5) & masks.sliding_window(3),
              masks.longformer(8, [0]) & masks.sliding_window(3), masks.longformer(8, [0]) | masks.strided(4)):
        assert kernel_terms(p) is None


def _uses_terms(mask, causal, b, h, nq, nkv):
    """The flash path evaluated ``mask`` with in-kernel terms: no bitmask was built for its BlockMask."""
    bm = masks.resolve(mask, causal=causal, batch=b, heads=h, seq_q=nq, seq_kv=nkv, device=DEV, block_q=BLOCK,
                       block_kv=BLOCK)
    assert bm._cache.get("flash_terms") is not None
    assert not any(isinstance(key, tuple) and key[0] == "flash_bits" for key in bm._cache)
    assert (bm.kind == PARTIAL).any()


def test_custom_op_opcheck():
    """The custom op's fake implementation and autograd registration agree with the real one."""
    import subquad.ops.softmax.flash.op  # noqa: F401 - registers torch.ops.subquad.flash_fwd / flash_bwd

    q, k, v = [t.detach().requires_grad_() for t in _qkv(1, 20, 20, 2, 1, 16, torch.float16)]
    # 31 optional tensors (two BlockMasks' 12, then doc_ids, q_pos, kv_pos, flags, layout, slopes, rng), then
    # scale, softcap, band_lo, band_hi, prefix, q_prefix, layout_block, and_causal, mbq, mbk, b_mbq, b_mbk,
    # use_list, deterministic, dropout_p
    scalars = (0.25, 0.0, 0, 1 << 30, 0, 0, 1, False, 128, 128, 0, 0, False, False)
    from subquad.ops.softmax.dropout import new_rng

    for rng, p in ((None, 0.0), (new_rng(q.device, 0.3), 0.3)):
        args = (q, k, v) + (None,) * 30 + (rng,) + scalars + (p,)
        torch.library.opcheck(torch.ops.subquad.flash_fwd, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_eager_calls_match_the_custom_op(monkeypatch):
    """Eager calls run the two launches through a plain autograd.Function (the custom op's dispatch costs
    ~0.4 ms of host time per call with gradients); it gives the custom op's outputs and gradients exactly (where
    no dK/dV walk is long enough to be cut into pieces, which only eager calls do), with dropout too."""
    from subquad.ops.softmax import flash
    from subquad.ops.softmax.dropout import new_rng
    from subquad.ops.softmax.flash import _block_mask_args, op, schedule

    monkeypatch.setattr(schedule, "HEAVY_WALK", 0.0)     # the heaviest-first schedules whatever the walks
    q, k, v = [t.detach().requires_grad_() for t in _qkv(2, 70, 70, 4, 2, 32, torch.bfloat16)]
    bm = subquad.masks.resolve(masks.sliding_window(40), causal=False, batch=2, heads=4, seq_q=70, seq_kv=70,
                               device=q.device, block_q=32, block_kv=32)
    m = _block_mask_args(bm, None, None)
    rng = new_rng(q.device, 0.3)
    out, lse = op.run(q, k, v, m, 0.2, 5.0, None, False, dropout=(0.3, rng))
    assert type(out.grad_fn).__name__ == "_FlashBackward"
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    # the custom op gets the heaviest-first schedules too: without them its dQ sums ran in another order; it
    # never cuts walks into pieces (that reads walk lengths back to the host, on every call of a compiled graph)
    assert m.order is not None and m.order_t is not None
    monkeypatch.setattr(schedule, "walk_pieces", lambda *a: pytest.fail("the custom op read walk lengths back"))
    ops_out = torch.ops.subquad.flash_fwd(q, k, v, *op._block_tensors(m), *op._block_tensors(None), m.doc_ids,
                                          None, None, m.flags, m.layout, None, rng, 0.2, 5.0, m.band_lo,
                                          m.band_hi, m.prefix, m.q_prefix, m.layout_block, m.and_causal, m.mbq,
                                          m.mbk, 0, 0, True, False, 0.3)
    want = torch.autograd.grad(ops_out, (q, k, v), (grad_out, grad_lse))
    for a, b in zip((out, lse, *got), (*ops_out, *want)):
        assert torch.equal(a, b)


def test_custom_op_takes_the_backward_block_mask(monkeypatch):
    """A pattern whose passes run at different BlockMask block sizes (``m_backward``) runs its backward at the
    backward's blocks on the custom op too (a compiled model), as in eager calls: the same gradients exactly."""
    from subquad.ops.softmax.flash import _block_mask_args, launch, op

    blocks = []
    backward = launch.backward
    monkeypatch.setattr(launch, "backward", lambda *a, **kw: blocks.append(a[7].mbq) or backward(*a, **kw))

    q, k, v = [t.detach().requires_grad_() for t in _qkv(1, 150, 150, 2, 1, 32, torch.bfloat16, seed=7)]
    pattern = masks.longformer(20, [0, 3])
    m, m_backward = (_block_mask_args(subquad.masks.resolve(pattern, causal=False, batch=1, heads=2, seq_q=150,
                                                            seq_kv=150, device=q.device, block_q=b, block_kv=b),
                                      None, None) for b in (32, 64))
    grad_out = torch.randn(1, 150, 2, 32, generator=torch.Generator().manual_seed(8)).to(q)
    out, _ = op.run(q, k, v, m, 0.2, None, None, False, m_backward)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ops_out, _ = torch.ops.subquad.flash_fwd(q, k, v, *op._block_tensors(m), *op._block_tensors(m_backward),
                                             None, None, None, m.flags, m.layout, None, None, 0.2, 0.0, m.band_lo,
                                             m.band_hi, m.prefix, m.q_prefix, m.layout_block, m.and_causal, m.mbq,
                                             m.mbk, m_backward.mbq, m_backward.mbk, True, False, 0.0)
    want = torch.autograd.grad(ops_out, (q, k, v), grad_out)
    assert blocks == [64, 64]
    assert torch.equal(out, ops_out)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_compiled_calls_take_the_custom_op():
    """Under torch.compile the call is the custom op (traced, no graph break), not the eager Function."""
    from subquad.ops.softmax.flash import flash_attention

    q, k, v = _qkv(1, 64, 64, 2, 1, 32, torch.bfloat16)

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True)[0]

    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))
    assert any("subquad.flash_fwd" in t for t in traced), traced


def _compiled_like_eager(f, q, k, v):
    """``f`` compiled with fullgraph, after its eager call, gives that call's outputs and gradients (bf16 rounding)."""
    want = f(q, k, v)
    grads = torch.autograd.grad(want.float().sum(), (q, k, v))
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    _close("out", got, want, torch.bfloat16)
    for label, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(got.float().sum(), (q, k, v)), grads):
        _close(label, a, b, torch.bfloat16)


def test_compiled_global_token_pattern_after_an_eager_call():
    """Longformer's global tokens are recognised from their positions on the first (eager) call and kept on the
    pattern: a compiled function (fullgraph) then traces through, with the eager call's outputs and gradients
    (within bf16 rounding: the traced call runs each walk whole, the eager one may cut long walks in pieces, and
    on a GPU dQ is summed by atomics in any order)."""
    q, k, v = _qkv(1, 150, 150, 2, 1, 32, torch.bfloat16, seed=9)
    pattern = masks.longformer(20, [0, 1, 7])

    def f(q, k, v):     # (with the causal flag: the pattern AND-ed with causal is kept on the pattern too)
        return subquad.attention(q, k, v, mask=pattern, backend="triton") + subquad.attention(
            q, k, v, mask=pattern, causal=True, backend="triton")

    _compiled_like_eager(f, q, k, v)


def test_compiled_block_layout_without_an_eager_call(monkeypatch):
    """A block layout compiles with fullgraph on its first call: choosing between the heavy-first schedule and the
    grid's order, and between the BlockMask's two block sizes, reads block counts back from the device, which
    the traced call leaves alone (the GPU's block-size choice is made here too: the interpreter's own block
    skips it)."""
    from subquad.ops.softmax import flash

    monkeypatch.setattr(flash, "_mask_block", lambda device: flash.MASK_BLOCK)
    q, k, v = _qkv(1, 128, 128, 2, 1, 32, torch.bfloat16, seed=5)
    layout = (torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5) | torch.eye(4, dtype=torch.bool)
    pattern = masks.block_sparse(layout, 32)

    def f(q, k, v):
        return subquad.attention(q, k, v, mask=pattern, backend="triton")

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    _close("out", got, f(q, k, v), torch.bfloat16)


@pytest.mark.parametrize("name", ["strided", "fixed"])
def test_compiled_planned_pattern_after_an_eager_call(name):
    """A planned pattern (gathered columns) compiles with fullgraph after one eager call: the traced call runs
    the plan's components through the custom op and merges them in PyTorch (the eager call's two-source launch
    and fused merge are raw Triton launches), within bf16 rounding of the eager call."""
    q, k, v = _qkv(1, 150, 150, 2, 1, 32, torch.bfloat16, seed=11)
    pattern = {"strided": masks.strided(16), "fixed": masks.fixed(32, 4)}[name]

    def f(q, k, v):
        return subquad.attention(q, k, v, mask=pattern, backend="triton")

    _compiled_like_eager(f, q, k, v)


# ------------------------------------------------------------------------------------------------------------
# GPU only: larger shapes, every head dim, compile without graph breaks

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
def test_gpu_head_dims(d):
    _check(*_qkv(2, 1000, 1000, 4, 2, d, torch.bfloat16), causal=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["window_causal", "longformer", "bigbird", "document_causal", "block_sparse",
                                  "strided"])
def test_gpu_patterns_large(name):
    n = 1200
    g = torch.Generator().manual_seed(1)
    pats = {
        "window_causal": masks.sliding_window(256),
        "longformer": masks.longformer(256, [0, 700]),
        "bigbird": masks.bigbird(256, [0], random_blocks=2, block=128),
        "document_causal": masks.document(torch.randint(0, 4, (n,), generator=g).sort().values) & masks.causal,
        "block_sparse": masks.block_sparse(torch.rand(10, 10, generator=g) < 0.3, 128),
        "strided": masks.strided(64),
    }
    _check(*_qkv(2, n, n, 4, 2, 128, torch.bfloat16), mask=pats[name])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["causal", "longformer", "strided"])
def test_gpu_deterministic_backward_repeats_bitwise(name):
    """The deterministic backward at sizes where the atomic one sums dQ in a run-dependent order (many key tiles
    adding into each query row): correct, and the same bits on every run; a planned pattern (strided) too."""
    mask = {"causal": masks.causal, "longformer": masks.longformer(256, [0, 700]), "strided": masks.strided(64)}[name]
    q, k, v = _qkv(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=3)
    _check(q, k, v, mask=mask, deterministic=True, plan=None)
    grads = []
    for _ in range(3):
        out = subquad.attention(q, k, v, mask=mask, backend="triton", deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))


@pytest.mark.parametrize("deterministic", [False, True])
def test_wide_row_offsets_give_the_same_attention(monkeypatch, deterministic):
    """The kernels' int64 row offsets (``WIDE_ROWS``, taken where a row's offset reaches 2^31 elements) forced on
    small tensors: the band path and a BlockMask (Longformer's terms), both dQ forms, against the reference."""
    from subquad.ops.softmax.flash import launch

    monkeypatch.setattr(launch, "_wide_rows", lambda *tensors: True)
    q, k, v = _qkv(1, 70, 70, 4, 2, 32, torch.bfloat16, seed=5)
    _check(q, k, v, causal=True, deterministic=deterministic)
    _check(q, k, v, mask=masks.longformer(16, [0, 3]), deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.gpu_alone
@gpu
def test_gpu_rows_past_two_to_the_31_elements():
    """A row's offset (row x heads x head_dim) of 2^31 elements or more, 128 heads of 128 past 128k tokens, was
    taken in int32 and wrapped: loads and stores outside the tensors (under the interpreter, q, k, v rows 2^20
    elements apart segfaulted from row 2048 on; ~40 GB here). The last rows equal the same call on the sequence's
    tail: the band path (dQ programs, ``window``) and the BlockMask path (atomic dQ, ``document_window``). The
    two masks run in one test, one after the other: as two cases in parallel workers they ran out of an H100's
    memory."""
    n, heads, d, w, tail = (1 << 17) + 128, 128, 128, 16, 256
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, d, generator=g, device=DEV, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    ids = torch.arange(n) * 3 // n
    for mask in ("window", "document_window"):
        results = []
        for lo_q, lo_k in ((0, 0), (n - tail, n - tail - w + 1)):     # the whole sequence, then its tail
            pattern = masks.sliding_window(w)
            if mask == "document_window":
                pattern = pattern & masks.document(ids[lo_k:])
            qs, ks, vs = (t[:, lo:] for t, lo in ((q, lo_q), (k, lo_k), (v, lo_k)))
            out, lse = subquad.attention(qs, ks, vs, mask=pattern, return_lse=True, backend="triton")
            grad_out = torch.randn(1, tail, heads, d, generator=torch.Generator(device=DEV).manual_seed(1),
                                   device=DEV, dtype=out.dtype)
            grads = torch.autograd.grad(out[:, -tail:], (qs, ks, vs), grad_out)
            # (the tail's last keys are seen by the tail's queries alone)
            results.append([out[:, -tail:], lse[..., -tail:]] + [t[:, -tail:] for t in grads])
            del out, lse, grads
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results):
            _close(f"{mask} {name}", got, want, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(256, 3 * 256, dtype=torch.bfloat16, device=DEV)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 64).unbind(2)
            return subquad.attention(q, k, v, causal=True) + subquad.attention(
                q, k, v, mask=masks.sliding_window(64))

    model = Block()
    x = torch.randn(2, 300, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    ref = model(x)
    assert (out - ref).abs().max().item() < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_compile_fullgraph_global_tokens():
    # a pattern with global tokens at lengths where the passes take different BlockMask blocks: compiled after
    # one eager call (which recognises the tokens), the custom op carries the backward's blocks
    pattern = masks.longformer(512, list(range(16)))
    q, k, v = _qkv(1, 16384, 16384, 4, 4, 64, torch.bfloat16, seed=10)

    def f(q, k, v):
        return subquad.attention(q, k, v, mask=pattern, backend="triton")

    want = f(q, k, v)
    grads = torch.autograd.grad(want.float().sum(), (q, k, v))
    got = torch.compile(f, fullgraph=True)(q, k, v)
    got_grads = torch.autograd.grad(got.float().sum(), (q, k, v))
    for a, b in zip((got, *got_grads), (want, *grads)):
        assert (a.float() - b.float()).abs().max().item() <= 1e-2 * b.float().abs().max().item()


def test_kernel_arguments_are_kept_per_block_mask_and_positions():
    from subquad.ops.softmax.flash import _block_mask_args

    bm = BlockMask.build(masks.sliding_window(64), batch=1, heads=1, seq_q=256, seq_kv=256, block_q=64,
                         block_kv=64, device="cpu")
    pos = torch.arange(256)
    first = _block_mask_args(bm, pos, pos)
    assert _block_mask_args(bm, pos, pos) is first and first.q_pos.dtype == torch.int32
    other = torch.arange(256)
    assert _block_mask_args(bm, other, other) is not first
    assert _block_mask_args(bm, None, None).q_pos is None


def test_mask_block_is_64_where_it_visits_fewer_pairs(monkeypatch):
    """Outside the interpreter the engine builds a pattern's BlockMask at 128 or 64 for each pass, 64 where it
    visits at most 0.85 (forward) / 0.6 (backward) of the pairs of 128: BigBird's 64-wide random blocks take 64
    for both passes at 1024, its forward only at 512, a 128 block layout stays 128. The choice is kept per
    pattern and shape, and the kernels give the reference's results with the passes at different sizes."""
    from subquad.ops.softmax import flash

    monkeypatch.setattr(flash, "_mask_block", lambda device: flash.MASK_BLOCK)
    g = torch.Generator().manual_seed(2)
    bigbird = masks.bigbird(64, [0], random_blocks=2, block=64, seed=0)
    layout = masks.block_sparse(torch.rand(8, 8, generator=g) < 0.5, 128)
    for mask, n, blocks in ((bigbird, 1024, (64, 64)), (bigbird, 512, (64, 128)), (layout, 1024, (128, 128))):
        chosen = flash._resolve_tiled(mask, False, 1, 2, n, n, "cpu")
        assert [bm.block_q for bm in chosen] == [bm.block_kv for bm in chosen] == list(blocks)
        assert all(a is b for a, b in zip(flash._resolve_tiled(mask, False, 1, 2, n, n, "cpu"), chosen))
    longformer = masks.longformer(256, [0])
    assert [bm.block_q for bm in flash._resolve_tiled(longformer, False, 1, 1, 384, 384, "cpu")] == [64, 128]
    _check(*_qkv(1, 384, 384, 1, 1, 32, torch.bfloat16, seed=3), mask=longformer, plan=False)

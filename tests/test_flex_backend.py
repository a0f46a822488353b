"""``backend="flex"``: FlexAttention on subquad's block map, against the reference.

On the CPU FlexAttention runs eagerly and forward only, which checks what the adapter builds (the block
lists, the mask_mod from ``fa4.emit``, the score_mod for softcap and ALiBi, the LSE); the GPU test checks the
compiled kernels, gradients included."""

from __future__ import annotations

import warnings

import pytest
import torch

from subquad import attention, masks
from subquad.ops.softmax import dispatch, flex

pytestmark = pytest.mark.skipif(not flex.is_available(), reason="this PyTorch has no FlexAttention")

N = 300
DOC_IDS = torch.tensor([0] * 100 + [1] * 150 + [2] * 50)
LAYOUT = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) < 0.5

PATTERNS = {
    "causal": None,
    "window": masks.sliding_window(64),
    "longformer": masks.longformer(32, [0, 5]),
    "bigbird": masks.bigbird(32, [0], random_blocks=2, seed=0),
    "strided": masks.strided(16),
    "fixed": masks.fixed(32, 4),
    "dilated": masks.dilated(32, 2),
    "prefix_lm": masks.prefix_lm(50),
    "document": masks.document(DOC_IDS),
    "block_sparse": masks.block_sparse(LAYOUT, 128),
    "composite": masks.sliding_window(40, causal=False) | masks.strided(64),
}


def _inputs(b=2, n=N, hq=4, hkv=2, d=32, seq_q=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, seq_q or n, hq, d, generator=gen)
    k, v = (torch.randn(b, n, hkv, d, generator=gen) for _ in range(2))
    return q, k, v


def _close(a, b, tol=2e-5):
    assert a.shape == b.shape
    finite = torch.isfinite(b)
    assert bool((torch.isfinite(a) == finite).all())
    assert float((a[finite] - b[finite]).abs().max()) < tol


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_pattern_matches_the_reference(name):
    q, k, v = _inputs()
    mask = PATTERNS[name]
    with torch.no_grad():
        got = attention(q, k, v, causal=mask is None, mask=mask, return_lse=True, backend="flex")
        want = attention(q, k, v, causal=mask is None, mask=mask, return_lse=True, backend="reference")
    _close(got[0], want[0])
    _close(got[1], want[1])
    if name == "window":
        # without return_lse flex is not asked for it; the output is the same
        with torch.no_grad():
            _close(attention(q, k, v, mask=mask, backend="flex"), want[0])


@pytest.mark.parametrize("hkv", [1, 4])
def test_softcap_alibi_mqa_and_queries_at_the_end(hkv):
    # 40 queries aligned to the end of 300 keys (decode-like), per-batch ALiBi slopes, softcap
    q, k, v = _inputs(hkv=hkv, seq_q=40)
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    for mask in (masks.sliding_window(64), masks.longformer(32, [0, 5]) & masks.causal):
        with torch.no_grad():
            got = attention(q, k, v, mask=mask, softcap=20.0, alibi_slopes=slopes, return_lse=True, backend="flex")
            want = attention(q, k, v, mask=mask, softcap=20.0, alibi_slopes=slopes, return_lse=True,
                             backend="reference")
        _close(got[0], want[0])
        _close(got[1], want[1])


def test_fully_masked_rows_give_zeros_and_minus_infinity():
    allowed = torch.ones(N, N, dtype=torch.bool).tril()
    allowed[7] = False
    allowed[200:210] = False
    q, k, v = _inputs()
    with torch.no_grad():
        out, lse = attention(q, k, v, mask=allowed, return_lse=True, backend="flex")
    assert not torch.isnan(out).any()
    assert bool((out[:, 7] == 0).all()) and bool((out[:, 200:210] == 0).all())
    assert bool(torch.isneginf(lse[:, :, 7]).all()) and bool(torch.isfinite(lse[:, :, :7]).all())


def test_block_lists_are_subquads_own():
    q, k, v = _inputs(n=1000)
    bm = flex._block_mask(q, k, causal=False, mask=masks.bigbird(64, [0, 1], random_blocks=1, seed=3))
    ours = (bm.kind != masks.EMPTY).expand(1, 1, *bm.kind.shape[2:])
    theirs = flex.flex_block_mask(bm).to_dense().bool()
    assert torch.equal(theirs, ours)
    assert flex.flex_block_mask(bm) is flex.flex_block_mask(bm)     # made once per BlockMask


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # torch.compile's imports of torch.jit
def test_compiled_kernels_follow_the_block_lists():
    """Eager flex evaluates the mask_mod everywhere; the compiled kernels visit only the listed blocks and
    trace the mask_mod and score_mod. The CPU's compiled flex has neither LSE nor backward: output only."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    q, k, v = _inputs(b=1, n=512)
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(torch_flex, dynamic=False)
    for name in ("bigbird", "document", "strided"):
        mask = PATTERNS[name] if name != "document" else masks.document(torch.tensor([0] * 200 + [1] * 312))
        block_mask = flex.flex_block_mask(flex._block_mask(q, k, causal=False, mask=mask))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           score_mod=flex._score_mod(30.0, slopes, 0), enable_gqa=True).transpose(1, 2)
            want = attention(q, k, v, mask=mask, softcap=30.0, alibi_slopes=slopes, backend="reference")
        _close(got, want)


def test_flex_is_compiled_with_static_shapes(monkeypatch):
    """Every pattern's mask_mod is one function over different closure tensors: with dynamo's automatic
    dynamic shapes the second pattern made them symbolic (BigBird forward 18% slower on the H100)."""
    seen = {}
    monkeypatch.setattr(flex, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    flex._flex(torch.device("cuda"))
    assert seen.get("dynamic") is False


def test_calls_flex_cannot_run_are_value_errors():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="backend: 'flex' cannot run"):
        attention(q, k, v, mask=lambda b, h, qp, kp: qp >= kp, backend="flex")
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="no backward on the CPU"):
        attention(q, k, v, causal=True, backend="flex")
    with pytest.raises(ValueError, match="deterministic"):
        attention(q, k, v, causal=True, backend="flex", deterministic=True)
    q.requires_grad_(False)
    slopes = torch.rand(4, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient flows"):
        attention(q, k, v, causal=True, alibi_slopes=slopes, backend="flex")


def test_strict_determinism_refuses_flex_after_a_warn_only_call():
    """The prepared-call cache kept a call that warn-only mode had let run, and a later strict call ran it."""
    q, k, v = _inputs()
    try:
        for warn_only in (True, False, True, False):
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            if warn_only:   # (it warns on the first such call; the prepared call then runs quietly)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    attention(q, k, v, causal=True, backend="flex")
            else:
                with pytest.raises(ValueError, match="deterministic"):
                    attention(q, k, v, causal=True, backend="flex")
    finally:
        torch.use_deterministic_algorithms(False)


def test_alibi_slopes_updated_in_place_reach_flex():
    """bf16 slopes: the score_mod closure held a float copy, kept per slopes tensor, so an in-place update
    (a trained slope) was not seen."""
    q, k, v = _inputs()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.bfloat16)
    for _ in range(2):
        with torch.no_grad():
            got = attention(q, k, v, causal=True, alibi_slopes=slopes, backend="flex")
            want = attention(q, k, v, causal=True, alibi_slopes=slopes.float(), backend="reference")
        _close(got, want)
        slopes.mul_(4)


def test_auto_runs_flex_only_where_the_table_ranks_it(monkeypatch):
    q, k, v = _inputs()
    mask = masks.bigbird(32, [0], random_blocks=2, seed=0)
    sig = dispatch.signature(q, k, v, mask=mask)
    empty = dispatch.Table()
    assert "flex" not in empty.ranking(sig)[0]
    ranked = dispatch.Table({"entries": [{**{f: getattr(sig, f) for f in ("capability", "dtype", "head_dim",
                                                                        "pattern", "mode")},
                                          "ranking": [["flex", 1.0], ["reference", 9.0]]}]})
    monkeypatch.setattr(dispatch, "table", lambda: ranked)
    assert dispatch.choose(q, k, v, mask=mask) == "flex"
    q.requires_grad_(True)          # the CPU has no flex backward: the next in line runs
    assert dispatch.choose(q, k, v, mask=mask) == "reference"


def test_flag_tensors_reach_flex_as_bool():
    # int32 flags compared inside the mask_mod made flex's kernels 2.5x slower on BigBird (H100)
    q, k, v = _inputs()
    for name in ("bigbird", "block_sparse"):
        spec, aux = flex._spec(flex._block_mask(q, k, causal=False, mask=PATTERNS[name]))
        assert "layout" in repr(spec) and [a.dtype for a in aux] == [torch.bool], name
    spec, aux = flex._spec(flex._block_mask(q, k, causal=False, mask=PATTERNS["document"]))
    assert spec[0] == "document" and aux[0].dtype == torch.int32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels and their backward need a GPU")
@pytest.mark.parametrize("name", ["window", "bigbird", "document", "prefix_lm", "strided"])
def test_gpu_bf16_outputs_and_gradients(name):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, h, 64, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    # the document ids must cover this test's 1000 positions
    mask = PATTERNS[name] if name != "document" else masks.document(torch.arange(1000) * 4 // 1000)
    out, lse = attention(q, k, v, mask=mask, softcap=30.0, return_lse=True, backend="flex")
    grad = torch.randn(out.shape, generator=gen, device="cuda", dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out_r, lse_r = attention(*ref, mask=mask, softcap=30.0, return_lse=True, backend="reference")
    want = torch.autograd.grad(out_r, ref, grad.float())
    assert float((out.float() - out_r).abs().max()) < 2e-2
    _close(lse, lse_r, tol=2e-2)
    for a, b in zip(got, want):
        assert float((a.float() - b).abs().max()) < 5e-2 * max(1.0, float(b.abs().max()))

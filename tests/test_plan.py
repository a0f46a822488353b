"""The pattern planner: exact coverage (no pair twice, none dropped) and planned attention equal to the
dense-mask oracle in outputs, LSE and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from oracles import softmax_attention
from subquad import masks
from subquad.masks import plan as plan_mod
from subquad.masks.patterns import INF, Band, BuildContext, PeriodicColumns, Pattern
from subquad.masks.plan import plan
from subquad.ops.softmax.planned import merge_lse, planned_attention

TILE = 32


def dense_mask(pattern, nq, nk):
    p = pattern.prepare(BuildContext(1, 1, nq, nk, torch.device("cpu")))
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    keep = p.predicate(zero, zero, torch.arange(nk - nq, nk).view(1, 1, -1, 1), torch.arange(nk).view(1, 1, 1, -1))
    return keep.reshape(keep.shape[-2:]).expand(nq, nk)


# (name, pattern, seq_q, seq_kv, roles the plan must choose)
PLANNED = [
    ("strided", masks.strided(16), 200, 200, ["local", "columns"]),
    ("strided-not-multiple", masks.strided(24), 190, 190, ["local", "columns"]),
    ("strided-noncausal", masks.strided(16, causal=False), 150, 203, ["local", "columns"]),
    ("fixed", masks.fixed(32, 4), 200, 200, ["local", "columns"]),
    ("fixed-unaligned", masks.fixed(20, 3), 150, 203, ["local", "columns"]),
    ("fixed-noncausal", masks.fixed(32, 4, causal=False), 200, 200, ["local", "columns"]),
    ("dilated", masks.dilated(40, 4), 200, 200, ["classes"]),
    ("dilated-noncausal", masks.dilated(40, 2, causal=False), 96, 128, ["classes"]),
    ("dilated-odd-length", masks.dilated(40, 3, causal=False), 200, 200, ["class"] * 3),
    # shorter than the dilation (a short prompt): fewer classes than the dilation (it raised in arange)
    ("dilated-short", masks.dilated(3, 7), 5, 5, ["class"] * 5),
    ("longformer-spread", masks.longformer(16, [0, 1, 50, 130]), 200, 200, ["local", "columns", "rows"]),
    # causal: the global queries see keys <= themselves, all inside the band: no row component
    ("longformer-causal-rows-in-band", masks.longformer(100, [0, 1, 40, 70], causal=True), 200, 200,
     ["local", "columns"]),
    # random blocks finer than the tiles: a component of their own, less the local pairs
    ("bigbird-spread", masks.bigbird(16, [0, 5, 100, 170], random_blocks=2, block=16, causal=True), 200, 200,
     ["local", "blocks", "columns", "rows"]),
    ("bigbird-rows-kept", masks.bigbird(24, [3, 7, 80, 150], random_blocks=2, block=16), 200, 200,
     ["local", "blocks", "columns", "rows"]),
    ("bigbird-folded-globals", masks.bigbird(64, [0, 3], random_blocks=2, block=16, causal=True), 256, 256,
     ["local", "blocks"]),
    ("bigbird-no-globals", masks.bigbird(24, [], random_blocks=3, block=8), 150, 203, ["local", "blocks"]),
    ("window-and-columns", masks.sliding_window(8) | PeriodicColumns(10, [0, 3]), 120, 120, ["local", "columns"]),
]


@pytest.mark.parametrize("name,pattern,nq,nk,roles", PLANNED, ids=[c[0] for c in PLANNED])
def test_plan_covers_every_kept_pair_once(name, pattern, nq, nk, roles):
    pl = plan(pattern, nq, nk, block_q=TILE, block_kv=TILE)
    assert [c.role for c in pl.components] == roles
    coverage = pl.coverage()
    assert int(coverage.max()) <= 1, "a pair is counted by two components"
    assert torch.equal(coverage, dense_mask(pattern, nq, nk).to(torch.int32))
    assert sum(pl.kept_pairs()) == int(dense_mask(pattern, nq, nk).sum())


@st.composite
def plannable(draw, max_queries: int = 160, max_extra_keys: int = 40) -> tuple[Pattern, int, int]:
    """``(pattern, seq_q, seq_kv)``: a named scattered pattern, or a composition the planner reads, with its
    parameters drawn (global tokens inside the keys), and lengths with up to ``max_extra_keys`` more keys."""
    seq_q = draw(st.integers(1, max_queries))
    seq_kv = seq_q + draw(st.integers(0, max_extra_keys))
    kind = draw(st.sampled_from(["strided", "fixed", "dilated", "longformer", "bigbird", "window|columns",
                                 "strided&band", "fixed|window"]))
    causal = draw(st.booleans())
    small = st.integers(1, 40)
    if kind == "strided":
        pattern = masks.strided(draw(small), causal=causal)
    elif kind == "fixed":
        block = draw(small)
        pattern = masks.fixed(block, draw(st.integers(1, block)), causal=causal)
    elif kind == "dilated":
        pattern = masks.dilated(draw(st.integers(1, 60)), draw(st.integers(1, 8)), causal=causal)
    elif kind in ("longformer", "bigbird"):
        tokens = draw(st.lists(st.integers(0, seq_kv - 1), max_size=8, unique=True))
        if kind == "longformer":
            pattern = masks.longformer(draw(small), tokens, causal=causal)
        else:
            pattern = masks.bigbird(draw(small), tokens, random_blocks=draw(st.integers(0, 3)),
                                    block=draw(st.sampled_from([4, 8, 16, 32])), seed=draw(st.integers(0, 5)),
                                    causal=causal)
    elif kind == "window|columns":
        period = draw(st.integers(2, 30))
        residues = draw(st.lists(st.integers(0, period - 1), min_size=1, max_size=3, unique=True))
        pattern = masks.sliding_window(draw(st.integers(1, 30)), causal=causal) | PeriodicColumns(period, residues)
    elif kind == "strided&band":
        pattern = masks.strided(draw(st.integers(1, 30))) & Band(draw(st.integers(0, 10)), INF)
    else:
        pattern = masks.fixed(draw(st.integers(2, 30)), 1, causal=causal) | masks.sliding_window(draw(small))
    return pattern, seq_q, seq_kv


@settings(max_examples=300, deadline=None, derandomize=True)
@given(plannable(), st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.booleans())
def test_plan_of_any_drawn_pattern_covers_every_kept_pair_once(case, block_q, block_kv, exact):
    pattern, nq, nk = case
    pl = plan(pattern, nq, nk, block_q=block_q, block_kv=block_kv, exact_positions=exact)
    if pl is None:
        return
    want = dense_mask(pattern, nq, nk).to(torch.int32)
    coverage = pl.coverage()
    assert int(coverage.max()) <= 1, f"a pair counted twice: {pl.describe()}"
    assert torch.equal(coverage, want), f"{pl.describe()}: pairs differ at {(coverage != want).nonzero()[:4].tolist()}"
    assert sum(pl.kept_pairs()) == int(want.sum())


def test_plan_none_without_scattered_parts():
    assert plan(masks.sliding_window(64), 256) is None
    assert plan(masks.causal, 256) is None
    assert plan(masks.document(torch.tensor([0] * 100 + [1] * 156)), 256) is None
    # global tokens in the first key tiles fold into the BlockMask, their rows too when nothing is gathered
    # (random blocks as large as the tiles stay in it too)
    assert plan(masks.bigbird(64, [0, 3], random_blocks=2, block=TILE, causal=True), 256, block_q=TILE,
                block_kv=TILE) is None
    assert plan(masks.bigbird(24, [3, 7], random_blocks=2, block=TILE), 200, block_q=TILE, block_kv=TILE) is None
    assert plan(masks.longformer(16, [0, 1, 2], causal=True), 150, 203, block_q=TILE, block_kv=TILE) is None
    assert plan(masks.longformer(512, range(16)), 16384) is None
    assert plan(masks.longformer(16, [0, 40]), 200, block_q=TILE, block_kv=TILE) is None


def test_fine_layouts_split_only_beside_other_local_terms(monkeypatch):
    import subquad.masks.plan as plan_module

    # a block layout alone is the BlockMask path already, whatever its block
    assert plan(masks.block_sparse(torch.rand(8, 8) < 0.3, block=16), 128) is None
    bigbird = masks.bigbird(64, [0, 3], random_blocks=2, block=16)
    blocks = plan(bigbird, 256).components[1]
    assert blocks.role == "blocks" and "16 positions" in blocks.note and blocks.block is None
    # a layout the kernels can tile runs at its own blocks (traced calls and the reference take them too)
    at64 = plan(masks.bigbird(512, list(range(16)), random_blocks=3, block=64), 4096)
    assert [c.block for c in at64.components] == [None, 64]
    assert sum(at64.kept_pairs()) == int(dense_mask(masks.bigbird(512, list(range(16)), random_blocks=3, block=64),
                                                    4096, 4096).sum())
    monkeypatch.setattr(plan_module, "SPLIT_FINE_LAYOUTS", False)
    assert plan(bigbird, 256) is None


def test_plan_uses_band_predicates_for_the_sparse_transformer_patterns():
    strided = plan(masks.strided(256), 4096)
    assert isinstance(strided.components[0].pattern, Band)
    cols = strided.components[1]
    assert (cols.pattern.lo, cols.pattern.hi) == (256, INF) and cols.kv_index.numel() == 4096 // 256
    fixed = plan(masks.fixed(128, 8), 4096)
    # the same-block part is enforced by the tiles; partial tiles only need causality
    assert (fixed.components[0].pattern.lo, fixed.components[0].pattern.hi) == (0, INF)
    assert (fixed.components[1].pattern.lo, fixed.components[1].pattern.hi) == (1, INF)


@pytest.mark.parametrize("pattern,n,stride", [
    (masks.strided(16), 200, (15, 1, 16)),
    (masks.strided(24, causal=False), 203, (23, 1, 24)),
    (masks.fixed(32, 4), 200, (28, 4, 32)),
    (masks.fixed(20, 3), 203, (17, 3, 20)),
    # the last period cut: 93 columns, not whole periods of 6
    (masks.fixed(16, 6), 253, None),
    # residues apart, and explicit columns: index kernels
    (masks.sliding_window(8) | PeriodicColumns(16, [3, 9]), 200, None),
    (masks.longformer(16, [0, 1, 50, 130]), 200, None),
], ids=["strided", "strided-noncausal", "fixed", "fixed-unaligned", "fixed-cut-period", "residues-apart",
        "explicit"])
def test_periodic_columns_are_a_stride(pattern, n, stride):
    """Whole periods of consecutive columns (the strided and fixed patterns) carry ``kv_stride``, which gathers
    exactly ``kv_index``'s keys as a strided view (and adds their gradients back the same way)."""
    from subquad.ops.softmax.flash.op import _periodic_keys

    columns = next(c for c in plan(pattern, n, n, block_q=TILE, block_kv=TILE).components if c.role == "columns")
    assert columns.kv_stride == stride
    if stride is not None:
        k = torch.arange(2 * n * 3, dtype=torch.float32).view(2, n, 3, 1)
        count = columns.kv_index.numel()
        gathered = _periodic_keys(k, stride, count).reshape(2, count, 3, 1)
        assert torch.equal(gathered, k.index_select(1, columns.kv_index))
        grad, grad2 = torch.zeros_like(k), torch.randn(2, count, 3, 1)
        rows = _periodic_keys(grad, stride, count)
        rows.add_(grad2.reshape(rows.shape))
        assert torch.equal(grad, torch.zeros_like(k).index_add_(1, columns.kv_index, grad2))


def test_describe_names_components_and_counts():
    text = plan(masks.strided(256), 4096).describe()
    assert "local" in text and "columns" in text and "16 gathered keys" in text and "log-sum-exp" in text
    # the band and its gathered columns run as one launch on the Triton backend; BigBird's two parts run one after
    # the other, the second going on from the first's result, and backward as one pass
    assert "two key sources" in text and "one pass over the output" not in text and "goes on from" not in text
    text = plan(masks.bigbird(64, [0], random_blocks=2, block=32, seed=0), 1024).describe()
    assert "two key sources" not in text and "one pass over the output" in text and "goes on from" in text
    text = plan(masks.dilated(1024, 4), 4096).describe()
    assert "4 classes" in text and "two key sources" not in text
    kept = int(dense_mask(masks.strided(64), 1024, 1024).sum())
    assert f"{kept:,} kept pairs" in plan(masks.strided(64), 1024).describe()



def test_kept_pairs_of_a_plan_prepared_on_the_accelerator():
    """describe() counts on the CPU: block layouts were prepared on the device the plan runs on (it crashed
    on CUDA with a device mismatch)."""
    from subquad.ops.softmax.planned import plan_for

    pattern = masks.bigbird(64, [0, 5, 300, 700], random_blocks=2, block=32, seed=0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = plan_for(pattern, False, 1024, 1024, dev, False)
    on_cpu = plan(pattern, 1024, device="cpu")
    assert on_device.kept_pairs() == on_cpu.kept_pairs()
    assert sum(on_cpu.kept_pairs()) == int(dense_mask(pattern, 1024, 1024).sum())
    assert f"{sum(on_cpu.kept_pairs()):,} kept pairs" in on_device.describe()

def _qkv(nq, nk, hq, hkv, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(2, n, h, d, generator=gen, dtype=dtype).requires_grad_(True)  # noqa: E731
    return mk(nq, hq), mk(nk, hkv), mk(nk, hkv)


def _check_against_oracle(pattern, pl, q, k, v, alibi=None, softcap=None):
    scale = q.shape[-1] ** -0.5
    out, lse = planned_attention(q, k, v, pl, scale, softcap=softcap, alibi_slopes=alibi)
    ref, ref_lse = softmax_attention(q, k, v, mask=dense_mask(pattern, q.shape[1], k.shape[1]), scale=scale,
                                     softcap=softcap, alibi_slopes=alibi)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=1e-4)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen)
    g_lse = torch.where(finite, torch.randn(lse.shape, generator=gen, dtype=torch.float64), 0)
    got = torch.autograd.grad((out * g_out).sum() + (lse.masked_fill(~finite, 0) * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g_out).sum() + (ref_lse.masked_fill(~finite, 0) * g_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("name,pattern,nq,nk,roles", PLANNED, ids=[c[0] for c in PLANNED])
def test_planned_attention_matches_oracle(name, pattern, nq, nk, roles):
    q, k, v = _qkv(nq, nk, 4, 2)  # GQA
    _check_against_oracle(pattern, plan(pattern, nq, nk, block_q=TILE, block_kv=TILE), q, k, v)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(plannable(120, 30), st.sampled_from([16, 32]), st.sampled_from([(4, 2), (2, 2), (3, 1)]), st.booleans())
def test_planned_attention_of_any_drawn_pattern_matches_oracle(case, block, heads, alibi):
    pattern, nq, nk = case
    pl = plan(pattern, nq, nk, block_q=block, block_kv=block, exact_positions=alibi)
    assume(pl is not None)
    q, k, v = _qkv(nq, nk, *heads)
    slopes = torch.rand(heads[0], generator=torch.Generator().manual_seed(nq)) if alibi else None
    _check_against_oracle(pattern, pl, q, k, v, alibi=slopes)


def test_global_rows_split_over_keys(monkeypatch):
    monkeypatch.setattr(plan_mod, "ROW_CHUNK", 48)
    pattern = masks.longformer(16, [0, 70, 100])
    pl = plan(pattern, 192, block_q=TILE, block_kv=TILE)
    assert pl.components[-1].role == "rows" and pl.components[-1].split == 4
    assert torch.equal(pl.coverage(), dense_mask(pattern, 192, 192).to(torch.int32))
    q, k, v = _qkv(192, 192, 2, 1)  # MQA
    _check_against_oracle(pattern, pl, q, k, v, softcap=5.0)


def test_rows_replace_in_place_only_without_gradients():
    pattern = masks.longformer(16, [0, 70, 100])
    pl = plan(pattern, 192, block_q=TILE, block_kv=TILE)
    q, k, v = _qkv(192, 192, 2, 2)
    with torch.no_grad():
        out, lse = planned_attention(q, k, v, pl, 0.25)
    want, want_lse = planned_attention(q, k, v, pl, 0.25)
    assert want.requires_grad and not out.requires_grad
    torch.testing.assert_close(out, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse.detach(), atol=1e-6, rtol=1e-6)


def test_rows_with_no_key_give_zero_and_no_nan():
    pattern = masks.strided(16) & Band(5, INF)  # queries 0..4 see nothing
    pl = plan(pattern, 100, block_q=TILE, block_kv=TILE)
    q, k, v = _qkv(100, 100, 2, 2)
    out, lse = planned_attention(q, k, v, pl, 0.25)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])) and torch.isneginf(lse[:, :, :5]).all()
    _check_against_oracle(pattern, pl, q, k, v)


def test_merge_of_empty_parts_is_finite():
    o = [torch.randn(1, 3, 2, 4, requires_grad=True) for _ in range(2)]
    l = [torch.tensor([[[0.5, float("-inf"), 1.0]] * 2]).requires_grad_(True),
         torch.tensor([[[float("-inf"), float("-inf"), 2.0]] * 2]).requires_grad_(True)]
    out, lse = merge_lse(o, l, torch.float32)
    assert torch.isneginf(lse[:, :, 1]).all() and torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in o + l)


@pytest.mark.parametrize("pattern", [masks.dilated(40, 4), masks.fixed(32, 4), masks.strided(16)],
                         ids=["dilated", "fixed", "strided"])
def test_alibi_sees_true_positions(pattern):
    alibi = torch.tensor([0.3, 0.05, 0.1, 0.7])
    q, k, v = _qkv(128, 128, 4, 2)
    pl = plan(pattern, 128, block_q=TILE, block_kv=TILE, exact_positions=True)
    _check_against_oracle(pattern, pl, q, k, v, alibi=alibi)
    with pytest.raises(ValueError, match="alibi_slopes"):
        planned_attention(q, k, v, plan(masks.fixed(32, 4), 128, block_q=TILE, block_kv=TILE), 0.25,
                          alibi_slopes=alibi)


def test_attention_routes_patterns_to_the_planner(monkeypatch):
    import subquad
    from subquad.ops import softmax as softmax_mod

    calls = []
    real = softmax_mod.planned_attention
    monkeypatch.setattr(softmax_mod, "planned_attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    q, k, v = _qkv(100, 100, 4, 2)
    pattern = masks.strided(16, causal=False)
    planned = subquad.attention(q, k, v, mask=pattern, causal=True)
    assert len(calls) == 1 and [c.role for c in calls[0].components] == ["local", "columns"]
    plain = subquad.attention(q, k, v, mask=pattern, causal=True, plan=False)
    assert len(calls) == 1
    torch.testing.assert_close(planned, plain, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="plan"):
        subquad.attention(q, k, v, mask=masks.sliding_window(8), plan=True)


def test_blocks_component_at_its_own_block_matches_oracle():
    """BigBird whose random blocks (32 wide) are finer than the plan's 64-tiles: the blocks component at 32."""
    pattern = masks.bigbird(40, [0, 2], random_blocks=2, block=32, seed=3, causal=True)
    pl = plan(pattern, 256, block_q=64, block_kv=64)
    assert [(c.role, c.block) for c in pl.components] == [("local", None), ("blocks", 32)]
    assert pl.components[1].block_mask(pl.context(1, 1, "cpu"), 64, 64, "cpu").block_q == 32
    assert torch.equal(pl.coverage(), dense_mask(pattern, 256, 256).to(torch.int32))
    _check_against_oracle(pattern, pl, *_qkv(256, 256, 2, 1))

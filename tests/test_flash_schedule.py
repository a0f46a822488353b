"""How the Triton flash kernels share out the work (CPU under TRITON_INTERPRET=1, natively on a GPU): BlockMask
blocks heaviest first, a few key tiles' dK/dV walks split over programs, and walks far longer than the rest
(global rows and columns) cut into pieces in the same launch; each schedule gives the reference's outputs, LSE
and gradients."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from subquad import masks
from subquad.ops.softmax.flash import schedule
from subquad.ops.softmax.flash.tile import heavy_first
from subquad.ops.softmax.reference import attention_reference
from test_flash import BLOCK, DEV, _check, _close, _lse_close, _qkv, gpu, pytestmark  # noqa: F401  (the same skip)


@triton.jit
def _schedule(ORDER, OUT, n_items, n_bh, tail_heads, HEADS: tl.constexpr):
    """Each program's ``(tile, head)`` under ``heavy_first``'s head-by-head order, at its place in the grid's
    linear order (one row of programs a head, as the forward's grid)."""
    tile, pid_bh, piece = heavy_first(ORDER, n_items, n_items, 1, HEADS, HEADS, 1, 1, tl.program_id(0),
                                      tl.num_programs(0), n_bh, 0, False, True, tail_heads)
    linear = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + 2 * linear, tile)
    tl.store(OUT + 2 * linear + 1, pid_bh)


@pytest.mark.parametrize("kind", ["full", "window", "block_sparse"])
def test_key_tiles_too_few_split_the_query_walk(kind, monkeypatch):
    # key tiles too few for the GPU (a few keys against many queries; one batch and KV head): each key tile's
    # dK/dV walk is shared by several programs (fp32 atomics); the window runs the list-free band walk, the
    # block layout the BlockMask lists
    from subquad.ops.softmax.flash import launch
    from subquad.ops.softmax.flash.launch import _query_splits

    # (the atomic backward, whose walks split; a BlockMask walk takes it where a piece schedule cuts walks)
    monkeypatch.setattr(launch, "_walks_whole", lambda m, q, k: False)
    long = 4096 if DEV == "cuda" else 256
    nq, nkv = (long - 56, 64) if kind == "full" else (long, long)
    cells = -(-nkv // 32)
    layout = torch.rand(cells, cells, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = {"full": None, "window": masks.sliding_window(48, causal=False),
            "block_sparse": masks.block_sparse(layout, block=32)}[kind]
    q, k, v = _qkv(1, nq, nkv, 2, 1, 32, torch.bfloat16)
    assert _query_splits(-(-nkv // 128), nq, q.device) > 1
    _check(q, k, v, mask=mask)


@pytest.mark.parametrize("pattern", [masks.longformer(16, [0, 1, 2]), masks.bigbird(16, [0, 3], random_blocks=1,
                                                                                      block=16)],
                         ids=["longformer", "bigbird"])
def test_heaviest_blocks_first_with_several_tiles_per_block(pattern, monkeypatch):
    """BlockMask blocks of four kernel tiles (two on the interpreter), lengths not a multiple of the block: the
    heavy-first schedule (the global rows' query block and the global columns' key block first; taken here
    whatever the blocks' walks) covers every tile once, in the forward and in the dK/dV pass."""
    from subquad.ops.softmax.flash import flash_attention_masked

    monkeypatch.setattr(schedule, "HEAVY_WALK", 0.0)

    n = 2 * BLOCK + 37
    q, k, v = _qkv(1, n, n, 4, 2, 32, torch.float16)
    bm = masks.resolve(pattern, causal=False, batch=1, heads=4, seq_q=n, seq_kv=n, device=q.device,
                       block_q=2 * BLOCK, block_kv=2 * BLOCK)
    out, lse = flash_attention_masked(q, k, v, bm, 32 ** -0.5)
    ref, ref_lse = attention_reference(q, k, v, bm, 32 ** -0.5, None, None)
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    g = torch.randn_like(out)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((out.float() * g).sum(), (q, k, v)),
                          torch.autograd.grad((ref.float() * g).sum(), (q, k, v))):
        _close(name, a, b, q.dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sub_tiles", [1, 2])
def test_long_key_walks_are_cut_into_pieces(monkeypatch, causal, sub_tiles):
    """The global columns' key block walks every query block; with WALK_PIECE_MIN lowered, the dK/dV pass
    cuts that walk into pieces (programs of the same launch, summed in fp32) and gives the reference's gradients:
    GQA, a length not a multiple of the block, one or two kernel tiles per BlockMask block, causal (attention
    sinks) or not. The schedules list every block once: the whole walks heaviest first, the cut block's
    pieces before them, in one backward launch; the deterministic backward keeps whole walks (checked at one tile
    per block: the interpreter takes minutes at two)."""
    from subquad.ops.softmax.flash import _block_mask_args, flash_attention_masked, launch

    monkeypatch.setattr(schedule, "WALK_PIECE_MIN", 1)
    monkeypatch.setattr(schedule, "PIECE_LOAD", 0.0)
    block = sub_tiles * BLOCK
    n = 20 * block + 13
    pattern = masks.longformer(block // 2, [0, 1, 2], causal=causal)
    bm = masks.resolve(pattern, causal=False, batch=1, heads=2, seq_q=n, seq_kv=n, device=DEV, block_q=block,
                       block_kv=block)
    whole, pieces, piece, cut, slot, _ = _block_mask_args(bm, None, None).pieces_t(1, 4)
    work = (bm.full_q[0][0, 0] + bm.partial_q[0][0, 0]).long().cpu()
    assert cut.tolist() == [0] and slot.tolist() == [0] + [-1] * 20 and int(work[0]) > 2 * piece
    n_kb = work.numel()
    assert sorted(whole.flatten().tolist()) == list(range(1, n_kb))
    assert work[whole.flatten().long().cpu()].tolist() == sorted(work[1:].tolist(), reverse=True)
    assert pieces.flatten().tolist() == [n_kb * p for p in range(-(-int(work[0]) // piece))]
    q, k, v = _qkv(1, n, n, 2, 1, 32, torch.bfloat16, seed=4)
    ref, _ = attention_reference(q, k, v, bm, 32 ** -0.5, None, None)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref.float() * g).sum(), (q, k, v))
    launches = []

    class Counted:      # the backward kernel, its launches counted
        def __init__(self, target):
            self.target = target

        def __getitem__(self, grid):
            launches.append(grid)
            return self.target[grid]

    real_kernel = launch._kernel
    if real_kernel("bwd", launch.flash_bwd_kernel) is None:     # the interpreter launches the JIT function
        monkeypatch.setattr(launch, "flash_bwd_kernel", Counted(launch.flash_bwd_kernel))
    else:   # the GPU, its autotuned wrapper (which cannot wrap a stand-in: it reads the JIT function's arguments)
        monkeypatch.setattr(launch, "_kernel", lambda name, fn: Counted(real_kernel(name, fn)) if name == "bwd"
                            else real_kernel(name, fn))
    for deterministic in (False, True) if sub_tiles == 1 else (False,):
        out, _ = flash_attention_masked(q, k, v, bm, 32 ** -0.5, deterministic=deterministic)
        _close("out", out, ref, q.dtype)
        for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((out.float() * g).sum(), (q, k, v)),
                              ref_grads):
            _close(name, a, b, q.dtype)
    assert len(launches) == (2 if sub_tiles == 1 else 1)       # one a backward


@pytest.mark.parametrize("sub_tiles,scattered", [(1, False), (1, True), (2, False)])
def test_long_query_walks_are_cut_into_pieces(monkeypatch, sub_tiles, scattered):
    """The global rows' query blocks walk every key block; with WALK_PIECE_MIN and FWD_PIECE_LOAD lowered the
    forward cuts those walks into pieces in the same launch (heaviest first: the pieces, then the whole walks),
    each piece's rows written apart and merged by LSE: outputs, LSE and gradients equal the reference's (GQA, a
    length not a multiple of the block, one or two kernel tiles per block, global rows in one block or two;
    gradients at one tile per block: the interpreter takes minutes at two)."""
    from subquad.ops.softmax.flash import _block_mask_args, flash_attention_masked, launch

    monkeypatch.setattr(schedule, "WALK_PIECE_MIN", 1)
    monkeypatch.setattr(schedule, "FWD_PIECE_LOAD", 0.0)
    block = sub_tiles * BLOCK
    n = 20 * block + 13
    rows = [0, 1, 2] + ([5 * block + 3] if scattered else [])
    bm = masks.resolve(masks.longformer(block // 2, rows), causal=False, batch=1, heads=2, seq_q=n, seq_kv=n,
                       device=DEV, block_q=block, block_kv=block)
    whole, pieces, piece, cut, slot, n_pieces = _block_mask_args(bm, None, None).pieces(1, 4)
    work = (bm.full_kv[0][0, 0] + bm.partial_kv[0][0, 0]).long().cpu()
    heavy = [0, 5] if scattered else [0]
    assert cut.tolist() == heavy and n_pieces == -(-int(work[0]) // piece) and int(work[0]) > 2 * piece
    assert sorted(whole.flatten().tolist()) == [b for b in range(work.numel()) if b not in heavy]
    forwards = []
    real = launch.forward
    monkeypatch.setattr(launch, "forward", lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, n, n, 2, 1, 32, torch.bfloat16, seed=6)
    ref, ref_lse = attention_reference(q, k, v, bm, 32 ** -0.5, None, None)
    out, lse = flash_attention_masked(q, k, v, bm, 32 ** -0.5)
    assert len(forwards) == 1
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    if sub_tiles > 1:
        return
    g = torch.randn_like(ref)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((out.float() * g).sum(), (q, k, v)),
                          torch.autograd.grad((ref.float() * g).sum(), (q, k, v))):
        _close(name, a, b, q.dtype)


def test_walks_are_cut_only_when_the_longest_outlasts_the_pass():
    """A walk is cut when it is longer than the pass's mean work per SM (PIECE_LOAD = 1): one long walk among
    short ones on few programs (Longformer 1 x 64k: 1.18 on the H200) is cut, the same on more programs is not."""

    work = torch.full((1, 1, 64), 3, dtype=torch.int32)
    work[0, 0, 0] = 64
    none = torch.zeros_like(work)
    mean_per_sm = lambda programs, sms: programs * int(work.sum()) / sms
    assert 64 > mean_per_sm(16, 132) and schedule.walk_pieces(work, none, 16, 132)[3].tolist() == [0]
    assert 64 < mean_per_sm(64, 132) and schedule.walk_pieces(work, none, 64, 132) == ()


def test_heaviest_first_order_puts_global_tokens_first():
    from subquad.ops.softmax.flash import _block_mask_args

    # 40 blocks: the global token's row and column walk all 40, the others ~3 (a band and that column)
    bm = masks.resolve(masks.longformer(8, [163]), causal=False, batch=1, heads=1, seq_q=1280, seq_kv=1280,
                       device="cpu", block_q=32, block_kv=32)
    args = _block_mask_args(bm, None, None)
    assert args.order[0, 0, 0] == 5 and args.order_t[0, 0, 0] == 5          # 163 // 32: its row and its column
    assert sorted(args.order[0, 0].tolist()) == list(range(40))


def test_rows_of_like_length_go_head_by_head():
    """A block layout whose rows and columns walk about as many blocks as each other runs head by head (one
    head's blocks side by side, which share its keys in L2), heaviest first within the head; a pass with one block
    three times the mean takes the heads-fastest schedule, where it starts first."""
    from subquad.ops.softmax.flash import _block_mask_args

    layout = torch.rand(40, 40, generator=torch.Generator().manual_seed(0)) < 0.1
    layout |= torch.eye(40, dtype=torch.bool)
    for heavy in (False, True):
        cells = layout.clone()
        if heavy:
            cells[7] = True
        bm = masks.resolve(masks.block_sparse(cells, 32), causal=False, batch=1, heads=2, seq_q=1280, seq_kv=1280,
                           device="cpu", block_q=32, block_kv=32)
        args = _block_mask_args(bm, None, None)
        # (many (batch, head) rows for few SMs: no tail to stretch, only the heavy block decides, pass by pass:
        # the full row 7 is one query block's walk; its columns add one block to each key block's)
        assert args.head_major(False, 64, 4) == (not heavy) and args.head_major(True, 64, 4)
        work = layout.sum(1) if not heavy else cells.sum(1)
        assert torch.equal(work[args.order[0, 0].long()], work.sort(descending=True).values)
        if heavy:
            assert args.order[0, 0, 0] == 7


def test_walks_few_for_the_sms_go_heads_fastest():
    """Head by head, the last head's longest walk starts near the pass's end: where it is more than TAIL_SHARE of
    the mean work an SM gets, the pass goes heads fastest, longest first. Fixed's gathered summary columns (8 key
    blocks a head walking 16-128 query blocks, 2 x 16 heads on an H100's 132 SMs) ran their dK/dV pass head by head
    at 3.48 ms fwd+bwd against 3.10 heads fastest; a schedule simulation gives 1.26-1.6x the ideal against 1.03x."""
    from subquad.ops.softmax.flash import _block_mask_args, launch

    # a causal triangle of walks (block j walks 8 - j blocks): no block is three times the mean
    cells = torch.ones(8, 8, dtype=torch.bool).tril()
    bm = masks.resolve(masks.block_sparse(cells, 32), causal=False, batch=1, heads=1, seq_q=256, seq_kv=256,
                       device="cpu", block_q=32, block_kv=32)
    m = _block_mask_args(bm, None, None)
    assert m.walks == (8.0, 4.5, 8.0, 4.5)
    per_sm = lambda rows, sms: 4.5 * rows * 8 / sms
    assert 8 > schedule.TAIL_SHARE * per_sm(32, 132) and not m.head_major(True, 32, 132)
    assert 8 <= schedule.TAIL_SHARE * per_sm(32 * 16, 132) and m.head_major(True, 32 * 16, 132)
    assert launch._backward_head_major(m, 2, 16, 16, True, torch.device("cpu"))     # off the GPU 4 SMs: 72 blocks each
    # the backward's dQ programs walk the forward's query blocks under the same HEAD_MAJOR: with them (not
    # atomic) both passes' walks decide
    m.walks = (40.0, 4.5, 8.0, 4.5)
    assert launch._backward_head_major(m, 64, 16, 16, True, torch.device("cpu"))
    assert not launch._backward_head_major(m, 64, 16, 16, False, torch.device("cpu"))


def test_head_by_head_order_ends_on_the_last_heads_side_by_side():
    """``heavy_first``'s head-by-head order with ``tail_heads``: every (tile, head) once; before the tail each
    head's ranks in a row; in it the last heads alternate rank by rank, so that the pass ends on the lightest
    block of every one of them. ``schedule.tail_heads`` takes about ``TAIL_WAVES`` waves of two programs an SM."""

    n_items, heads = 5, 7
    order = torch.stack([torch.randperm(n_items, generator=torch.Generator().manual_seed(h)) for h in range(heads)])
    order = order.to(torch.int32).reshape(1, heads, n_items).to(DEV)
    for tail in (1, 3, heads):
        out = torch.empty(heads * n_items, 2, dtype=torch.int32, device=DEV)
        _schedule[(n_items, heads)](order, out, n_items, heads, tail, HEADS=heads)
        tile, head = out[:, 0].cpu(), out[:, 1].cpu()
        assert sorted(zip(tile.tolist(), head.tolist())) == [(t, h) for t in range(n_items) for h in range(heads)]
        rank = torch.tensor([order[0, h].tolist().index(t) for t, h in zip(tile.tolist(), head.tolist())])
        lead = (heads - tail) * n_items
        assert torch.equal(head[:lead], torch.arange(lead) // n_items)
        assert torch.equal(rank[:lead], torch.arange(lead) % n_items)
        assert torch.equal(head[lead:], heads - tail + torch.arange(tail * n_items) % tail)
        assert torch.equal(rank[lead:], torch.arange(tail * n_items) // tail)
    assert schedule.tail_heads(128, 32, 132) == 4 and schedule.tail_heads(512, 16, 132) == 1
    assert schedule.tail_heads(32, 8, 132) == 8 and schedule.tail_heads(0, 8, 132) == 8


def test_tail_heads_forward_matches_the_reference(monkeypatch):
    """A head-by-head block layout whose last three (batch, head) pairs go side by side (``tail_heads`` 3 of 6):
    outputs, LSE and gradients as the reference's."""
    from subquad.ops.softmax.flash import launch

    seen = []
    tail_heads = schedule.tail_heads
    monkeypatch.setattr(schedule, "tail_heads", lambda *a: seen.append(3) or 3)
    monkeypatch.setattr(launch, "num_sms", lambda device: 4)   # (on a GPU's SMs six short rows go heads fastest)
    layout = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) < 0.4
    layout |= torch.eye(6, dtype=torch.bool)
    q, k, v = _qkv(2, 6 * BLOCK - 5, 6 * BLOCK - 5, 3, 3, 32, torch.float16)
    _check(q, k, v, mask=masks.block_sparse(layout, BLOCK))
    assert seen and tail_heads(6, 6, 132) == 6


@pytest.mark.gpu
@gpu
def test_gpu_global_rows_walk_in_pieces():
    """At the default thresholds a few heads with global rows over 8k keys cut that walk into pieces (its
    ratio to the mean work per SM is far above FWD_PIECE_LOAD) and the output, LSE and gradients are the
    reference's."""
    from subquad.ops.softmax.flash import _block_mask_args, _resolve_tiled, launch

    mask = masks.longformer(128, [0, 1, 4000])
    q, k, v = _qkv(1, 8192, 8192, 2, 1, 128, torch.bfloat16, seed=8)
    forward_mask, _ = _resolve_tiled(mask, False, 1, 2, 8192, 8192, q.device)
    assert _block_mask_args(forward_mask, None, None).pieces(2, launch.num_sms(q.device)) is not None
    _check(q, k, v, mask=mask, grad_lse=True, plan=False)


def test_backward_sums_dq_by_programs_unless_walks_are_cut(monkeypatch):
    """The default backward of a BlockMask walk: dQ programs beside the dK/dV programs where no walk is cut into
    pieces, the atomic dK/dV walk (which the pieces need) where global columns walk every query block (16
    global tokens over 4096 positions, blocks of 32, an H100's 132 SMs) for so few KV heads that their walk
    outlasts even the grid with the dQ programs in it (13x the dK/dV pass's mean work per SM at 2 KV heads, 3.3x
    at 8); at 16 KV heads (1.7x: cut for the atomic walk, not past DQ_PROGRAMS_LOAD) the dQ programs."""
    from subquad.ops.softmax.flash import _block_mask_args, launch

    monkeypatch.setattr(launch, "num_sms", lambda device: 132)
    for n, global_tokens, hkv, whole in ((256, [0, 1], 2, True), (4096, list(range(16)), 2, False),
                                         (4096, list(range(16)), 8, False), (4096, list(range(16)), 16, True)):
        bm = masks.resolve(masks.longformer(64, global_tokens), causal=False, batch=1, heads=2 * hkv, seq_q=n,
                           seq_kv=n, device="cpu", block_q=32, block_kv=32)
        m = _block_mask_args(bm, None, None)
        assert launch._walks_whole(m, torch.empty(1, n, 2 * hkv, 16), torch.empty(1, n, hkv, 16)) == whole
        assert (m.pieces_t(hkv, 132) is not None) == (n == 4096)


@pytest.mark.parametrize("causal,deterministic", [(False, False), (True, False), (True, True)],
                         ids=["full-blocks", "causal", "causal-deterministic"])
def test_block_diagonal_backward_stores_dq_from_the_dkdv_programs(causal, deterministic, monkeypatch):
    """A BlockMask whose every query block lists one key block (block-diagonal) has no dQ programs and no
    atomics: the dK/dV program of that key block is the only one to walk those query tiles and stores their dQ
    (``DQ_STORE``), deterministic or not; with GQA, ALiBi, a ragged last block (outputs, LSE and gradients
    against the reference). A second key block in one row (a block off the diagonal) takes the usual backward."""
    from subquad.ops.softmax.flash import launch

    stored = []
    real = launch._backward_launch
    monkeypatch.setattr(launch, "_backward_launch",
                        lambda *a, **kw: stored.append(kw.get("dq_store", False)) or real(*a, **kw))
    n = 5 * BLOCK - 7
    diagonal = torch.eye(5, dtype=torch.bool)
    mask = masks.block_sparse(diagonal, BLOCK)
    q, k, v = _qkv(2, n, n, 4, 2, 32, torch.float16, seed=5)
    alibi = torch.rand(4, generator=torch.Generator().manual_seed(5)).to(DEV)
    _check(q, k, v, causal=causal, mask=mask, alibi=alibi, grad_lse=True, deterministic=deterministic, plan=False)
    assert stored == [True]
    diagonal[3, 1] = True
    _check(q, k, v, causal=causal, mask=masks.block_sparse(diagonal, BLOCK), plan=False)
    assert stored == [True, False]


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
def test_seeded_forward_goes_on_from_an_earlier_result(monkeypatch, cut):
    """``into``: a launch over the pairs of B goes on, in place, from a result over the disjoint pairs of A (the
    causal pairs outside B: the global rows see none of them, so their seed is empty, LSE -inf) and gives the
    union's output and LSE; with B's global rows cut into pieces only the first piece starts from the seed. Not
    differentiable: with inputs that need grad it is a ValueError, as is a seed of the wrong shape."""
    from subquad.ops.softmax.flash import flash_attention_masked, launch

    # (a GPU cuts B's global rows anyway: few programs, long walks)
    monkeypatch.setattr(schedule, "WALK_PIECE_MIN", 1 if cut else 1 << 30)
    monkeypatch.setattr(schedule, "FWD_PIECE_LOAD", 0.0)
    merges = []
    real_merge = launch._merge_pieces
    monkeypatch.setattr(launch, "_merge_pieces", lambda *a: merges.append(1) or real_merge(*a))
    n = 20 * BLOCK + 13
    b_pattern = masks.longformer(BLOCK // 2, [0, 1, 2])
    resolve = lambda p: masks.resolve(p, causal=False, batch=1, heads=4, seq_q=n, seq_kv=n, device=DEV,
                                      block_q=BLOCK, block_kv=BLOCK)
    q, k, v = _qkv(1, n, n, 4, 2, 32, torch.bfloat16, seed=4)
    with torch.no_grad():
        o, lse_a = flash_attention_masked(q, k, v, resolve(masks.causal & ~b_pattern), 32 ** -0.5)
        assert torch.isinf(lse_a[:, :, :3]).all() and torch.isfinite(lse_a[:, :, -BLOCK:]).all()
        out, lse = flash_attention_masked(q, k, v, resolve(b_pattern), 32 ** -0.5, into=(o, lse_a))
    assert out is o and lse is lse_a and len(merges) == int(cut)
    ref, ref_lse = attention_reference(q, k, v, resolve(b_pattern | masks.causal), 32 ** -0.5, None, None)
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    with pytest.raises(ValueError, match="into: .*not differentiable"):
        flash_attention_masked(q, k, v, resolve(b_pattern), 32 ** -0.5, into=(o, lse_a))
    with torch.no_grad(), pytest.raises(ValueError, match=r"into: expected a contiguous float32 LSE"):
        flash_attention_masked(q, k, v, resolve(b_pattern), 32 ** -0.5, into=(o, lse_a[:, :2]))


def test_seeded_band_launch_goes_on_from_a_blockmask_result():
    """``into`` on the list-free band walk: a sliding window going on from the result over every other pair (a
    BlockMask walk of its complement) gives full attention's output and LSE, with a softcap and GQA."""
    from subquad.ops.softmax.flash import flash_attention

    n = 3 * BLOCK + 5
    window = masks.sliding_window(BLOCK // 2, causal=False)
    q, k, v = _qkv(1, n, n, 4, 2, 32, torch.float16, seed=2)
    with torch.no_grad():
        o, lse = flash_attention(q, k, v, mask=masks.full & ~window, softcap=5.0)
        out, lse = flash_attention(q, k, v, mask=window, softcap=5.0, into=(o, lse))
    ref, ref_lse = attention_reference(q, k, v, None, 32 ** -0.5, 5.0, None)
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)

"""Attention over selected key blocks in Triton, in head-packed tiles: forward and backward.

Every query token has its own ``top_k`` key blocks (``indices`` ``(B, N_q, H_kv, top_k)``, ``-1``: none), shared
by the query heads of its GQA group. So a program takes one token and one KV head, the group's ``G`` query heads
as the rows of its tile (padded to 16, the smallest ``tl.dot``), and walks the token's blocks: each selected K/V
block is read once for the whole group. Causal: key ``p`` is kept for a query at ``q_p`` when ``p <= q_p`` (only
the query's own block has such keys to drop).

Backward:

* dQ: the forward's walk again (one program per token and KV head), the scores recomputed from the saved LSE;
* dK/dV: a second pass over the inverted index. The (token, block) pairs are sorted by block, so each block has
  the list of tokens that chose it; a program holds one block's K/V (a ``BLOCK_N``-row slice of it) and walks a
  segment of that list, the listed tokens' group heads as the rows of its tiles, accumulating dK/dV in
  registers. Atomics from the dQ-style walk were the alternative: NSA forces the initial and local blocks into
  every selection, so block 0 would take an atomic add from every token of the sequence, all serialised on the
  same addresses. Lists longer than ``SEGMENT_TOKENS`` are cut into segments so that block 0's list does not
  make one program run ``N`` tokens while the others run ~``top_k * block``; segments of one block then add
  their sums atomically (fp32), the only atomics, a few per block (their order, and the low bits of those
  blocks' dK/dV, may vary between runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grid import cdiv, next_power_of_2
from ..softmax.flash.tile import dot

LOG2E = 1.4426950408889634

#: tokens of one block's list that one dK/dV program walks
SEGMENT_TOKENS = 512
#: rows (tokens x padded group heads) of a dK/dV program's tiles
DKDV_ROWS = 64
#: its warps: with 4, its two 64 x 128 fp32 sums spilled 168 bytes (Triton 3.6, sm90, head_dim 128)
DKDV_WARPS = 8


@triton.jit
def _keys_of(blk, n0, q_pos, seq_kv, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Positions of rows ``n0 .. n0 + BLOCK_N`` of key block ``blk`` and which of them the query at ``q_pos``
    keeps."""
    kv_pos = blk * BLOCK + n0 + tl.arange(0, BLOCK_N)
    keep = kv_pos < seq_kv
    if CAUSAL:
        keep = keep & (kv_pos <= q_pos)
    return kv_pos, keep


@triton.jit
def _token_program(Q, stride_qb, stride_qt, stride_qh, q_offset, HKV: tl.constexpr, G: tl.constexpr,
                   ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A walk's program of grid ``(N_q, B x H_kv)``: its token ``t``, batch ``b`` and KV head, the group's query
    heads as tile rows (``row_ok``: the rows that are heads), the token's position and its queries. ``t`` is
    int64, as the dK/dV pass's tokens are: ``t * stride_qt`` passes 2^31 at 128k tokens of 128 heads of 128, and
    in int32 wrapped to an address before the tensor."""
    pid_t = tl.program_id(0)
    t = pid_t.to(tl.int64)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hkv = pid_bh % HKV
    g = tl.arange(0, ROWS)
    row_ok = g < G
    head = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + t * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return t, b, hkv, head, row_ok, q_offset + pid_t, offs_d, offs_dv, q


@triton.jit
def _selected_tile(q, K, V, b, hkv, blk, n0, q_pos, seq_kv, qk_scale, stride_kb, stride_kn, stride_kh, stride_vb,
                   stride_vn, stride_vh, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Rows ``n0 .. n0 + BLOCK_N`` of selected block ``blk``: its K and V tiles and the group's scores over them
    (``qk_scale``-scaled, ``-inf`` where the query does not keep the key), as the forward and dQ walks read them.
    An unused slot (``blk`` -1) is a tile of no key, masked rather than branched around: a branch in the walk kept
    Triton from pipelining its loads (Triton 3.6, sm90: no asynchronous copies in the loop)."""
    kv_pos, keep = _keys_of(tl.maximum(blk, 0), n0, q_pos, tl.where(blk >= 0, seq_kv, 0), BLOCK, BLOCK_N, CAUSAL)
    rows = kv_pos.to(tl.int64)
    k = tl.load(K + b * stride_kb + rows[:, None] * stride_kn + hkv * stride_kh + offs_d[None, :],
                mask=keep[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + rows[:, None] * stride_vn + hkv * stride_vh + offs_dv[None, :],
                mask=keep[:, None] & (offs_dv[None, :] < DV), other=0.0)
    scores = tl.where(keep[None, :], dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    return k, v, scores


@triton.jit
def _selected_fwd(
    Q, K, V, IDX, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_ib, stride_it, stride_ih,
    seq_q, seq_kv, q_offset, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, TOP_K: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Grid ``(N_q, B x H_kv)``. ``O`` in q's dtype; ``LSE`` ``(B, H_q, N_q)`` base 2 (of ``qk_scale``-scaled
    scores: ``scale * log2(e)``)."""
    t, b, hkv, head, row_ok, q_pos, offs_d, offs_dv, q = _token_program(Q, stride_qb, stride_qt, stride_qh,
                                                                          q_offset, HKV, G, ROWS, D, BLOCK_D,
                                                                          BLOCK_DV)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    idx_row = IDX + b * stride_ib + t * stride_it + hkv * stride_ih
    for s in range(TOP_K):
        blk = tl.load(idx_row + s)
        for n0 in tl.static_range(0, BLOCK, BLOCK_N):
            k, v, scores = _selected_tile(q, K, V, b, hkv, blk, n0, q_pos, seq_kv, qk_scale, stride_kb, stride_kn,
                                          stride_kh, stride_vb, stride_vn, stride_vh, offs_d, offs_dv, D, DV,
                                          BLOCK, BLOCK_N, CAUSAL)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
            m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b * stride_ob + t * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (b * (HKV * G) + head) * seq_q + t, lse, mask=row_ok)


@triton.jit
def _selected_bwd_dq(
    Q, K, V, DO, LSE, DELTA, IDX, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh, stride_ib, stride_it, stride_ih,
    seq_q, seq_kv, q_offset, qk_scale, scale,
    HKV: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, TOP_K: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Grid ``(N_q, B x H_kv)``; ``DELTA`` = rowsum(dO * O) ``(B, H_q, N_q)``."""
    t, b, hkv, head, row_ok, q_pos, offs_d, offs_dv, q = _token_program(Q, stride_qb, stride_qt, stride_qh,
                                                                          q_offset, HKV, G, ROWS, D, BLOCK_D,
                                                                          BLOCK_DV)
    do = tl.load(DO + b * stride_dob + t * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    stat = (b * (HKV * G) + head) * seq_q + t
    lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    idx_row = IDX + b * stride_ib + t * stride_it + hkv * stride_ih
    for s in range(TOP_K):
        blk = tl.load(idx_row + s)
        for n0 in tl.static_range(0, BLOCK, BLOCK_N):
            k, v, scores = _selected_tile(q, K, V, b, hkv, blk, n0, q_pos, seq_kv, qk_scale, stride_kb, stride_kn,
                                          stride_kh, stride_vb, stride_vn, stride_vh, offs_d, offs_dv, D, DV,
                                          BLOCK, BLOCK_N, CAUSAL)
            p = tl.exp2(scores - lse[:, None])
            dp = dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(k.dtype), k)
    tl.store(DQ + b * stride_dqb + t * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _selected_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, TOKENS, SEG_LIST, SEG_START, SEG_END, DK, DV_OUT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    seq_q, seq_kv, q_offset, n_blocks, qk_scale, scale,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Grid ``(segments, BLOCK // BLOCK_N)``: segment ``SEG_START .. SEG_END`` of ``TOKENS`` (sorted by list),
    list ``SEG_LIST`` = ``(b * H_kv + hkv) * n_blocks + block`` (``-1``: no work); rows ``r`` of a tile are token
    ``r // GP`` of the step, head ``r % GP`` of the group (``GP``: G padded to a power of two). ``DK``/``DV_OUT``:
    fp32, added into."""
    seg = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    lst = tl.load(SEG_LIST + seg)
    start = tl.load(SEG_START + seg)
    end = tl.load(SEG_END + seg)
    if lst >= 0:
        blk = lst % n_blocks
        bh = lst // n_blocks
        b = (bh // HKV).to(tl.int64)
        hkv = bh % HKV
        kv_pos = blk * BLOCK + n0 + tl.arange(0, BLOCK_N)
        kv_ok = kv_pos < seq_kv
        rows_kv = kv_pos.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = tl.load(K + b * stride_kb + rows_kv[:, None] * stride_kn + hkv * stride_kh + offs_d[None, :],
                    mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + b * stride_vb + rows_kv[:, None] * stride_vn + hkv * stride_vh + offs_dv[None, :],
                    mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        r = tl.arange(0, ROWS)
        g = r % GP
        for i0 in range(start, end, ROWS // GP):
            row_ok = (i0 + r // GP < end) & (g < G)
            tok = tl.load(TOKENS + i0 + r // GP, mask=row_ok, other=0)
            head = hkv * G + g
            tok64 = tok.to(tl.int64)
            q = tl.load(Q + (b * stride_qb + tok64 * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(DO + (b * stride_dob + tok64 * stride_dot + head * stride_doh)[:, None] + offs_dv[None, :],
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            stat = (b * (HKV * G) + head) * seq_q + tok
            lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
            keep = row_ok[:, None] & kv_ok[None, :]
            if CAUSAL:
                keep = keep & (kv_pos[None, :] <= q_offset + tok[:, None])
            scores = tl.where(keep, dot(q, tl.trans(k)) * qk_scale, float("-inf"))
            # dP issued before the exponentials: its products then run beside them (the flash backward's order).
            dp = dot(do, tl.trans(v))
            p = tl.exp2(scores - lse[:, None])
            dv += dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(ds.to(q.dtype)), q)
        tl.atomic_add(DK + b * stride_dkb + rows_kv[:, None] * stride_dkn + hkv * stride_dkh + offs_d[None, :],
                      dk * scale, mask=kv_ok[:, None] & (offs_d[None, :] < D))
        tl.atomic_add(DV_OUT + b * stride_dvb + rows_kv[:, None] * stride_dvn + hkv * stride_dvh + offs_dv[None, :],
                      dv, mask=kv_ok[:, None] & (offs_dv[None, :] < DV))


def _tiles(q: torch.Tensor, v: torch.Tensor, block: int) -> dict:
    """The kernels' tile constants: the group's rows padded to 16 at least (``tl.dot``), head dims to powers
    of two, key blocks walked ``BLOCK_N`` rows at a time."""
    group = q.shape[2] // v.shape[2]
    return dict(G=group, ROWS=max(16, next_power_of_2(group)), D=q.shape[3],
                BLOCK_D=max(16, next_power_of_2(q.shape[3])), DV=v.shape[3],
                BLOCK_DV=max(16, next_power_of_2(v.shape[3])), BLOCK=block, BLOCK_N=min(block, 64))


def _segments(indices: torch.Tensor, n_blocks: int, segment: int):
    """The inverted index: ``(tokens, seg_list, seg_start, seg_end)``, ``tokens`` the query tokens of every
    (batch, KV head, block) list in list order, each list cut into segments of at most ``segment`` tokens.
    Sized by an upper bound on the number of segments (no read back to the host); unused segments have list
    ``-1``."""
    bsz, seq_q, hkv, top_k = indices.shape
    n_lists = bsz * hkv * n_blocks
    device = indices.device
    lists = (torch.arange(bsz, device=device).view(-1, 1, 1, 1) * hkv
             + torch.arange(hkv, device=device).view(1, 1, -1, 1)) * n_blocks + indices
    lists = torch.where((indices >= 0) & (indices < n_blocks), lists, n_lists).flatten()
    tokens = torch.arange(seq_q, device=device, dtype=torch.int32).view(1, -1, 1, 1).expand_as(indices).flatten()
    order = torch.sort(lists, stable=True).indices
    tokens = tokens[order].contiguous()
    counts = torch.bincount(lists, minlength=n_lists + 1)[:n_lists]
    first = torch.cumsum(counts, 0) - counts
    per_list = (counts + segment - 1) // segment
    seg_end_cum = torch.cumsum(per_list, 0)
    n_segments = n_lists + cdiv(indices.numel(), segment)
    seg = torch.arange(n_segments, device=device)
    owner = torch.searchsorted(seg_end_cum, seg, right=True)
    used = owner < n_lists
    owner_c = owner.clamp(max=n_lists - 1)
    start = first[owner_c] + (seg - (seg_end_cum[owner_c] - per_list[owner_c])) * segment
    end = torch.minimum(start + segment, first[owner_c] + counts[owner_c])
    seg_list = torch.where(used, owner_c, -1).to(torch.int32)
    return tokens, seg_list, start.to(torch.int32), end.to(torch.int32)


class SelectedAttention(torch.autograd.Function):
    """``selected_attention``'s autograd: the kernels above; the indices get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, indices, block: int, scale: float, causal: bool):
        bsz, seq_q, hq, _ = q.shape
        seq_kv, hkv = k.shape[1], k.shape[2]
        idx = indices.to(torch.int32).contiguous()
        o = q.new_empty(bsz, seq_q, hq, v.shape[3])
        lse = torch.empty(bsz, hq, seq_q, device=q.device, dtype=torch.float32)
        tiles = _tiles(q, v, block)
        _selected_fwd[(seq_q, bsz * hkv)](
            q, k, v, idx, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), idx.stride(0),
            idx.stride(1), idx.stride(2), seq_q, seq_kv, seq_kv - seq_q, scale * LOG2E, HKV=hkv,
            TOP_K=idx.shape[3], CAUSAL=causal, **tiles)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.block, ctx.scale, ctx.causal = block, scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        block, scale, causal = ctx.block, ctx.scale, ctx.causal
        bsz, seq_q, hq, _ = q.shape
        seq_kv, hkv = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        tiles = _tiles(q, v, block)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                   v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        _selected_bwd_dq[(seq_q, bsz * hkv)](
            q, k, v, do, lse, delta, idx, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2), idx.stride(0),
            idx.stride(1), idx.stride(2), seq_q, seq_kv, seq_kv - seq_q, scale * LOG2E, scale, HKV=hkv,
            TOP_K=idx.shape[3], CAUSAL=causal, **tiles)
        n_blocks = cdiv(seq_kv, block)
        tokens, seg_list, seg_start, seg_end = _segments(idx, n_blocks, SEGMENT_TOKENS)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        gp = next_power_of_2(tiles["G"])
        _selected_bwd_dkdv[(seg_list.numel(), block // tiles["BLOCK_N"])](
            q, k, v, do, lse, delta, tokens, seg_list, seg_start, seg_end, dk, dv, *strides, dk.stride(0),
            dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), seq_q, seq_kv, seq_kv - seq_q,
            n_blocks, scale * LOG2E, scale, HKV=hkv, GP=gp, CAUSAL=causal, **{**tiles, "ROWS": max(DKDV_ROWS, gp)},
            num_warps=DKDV_WARPS)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *, block: int,
                       scale: float, causal: bool) -> torch.Tensor:
    """Each query token over the key blocks ``indices`` ``(B, N_q, H_kv, top_k)`` (``-1``: none) chose, on the
    Triton kernels; queries aligned to the end of the keys. ``block``: a power of two >= 16; fp16/bf16 inputs
    with unit stride in the last dim (arguments checked by the caller)."""
    prep = lambda t: t if t.stride(-1) == 1 else t.contiguous()
    return SelectedAttention.apply(prep(q), prep(k), prep(v), indices, block, float(scale), causal)

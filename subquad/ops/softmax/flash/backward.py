"""Flash attention backward kernels.

1. ``preprocess``: ``delta = rowsum(dO * O) - dlse`` per query row (``dlse`` is the gradient reaching the
   LSE output: ``dS = P * (dP - delta)`` then covers both outputs), and the LSE as the exponentials take it
   (below).
2. ``flash_bwd_kernel``, one launch:

   * dK/dV programs (``_dkdv_program``), one per (key tile, batch, KV head), walk the query tiles that see
     their keys (the transposed BlockMask lists, or the band's query range), over every query head of the GQA
     group, and write dK, dV once (no atomics). With ``DQ_ATOMIC`` they also add each tile's dQ contribution
     to an fp32 buffer with atomics (fast, not bit-reproducible); ``DQ_TMA`` (Hopper, not the interpreter,
     which lacks it) makes each of these one TMA bulk reduce-add from shared memory through a descriptor of the
     query head's dQ rows, which also bounds the rows at the sequence's end. A third grid axis splits each walk
     over programs (every n-th query tile; ``SPLIT_ATOMIC``: dK, dV then add into fp32 buffers) where the key
     tiles are too few to fill the GPU: a planner's gathered columns, short keys against long queries.
     ``PIECES``: the few key blocks whose walk is far longer than the rest (global columns: every query tile)
     are cut into pieces of ``piece_len`` list entries (``heavy_first``'s items, ranked with the other blocks),
     each adding into a small fp32 buffer per such block (``SLOT``: its place there, -1 for the other blocks,
     which store as usual).
   * ``DQ_STORE``: where every query block of the BlockMask lists one key block (a block-diagonal pattern:
     block-local attention) and a dK/dV program holds a whole key block, that program is the only one
     to walk each of those query tiles: it stores their dQ as it goes (no dQ programs, no atomics, no zeroing).
   * ``DQ_PROGRAMS`` (the deterministic backward): dQ programs (``_dq_program``), one per (query tile, batch,
     query head), after the dK/dV programs in the same grid: the forward's walk over key tiles, each summing
     its rows' dQ in one fixed order, as FlexAttention's backward does. Their tiles are the dK/dV tiles
     transposed (``DQ_BLOCK_M = BLOCK_N``, fitted to the BlockMask blocks). With ``TWO_SOURCES`` they walk a
     second, gathered key set after the first, as the forward does (a plan's band and its columns: one dQ
     sum over both, and the columns' launch, neither dQ kind on, computes dK/dV alone).
   * ``DQ_DKDV``: where every key block is listed by one query block alone (the fixed pattern's local blocks),
     a dQ program's tile holds that whole query block and the heads are not grouped, the dQ programs alone
     run: each stores the dK/dV of the key tiles it walks, from the scores and dS it has already made, and goes
     on over the second key set (no dK/dV programs, no second pass over those blocks' scores).

``DROPOUT``: the forward's keep decisions again (``tile.dropout_keep``, by row and key index): ``dV`` takes the
kept probabilities scaled by ``1 / (1 - p)``, and ``dP`` is masked and scaled the same way before
``dS = P * (dP - delta)`` (``delta`` from the dropped output, as FlashAttention-2 does).

Row offsets (row x stride) are taken in int64, as in the forward: at 128k tokens of 128 heads of 128 they pass
2^31 elements.

The probabilities are recomputed from the saved LSE: ``P = exp2(s - lse * log2(e))``; a row that saw no key
(``lse = -inf``) is given ``+inf`` so that its probabilities are 0 and no NaN appears. The preprocess writes that
operand once per row (``LSE2``), which the dK/dV programs had made again at every query tile of their walks:
a compare, a select and a multiply for each of a thread's 16 query columns and the predicates' moves: 75 of the
full-attention loop's 443 instructions (sm90, Triton 3.6; the same numbers, computed once). On the H100, fwd+bwd
1.017x at full 2 x 16k, 0.993-1.012x on the other rows (``benchmarks/results/2026-12-07-lse2-ab-h100.json``).

As in the forward, a band's walk is one loop (its masked edges take the mask's branch; full attention's
loops have none); the dK/dV programs walk a BlockMask row's full blocks and partial blocks in two loops, the dQ
programs as the forward does (``tile.list_entry``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...chained import unchained
from .tile import (batch_rows, bitmask_tile, dot, dot_acc, dropout_keep, grid_row, grid_rows, heavy_first,
                   keep_mask, kv_range, list_ahead, list_edge, list_part, list_row, q_range, scores, second_ahead,
                   second_tile, second_walk, tile_rows)


@triton.jit(do_not_specialize=["pid_offset"])
def flash_bwd_preprocess_kernel(O, DO, DLSE, DELTA, LSE, LSE2, stride_ob, stride_on, stride_oh, stride_dob,
                                stride_don, stride_doh, seq_q, pid_offset, HQ: tl.constexpr, DV: tl.constexpr,
                                BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
                                SPLIT_GRID: tl.constexpr = False):
    """``DELTA`` and ``LSE2`` (``LSE`` in base 2, ``+inf`` for a row that saw no key) of each query row.
    ``pid_offset``, ``SPLIT_GRID``: a grid past CUDA's limit (``tile.grid_row``)."""
    pid_bh = grid_row(pid_offset, SPLIT_GRID)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < DV)
    m_rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + m_rows * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + m_rows * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    rows = pid_bh.to(tl.int64) * seq_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < seq_q, other=0.0)
    tl.store(DELTA + rows, delta, mask=offs_m < seq_q)
    lse = tl.load(LSE + rows, mask=offs_m < seq_q, other=0.0)
    tl.store(LSE2 + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
             mask=offs_m < seq_q)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_don, stride_dqn,
               start_m, edge, offs_n, kp, seq_q, seq_kv, q_off, qk_scale, cap_scale, dq_scale, slope2, band_lo, band_hi,
               prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS, tile, row0, Q_POS,
               offs_d, offs_dv,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_Q: tl.constexpr, KV_BOUNDS: tl.constexpr,
               BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
               HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
               HAS_Q_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MBQ: tl.constexpr, MBK: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr = False,
               UNCHAIN: tl.constexpr = False, rng=0, rng_base=0, dropout_p=0.0, DROPOUT: tl.constexpr = False,
               start_n=0, WIDE_ROWS: tl.constexpr = False, lsh_q_chunk=0, lsh_k_chunk=0,
               LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0, LSH: tl.constexpr = False,
               LSH_NOT_SELF: tl.constexpr = False, DQ_STORE: tl.constexpr = False):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_q = offs_m < seq_q
    if EVEN_Q and D == BLOCK_D:
        q = tl.load(tile_rows(q_base, start_m, stride_qn, BLOCK_M, WIDE_ROWS) + offs_d[None, :])
    else:
        q = tl.load(tile_rows(q_base, start_m, stride_qn, BLOCK_M, WIDE_ROWS) + offs_d[None, :],
                    mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    if EVEN_Q:
        lse2 = tl.load(lse_base + offs_m)
    else:
        lse2 = tl.load(lse_base + offs_m, mask=in_q, other=float("inf"))
    if HAS_Q_POS:
        qp = tl.load(Q_POS + offs_m, mask=in_q, other=0)
    else:
        qp = offs_m + q_off
    # scores transposed: rows are keys, columns are queries. dP is issued before the exponentials, so that its
    # products run on the tensor cores beside them (and dV's beside dS), as FlashAttention-3 orders its
    # backward: issued after dV's product (which needs P), dP waited with it and both phases ran alone (sm90,
    # Triton 3.6: the dK/dV loop's MUFU.EX2s now interleave with dP's HGMMAs)
    qkT = dot(k, tl.trans(q))
    if EVEN_Q and DV == BLOCK_DV:
        do = tl.load(tile_rows(do_base, start_m, stride_don, BLOCK_M, WIDE_ROWS) + offs_dv[None, :])
    else:
        do = tl.load(tile_rows(do_base, start_m, stride_don, BLOCK_M, WIDE_ROWS) + offs_dv[None, :],
                     mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dpT = dot(v, tl.trans(do))
    sT, tT = scores(qkT, qp[None, :], kp[:, None], qk_scale, cap_scale, slope2, SOFTCAP, ALIBI)
    pT = tl.math.exp2(sT - lse2[None, :])
    if MASKED:
        if edge:    # a tile at the pattern's edge or the keys' end; the others skip the mask
            keep = keep_mask(offs_m[None, :], offs_n[:, None], qp[None, :], kp[:, None], seq_q, seq_kv, band_lo,
                             band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS,
                             tile, (offs_m - row0)[None, :], (offs_n % MBK)[:, None], BAND, PREFIX, Q_PREFIX,
                             HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS, MBQ, MBK, KV_BOUNDS, lsh_q_chunk,
                             lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF)
            pT = tl.where(keep, pT, 0.0)
    elif KV_BOUNDS:
        pT = tl.where(offs_n[:, None] < seq_kv, pT, 0.0)
    p_out = pT     # the probabilities that reached the output
    if DROPOUT:
        keep_d = dropout_keep(rng, rng_base + offs_m, start_n, seq_kv, BLOCK_M, offs_n.shape[0], TRANS=True)
        kept_scale = 1.0 / (1.0 - dropout_p)    # (one scalar division: per element it was a divide each)
        p_out = tl.where(keep_d, pT * kept_scale, 0.0)
    # UNCHAIN: key tiles of fewer rows than 16 a warp (see subquad.ops.chained)
    if UNCHAIN:
        pT_op = unchained(p_out, seq_kv > 0, do.dtype)
    else:
        pT_op = p_out.to(do.dtype)
    dv = dot_acc(pT_op, do, dv)
    if EVEN_Q:
        delta = tl.load(delta_base + offs_m)
    else:
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)
    if DROPOUT:
        dpT = tl.where(keep_d, dpT * kept_scale, 0.0)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    if UNCHAIN:
        dsT_op = unchained(dsT, seq_kv > 0, q.dtype)
    else:
        dsT_op = dsT.to(q.dtype)
    dk = dot_acc(dsT_op, q, dk)
    if DQ_ATOMIC or DQ_STORE:
        dq = dot(tl.trans(dsT_op), k) * dq_scale
        if DQ_TMA and not DQ_STORE:
            dq_base.atomic_add([start_m, 0], dq)
        else:
            dq_ptrs = tile_rows(dq_base, start_m, stride_dqn, BLOCK_M, WIDE_ROWS) + offs_d[None, :]
            dq_ok = in_q[:, None] & (offs_d[None, :] < D)
            if DQ_STORE:
                tl.store(dq_ptrs, dq.to(dq_base.dtype.element_ty), mask=dq_ok)
            else:
                tl.atomic_add(dq_ptrs, dq, mask=dq_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(
    start_n, b, hk, piece, split, n_split,
    Q, K, V, DO, LSE, DELTA, DQ, DK_OUT, DV_OUT,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, TILE_OF, BITS, DOC_IDS, Q_POS, KV_POS, IS_GLOBAL, LAYOUT, SLOPES,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_slope_b, stride_doc_b,
    stride_lay_b, stride_lay_h, stride_lay_q,
    seq_q, seq_kv, q_off, qk_scale, cap_scale, scale, band_lo, band_hi, prefix, q_prefix, n_flags, lay_block,
    full_width, part_width, n_qb, n_kb, mask_b, mask_h, piece_len, SLOT, ACC_K, ACC_V, n_slots, RNG, dropout_p,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MBQ: tl.constexpr, MBK: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, USE_LIST: tl.constexpr,
    BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
    HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
    HAS_Q_POS: tl.constexpr, HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, SPLIT_ATOMIC: tl.constexpr, PIECES: tl.constexpr, DQ_TMA: tl.constexpr,
    UNCHAIN: tl.constexpr, DROPOUT: tl.constexpr, WIDE_ROWS: tl.constexpr, lsh_q_chunk=0, lsh_k_chunk=0,
    LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0, LSH: tl.constexpr = False,
    LSH_NOT_SELF: tl.constexpr = False, DQ_STORE: tl.constexpr = False,
):
    """The key tile at ``start_n`` of KV head ``hk``: its walk over the query tiles that see it (or its
    ``piece`` of that walk, or every ``n_split``-th tile from ``split``), then its dK and dV. ``Q_POS``,
    ``KV_POS``, ``lsh_*``: batch element ``b``'s (``tile.batch_rows``). ``DQ_STORE`` (a BlockMask walk): each
    query tile's dQ is stored as it is walked, every query block listing this key block alone."""
    # this program's stretch of the key block's list (full entries first, then partial): all of it unless the
    # walk is cut into pieces (piece_len is then the pieces' length, else larger than any list)
    first = piece * piece_len
    last = first + piece_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_kv = offs_n < seq_kv
    n_rows = offs_n.to(tl.int64)[:, None]
    k_ptrs = K + b.to(tl.int64) * stride_kb + hk * stride_kh + n_rows * stride_kn + offs_d[None, :]
    v_ptrs = V + b.to(tl.int64) * stride_vb + hk * stride_vh + n_rows * stride_vn + offs_dv[None, :]
    if EVEN_KV and D == BLOCK_D and DV == BLOCK_DV:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=in_kv[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptrs, mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if HAS_KV_POS:
        kp = tl.load(KV_POS + offs_n, mask=in_kv, other=0)
    else:
        kp = offs_n
    doc_ids = DOC_IDS
    if DOC:
        doc_ids = DOC_IDS + b * stride_doc_b
    dq_scale = scale
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    for g in range(G):
        h = hk * G + g
        bh = b * HQ + h
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        dq_base = DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh
        if DQ_ATOMIC and DQ_TMA:
            dq_base = tl.make_tensor_descriptor(dq_base, shape=[seq_q, D], strides=[stride_dqn, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        lse_base = LSE + bh.to(tl.int64) * seq_q
        delta_base = DELTA + bh.to(tl.int64) * seq_q
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + b * stride_slope_b + h).to(tl.float32) * 1.4426950408889634
        lay = LAYOUT
        if HAS_LAYOUT:
            lay = LAYOUT + b * stride_lay_b + h * stride_lay_h
        if USE_LIST:
            SUBS: tl.constexpr = MBQ // BLOCK_M
            kb = start_n // MBK
            base = (((b % mask_b) * mask_h + h % mask_h) * n_kb + kb).to(tl.int64)
            n_full = tl.load(FULL_NUM + base)
            n_all = n_full + tl.load(PART_NUM + base)
            # the full blocks in a loop of their own here, whatever the mask: in one loop Longformer's dK/dV (two
            # 64-row sub-tiles a 128-block, each with its branch) spilled more and ran 0.98x fwd+bwd (H200)
            for part in tl.static_range(2):
                j_lo = first
                j_hi = tl.minimum(n_full, last)
                if part == 1:
                    j_lo = tl.maximum(first, n_full)
                    j_hi = tl.minimum(n_all, last)
                # an iteration a query tile, not a block (see the forward's list walk): entries j_lo + split,
                # + n_split, ... below j_hi, SUBS tiles each
                ahead = list_ahead(-1, j_lo + split, n_split, j_hi, SUBS, n_full, base, FULL_IDX, full_width,
                                   PART_IDX, part_width)
                for t in range(0, tl.cdiv(j_hi - j_lo - split, n_split) * SUBS):
                    qb, partial = ahead
                    ahead = list_ahead(t, j_lo + split, n_split, j_hi, SUBS, n_full, base, FULL_IDX, full_width,
                                       PART_IDX, part_width)
                    tile = bitmask_tile(TILE_OF, (((b % mask_b) * mask_h + h % mask_h) * n_qb + qb).to(tl.int64),
                                        n_kb, kb, partial, USE_BITS)
                    dk, dv = _dkdv_tile(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_don,
                        stride_dqn, qb * MBQ + (t % SUBS) * BLOCK_M, True, offs_n, kp, seq_q, seq_kv, q_off,
                        qk_scale, cap_scale, dq_scale, slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL,
                        n_flags, lay, lay_block, stride_lay_q, doc_ids, BITS, tile, qb * MBQ, Q_POS, offs_d,
                        offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, part == 1, EVEN_Q,
                        not EVEN_KV, BAND, PREFIX, Q_PREFIX, HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS,
                        HAS_Q_POS, SOFTCAP, ALIBI, MBQ, MBK, DQ_ATOMIC, DQ_TMA, UNCHAIN, RNG,
                        bh.to(tl.int64) * seq_q, dropout_p, DROPOUT, start_n, WIDE_ROWS, lsh_q_chunk,
                        lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF, DQ_STORE)
        else:
            lo, full_lo, full_hi, hi = q_range(start_n, seq_q, seq_kv, q_off, band_lo, band_hi, BLOCK_M, BLOCK_N)
            # one loop for the band's masked edges and unmasked middle (see the forward kernel's band walk). Full
            # attention (no BAND term) has no edges: its tiles skip the masked branch at compile time (MASKED =
            # BAND), which held 201 of this loop's 658 instructions and 174 of the dQ loop's 467 at sm90 (Triton
            # 3.6, 64 x 128 x 8 x 3; the unmasked path itself about as long); H100, full 2 x 16k, the tuned
            # backward kernel 26.68 -> 25.66 ms, 32 x 1k 2.415 -> 2.330 (2026-12-06-full-unmasked-ab*-h100.json).
            # The forward's band walk keeps the branch: without it the same tile ran 8.57 -> 8.83 ms
            for start_m in range(lo + split * BLOCK_M, hi, BLOCK_M * n_split):
                start_m = tl.multiple_of(start_m, BLOCK_M)
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_don, stride_dqn,
                    start_m, (start_m < full_lo) | (start_m >= full_hi), offs_n, kp, seq_q, seq_kv, q_off, qk_scale,
                    cap_scale, dq_scale, slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, lay, lay_block,
                    stride_lay_q, doc_ids, BITS, 0, 0, Q_POS, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M,
                    MASKED=BAND, EVEN_Q=EVEN_Q, KV_BOUNDS=not EVEN_KV, BAND=True, PREFIX=False, Q_PREFIX=False,
                    HAS_FLAGS=False, HAS_LAYOUT=False, AND_CAUSAL=False, DOC=False, USE_BITS=False, HAS_Q_POS=False,
                    SOFTCAP=SOFTCAP, ALIBI=ALIBI, MBQ=BLOCK_M, MBK=BLOCK_N, DQ_ATOMIC=DQ_ATOMIC, DQ_TMA=DQ_TMA,
                    UNCHAIN=UNCHAIN, rng=RNG, rng_base=bh.to(tl.int64) * seq_q, dropout_p=dropout_p, DROPOUT=DROPOUT,
                    start_n=start_n, WIDE_ROWS=WIDE_ROWS)

    # dS was taken with respect to the scaled (and capped) score: chain back to q.k
    dk = dk * scale
    dk_ptrs = DK_OUT + b.to(tl.int64) * stride_dkb + hk * stride_dkh + n_rows * stride_dkn + offs_d[None, :]
    dv_ptrs = DV_OUT + b.to(tl.int64) * stride_dvb + hk * stride_dvh + n_rows * stride_dvn + offs_dv[None, :]
    dk_ok = in_kv[:, None] & (offs_d[None, :] < D)
    dv_ok = in_kv[:, None] & (offs_dv[None, :] < DV)
    slot = -1
    if PIECES:
        slot = tl.load(SLOT + start_n // MBK)
    if SPLIT_ATOMIC:
        tl.atomic_add(dk_ptrs, dk, mask=dk_ok, sem="relaxed")
        tl.atomic_add(dv_ptrs, dv, mask=dv_ok, sem="relaxed")
    elif slot >= 0:
        # a piece of a block walked in pieces: (B, HKV, n_slots, MBK, D) fp32 sums, written into dK/dV after the
        # pass
        rows = ((b * HKV + hk).to(tl.int64) * n_slots + slot) * MBK + offs_n % MBK
        tl.atomic_add(ACC_K + rows[:, None] * D + offs_d[None, :], dk, mask=dk_ok, sem="relaxed")
        tl.atomic_add(ACC_V + rows[:, None] * DV + offs_dv[None, :], dv, mask=dv_ok, sem="relaxed")
    else:
        tl.store(dk_ptrs, dk.to(DK_OUT.dtype.element_ty), mask=dk_ok)
        tl.store(dv_ptrs, dv.to(DV_OUT.dtype.element_ty), mask=dv_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start_n, edge, offs_m, qp, seq_q, seq_kv,
             qk_scale, cap_scale, slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block,
             stride_lay_q, DOC_IDS, BITS, tile, row0, KV_POS, offs_d, offs_dv,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_KV: tl.constexpr,
             BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
             HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
             HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
             MBQ: tl.constexpr, MBK: tl.constexpr, UNCHAIN: tl.constexpr = False,
             rng=0, rng_rows=0, dropout_p=0.0, DROPOUT: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False,
             lsh_q_chunk=0, lsh_k_chunk=0, LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0,
             LSH: tl.constexpr = False, LSH_NOT_SELF: tl.constexpr = False, dk_base=0, dv_base=0, stride_dkn=0,
             stride_dvn=0, scale=1.0, DKDV: tl.constexpr = False):
    """One key tile of a dQ program's walk: its term of dQ. ``DKDV``: these keys are seen by this query tile
    alone (``_dq_program``'s ``DKDV``), whose dK and dV rows this tile stores whole."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_kv = offs_n < seq_kv
    if EVEN_KV and D == BLOCK_D and DV == BLOCK_DV:
        k = tl.load(tile_rows(k_base, start_n, stride_kn, BLOCK_N, WIDE_ROWS) + offs_d[None, :])
        v = tl.load(tile_rows(v_base, start_n, stride_vn, BLOCK_N, WIDE_ROWS) + offs_dv[None, :])
    else:
        k = tl.load(tile_rows(k_base, start_n, stride_kn, BLOCK_N, WIDE_ROWS) + offs_d[None, :],
                    mask=in_kv[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(tile_rows(v_base, start_n, stride_vn, BLOCK_N, WIDE_ROWS) + offs_dv[None, :],
                    mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if HAS_KV_POS:
        kp = tl.load(KV_POS + offs_n, mask=in_kv, other=0)
    else:
        kp = offs_n
    qk = dot(q, tl.trans(k))
    dp = dot(do, tl.trans(v))     # issued before the exponentials, to run beside them (see _dkdv_tile)
    s, t = scores(qk, qp[:, None], kp[None, :], qk_scale, cap_scale, slope2, SOFTCAP, ALIBI)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        if edge:    # a tile at the pattern's edge or the keys' end; the others skip the mask
            keep = keep_mask(offs_m[:, None], offs_n[None, :], qp[:, None], kp[None, :], seq_q, seq_kv, band_lo,
                             band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS,
                             tile, (offs_m - row0)[:, None], (offs_n % MBK)[None, :], BAND, PREFIX, Q_PREFIX,
                             HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS, MBQ, MBK, not EVEN_KV, lsh_q_chunk,
                             lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF)
            p = tl.where(keep, p, 0.0)
    elif not EVEN_KV:
        p = tl.where(in_kv[None, :], p, 0.0)
    if DROPOUT:
        keep_d = dropout_keep(rng, rng_rows, start_n, seq_kv, rng_rows.shape[0], BLOCK_N)
        dp = tl.where(keep_d, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    if UNCHAIN:     # query tiles shorter than 16 rows a warp (subquad.ops.chained)
        ds_op = unchained(ds, seq_kv > 0, k.dtype)
    else:
        ds_op = ds.to(k.dtype)
    dq = dot_acc(ds_op, k, dq)
    if DKDV:
        kv_ok = in_kv[:, None]
        dv = dot(tl.trans(p.to(do.dtype)), do)
        tl.store(tile_rows(dv_base, start_n, stride_dvn, BLOCK_N, WIDE_ROWS) + offs_dv[None, :],
                 dv.to(dv_base.dtype.element_ty), mask=kv_ok & (offs_dv[None, :] < DV))
        dk = dot(tl.trans(ds_op), q) * scale
        tl.store(tile_rows(dk_base, start_n, stride_dkn, BLOCK_N, WIDE_ROWS) + offs_d[None, :],
                 dk.to(dk_base.dtype.element_ty), mask=kv_ok & (offs_d[None, :] < D))
    return dq


@triton.jit
def _dq_program(
    start_m, b, h,
    Q, K, V, DO, LSE, DELTA, DQ, DQ_IN,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, TILE_OF, BITS, DOC_IDS, Q_POS, KV_POS, IS_GLOBAL, LAYOUT, SLOPES,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh, stride_slope_b, stride_doc_b,
    stride_lay_b, stride_lay_h, stride_lay_q,
    seq_q, seq_kv, q_off, qk_scale, cap_scale, scale, band_lo, band_hi, prefix, q_prefix, n_flags, lay_block,
    full_width, part_width, n_qb, n_kb, mask_b, mask_h, RNG, dropout_p,
    K2, V2, KV2_POS, stride_k2b, stride_k2n, stride_k2h, stride_v2b, stride_v2n, stride_v2h, n2, band2_lo, band2_hi,
    FULL2_NUM, FULL2_IDX, PART2_NUM, PART2_IDX, full2_width, part2_width, mask2_b, mask2_h,
    DK_OUT, DV_OUT, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    HQ: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MBQ: tl.constexpr, MBK: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, USE_LIST: tl.constexpr,
    BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
    HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
    HAS_Q_POS: tl.constexpr, HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    UNCHAIN: tl.constexpr, DROPOUT: tl.constexpr, WIDE_ROWS: tl.constexpr, lsh_q_chunk=0, lsh_k_chunk=0,
    LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0, LSH: tl.constexpr = False,
    LSH_NOT_SELF: tl.constexpr = False, DQ_SEED: tl.constexpr = False, TWO_SOURCES: tl.constexpr = False,
    EVEN_KV2: tl.constexpr = False, ONE_BLOCK2: tl.constexpr = False, DKDV: tl.constexpr = False,
):
    """The query tile at ``start_m`` of query head ``h``: the forward's walk over key tiles, summing its dQ in
    one fixed order, then its store (``FULL_NUM``... are the query blocks' lists; ``Q_POS``, ``KV_POS``,
    ``lsh_*``: batch element ``b``'s, as ``tile.batch_rows`` gives them). ``DQ_SEED``: the sum starts from
    ``DQ_IN`` (fp32, ``DQ``'s strides), another key set's dQ of these rows. ``TWO_SOURCES``: the walk goes on
    over a second, gathered key set (``K2``..., as the forward's ``TWO_SOURCES`` walks it). ``DKDV``: every key
    block of the lists is listed by one query block alone, this tile holds that whole block and its head alone
    reads its KV head (``flash_bwd_kernel``'s ``DQ_DKDV``): each key tile of the walk stores its dK and dV."""
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < seq_q
    m_rows = offs_m.to(tl.int64)[:, None]
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + m_rows * stride_qn + offs_d[None, :]
    do_ptrs = DO + b.to(tl.int64) * stride_dob + h * stride_doh + m_rows * stride_don + offs_dv[None, :]
    if EVEN_Q and D == BLOCK_D and DV == BLOCK_DV:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptrs, mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    rows = (b * HQ + h).to(tl.int64) * seq_q + offs_m
    lse2 = tl.load(LSE + rows, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=in_q, other=0.0)
    if HAS_Q_POS:
        qp = tl.load(Q_POS + offs_m, mask=in_q, other=0)
    else:
        qp = offs_m + q_off
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slope_b + h).to(tl.float32) * 1.4426950408889634
    doc_ids = DOC_IDS
    if DOC:
        doc_ids = DOC_IDS + b * stride_doc_b
    lay = LAYOUT
    if HAS_LAYOUT:
        lay = LAYOUT + b * stride_lay_b + h * stride_lay_h
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    dk_base = DK_OUT + b.to(tl.int64) * stride_dkb + hk * stride_dkh
    dv_base = DV_OUT + b.to(tl.int64) * stride_dvb + hk * stride_dvh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    MASK_READS: tl.constexpr = HAS_FLAGS or HAS_LAYOUT or DOC or USE_BITS or LSH
    if USE_LIST:
        SUBS: tl.constexpr = MBK // BLOCK_N
        row0, base, n_full, n_all = list_row(start_m, b, h, mask_b, mask_h, n_qb, FULL_NUM, PART_NUM, MBQ)
        for part in tl.static_range(1 + MASK_READS):    # (tile.list_entry)
            lo, hi = list_part(part, n_full, n_all, MASK_READS)
            ahead = list_ahead(-1, lo, 1, hi, SUBS, n_full, base, FULL_IDX, full_width, PART_IDX, part_width)
            for t in range(0, (hi - lo) * SUBS):      # an iteration a key tile (the forward's list walk)
                kb, partial = ahead
                ahead = list_ahead(t, lo, 1, hi, SUBS, n_full, base, FULL_IDX, full_width, PART_IDX, part_width)
                tile = bitmask_tile(TILE_OF, base, n_kb, kb, partial, USE_BITS)
                start_n = kb * MBK + (t % SUBS) * BLOCK_N
                dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start_n,
                              list_edge(partial, start_n, seq_kv, BLOCK_N, MASK_READS, EVEN_KV), offs_m,
                              qp, seq_q, seq_kv, qk_scale, cap_scale, slope2, band_lo, band_hi, prefix, q_prefix,
                              IS_GLOBAL, n_flags, lay, lay_block, stride_lay_q, doc_ids, BITS, tile, row0, KV_POS,
                              offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, part == 1 or not MASK_READS,
                              EVEN_KV, BAND, PREFIX, Q_PREFIX, HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS,
                              HAS_KV_POS, SOFTCAP, ALIBI, MBQ, MBK, UNCHAIN, RNG, rows, dropout_p, DROPOUT,
                              WIDE_ROWS, lsh_q_chunk, lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF,
                              dk_base, dv_base, stride_dkn, stride_dvn, scale, DKDV)
    else:
        lo, full_lo, full_hi, hi = kv_range(start_m, seq_q, seq_kv, q_off, band_lo, band_hi, BLOCK_M, BLOCK_N)
        # one loop for the band's masked edges and unmasked middle (see the forward kernel's band walk); full
        # attention's without the masked branch (MASKED = BAND, as in the dK/dV programs' band walk)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start_n,
                          (start_n < full_lo) | (start_n >= full_hi), offs_m, qp, seq_q, seq_kv, qk_scale, cap_scale,
                          slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, lay, lay_block, stride_lay_q,
                          doc_ids, BITS, 0, 0, KV_POS, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASKED=BAND,
                          EVEN_KV=EVEN_KV, BAND=True, PREFIX=False, Q_PREFIX=False, HAS_FLAGS=False, HAS_LAYOUT=False,
                          AND_CAUSAL=False, DOC=False, USE_BITS=False, HAS_KV_POS=False, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
                          MBQ=BLOCK_M, MBK=BLOCK_N, UNCHAIN=UNCHAIN, rng=RNG, rng_rows=rows, dropout_p=dropout_p,
                          DROPOUT=DROPOUT, WIDE_ROWS=WIDE_ROWS)

    if TWO_SOURCES:
        # a plan's gathered columns after its local part (forward.py's TWO_SOURCES walk, the same tiles): the
        # rows' dQ over both key sets is one sum, stored once in the query's dtype, and the columns' own launch
        # computes dK/dV alone: no fp32 dQ sums, atomics or conversion (launch.backward_two_sources: strided
        # fwd+bwd 1.14-1.17x, fixed 1.03-1.10x on the H100)
        k2_base = K2 + b.to(tl.int64) * stride_k2b + hk * stride_k2h
        v2_base = V2 + b.to(tl.int64) * stride_v2b + hk * stride_v2h
        n_tiles2, base2, n_full2, n_listed2 = second_walk(start_m, b, h, mask2_b, mask2_h, n_qb, FULL2_NUM,
                                                          PART2_NUM, n2, MBQ, MBK, BLOCK_N, ONE_BLOCK2)
        ahead = second_ahead(-1, base2, n_full2, n_listed2, FULL2_IDX, full2_width, PART2_IDX, part2_width, MBK,
                             BLOCK_N, ONE_BLOCK2)
        for t in range(n_tiles2):
            start_n, partial = second_tile(t, ahead, MBK, BLOCK_N, ONE_BLOCK2)
            ahead = second_ahead(t, base2, n_full2, n_listed2, FULL2_IDX, full2_width, PART2_IDX, part2_width, MBK,
                                 BLOCK_N, ONE_BLOCK2)
            dq = _dq_tile(dq, q, do, lse2, delta, k2_base, v2_base, stride_k2n, stride_v2n, start_n,
                          list_edge(partial, start_n, n2, BLOCK_N, False, EVEN_KV2), offs_m, qp, seq_q, n2, qk_scale,
                          cap_scale, slope2, band2_lo, band2_hi, 0, 0, KV2_POS, 0, KV2_POS, 0, 0, KV2_POS, KV2_POS, 0,
                          0, KV2_POS, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASKED=True, EVEN_KV=EVEN_KV2,
                          BAND=True, PREFIX=False, Q_PREFIX=False, HAS_FLAGS=False, HAS_LAYOUT=False, AND_CAUSAL=False,
                          DOC=False, USE_BITS=False, HAS_KV_POS=True, SOFTCAP=SOFTCAP, ALIBI=ALIBI, MBQ=BLOCK_M,
                          MBK=BLOCK_N, UNCHAIN=UNCHAIN, WIDE_ROWS=WIDE_ROWS)

    dq = dq * scale
    dq_offs = b.to(tl.int64) * stride_dqb + h * stride_dqh + m_rows * stride_dqn + offs_d[None, :]
    dq_ok = in_q[:, None] & (offs_d[None, :] < D)
    if DQ_SEED:
        dq += tl.load(DQ_IN + dq_offs, mask=dq_ok, other=0.0)
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=dq_ok)


@triton.jit(do_not_specialize=["n_rows", "pid_offset", "tune_kv", "tune_walk"])
def flash_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_IN, DK_OUT, DV_OUT,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, TILE_OF, BITS, DOC_IDS, Q_POS, KV_POS, IS_GLOBAL, LAYOUT, SLOPES,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_slope_b, stride_doc_b,
    stride_lay_b, stride_lay_h, stride_lay_q,
    seq_q, seq_kv, q_off, qk_scale, cap_scale, scale, band_lo, band_hi, prefix, q_prefix, n_flags, lay_block,
    full_width, part_width, n_qb, n_kb, mask_b, mask_h,
    K2, V2, KV2_POS, stride_k2b, stride_k2n, stride_k2h, stride_v2b, stride_v2n, stride_v2h, n2, band2_lo, band2_hi,
    FULL2_NUM, FULL2_IDX, PART2_NUM, PART2_IDX, full2_width, part2_width, mask2_b, mask2_h,
    ORDER, n_items, piece_len, SLOT, ACC_K, ACC_V, n_slots,
    QFULL_NUM, QFULL_IDX, QPART_NUM, QPART_IDX, qfull_width, qpart_width, QORDER, RNG, dropout_p,
    LSH_Q_CHUNK, LSH_K_CHUNK, n_rows, pid_offset, tune_kv, tune_walk,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MBQ: tl.constexpr, MBK: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, USE_LIST: tl.constexpr,
    BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
    HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
    HAS_Q_POS: tl.constexpr, HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, SPLIT_ATOMIC: tl.constexpr, ORDERED: tl.constexpr = False,
    PIECES: tl.constexpr = False, DQ_TMA: tl.constexpr = False, UNCHAIN: tl.constexpr = False,
    DQ_PROGRAMS: tl.constexpr = False, DQ_BLOCK_M: tl.constexpr = 16, DQ_BLOCK_N: tl.constexpr = 16,
    DQ_UNCHAIN: tl.constexpr = False, DROPOUT: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False,
    SPLIT_GRID: tl.constexpr = False, BATCH_POS: tl.constexpr = False, LSH: tl.constexpr = False,
    LSH_CHUNK: tl.constexpr = 0, LSH_NOT_SELF: tl.constexpr = False, LSH_EARLIER: tl.constexpr = 0,
    HEAD_MAJOR: tl.constexpr = False, DQ_SEED: tl.constexpr = False, DQ_STORE: tl.constexpr = False,
    TWO_SOURCES: tl.constexpr = False, EVEN_KV2: tl.constexpr = False, ONE_BLOCK2: tl.constexpr = False,
    DQ_DKDV: tl.constexpr = False, Q_ROWS: tl.constexpr = 0, KV_ROWS: tl.constexpr = 0,
):
    """The backward's one launch. Grid ``(key tiles [+ query tiles x G], batch x KV heads, splits)``: a program
    below the key tiles runs ``_dkdv_program``; with ``DQ_PROGRAMS`` the programs after them run
    ``_dq_program`` on ``DQ_BLOCK_M``-row query tiles (the query blocks' lists are ``QFULL_NUM``..., their
    heaviest-first order ``QORDER``), so that dQ needs no atomics and no fp32 buffer, and the two kinds of
    program fill the GPU together. ``n_rows``, ``pid_offset``, ``SPLIT_GRID``: a grid past CUDA's limit
    (``tile.grid_row``); ``BATCH_POS``, ``LSH``: ``tile.batch_rows``; ``DQ_SEED``: the dQ programs add their
    sums to ``DQ_IN``'s (``_dq_program``); ``DQ_DKDV``: the dQ programs alone, storing dK/dV too
    (``_dq_program``'s ``DKDV``); ``Q_ROWS`` / ``KV_ROWS``: the row stride of Q, dO and dQ / of K and V as a
    constant (``launch._row_stride``; 0: read at run time)."""
    if Q_ROWS != 0:
        stride_qn = Q_ROWS
        stride_don = Q_ROWS
        stride_dqn = Q_ROWS
    if KV_ROWS != 0:
        stride_kn = KV_ROWS
        stride_vn = KV_ROWS
    pid = tl.program_id(0)
    n_kv_tiles = tl.cdiv(seq_kv, BLOCK_N)
    if ORDERED:
        n_kv_tiles = n_items * (MBK // BLOCK_N)
    if DQ_DKDV:
        n_kv_tiles = 0
    dq_role = False
    if DQ_PROGRAMS:
        dq_role = pid >= n_kv_tiles
    if dq_role:
        i = pid - n_kv_tiles
        if ORDERED:
            tile, bh, _ = heavy_first(QORDER, n_qb, n_qb, mask_b, mask_h, HQ, MBQ // DQ_BLOCK_M, 1, i,
                                      tl.num_programs(0) - n_kv_tiles, grid_rows(n_rows, SPLIT_GRID) * G,
                                      pid_offset, SPLIT_GRID, HEAD_MAJOR)
            start_m = tile * DQ_BLOCK_M
            b = bh // HQ
            h = bh % HQ
        else:
            # the latest query tiles first (the longest under a causal band); a GQA group's heads side by side,
            # so that they read their K/V tiles from L2
            start_m = (tl.cdiv(seq_q, DQ_BLOCK_M) - 1 - i // G) * DQ_BLOCK_M
            row = grid_row(pid_offset, SPLIT_GRID)
            b = row // HKV
            h = (row % HKV) * G + i % G
        q_pos, kv_pos, lsh_q_chunk, lsh_k_chunk = batch_rows(Q_POS, KV_POS, LSH_Q_CHUNK, LSH_K_CHUNK, b, seq_q,
                                                             seq_kv, BATCH_POS, LSH_EARLIER)
        _dq_program(
            start_m, b, h, Q, K, V, DO, LSE, DELTA, DQ, DQ_IN,
            QFULL_NUM, QFULL_IDX, QPART_NUM, QPART_IDX, TILE_OF, BITS, DOC_IDS, q_pos, kv_pos, IS_GLOBAL, LAYOUT,
            SLOPES, stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
            stride_vh, stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh, stride_slope_b,
            stride_doc_b, stride_lay_b, stride_lay_h, stride_lay_q, seq_q, seq_kv, q_off, qk_scale, cap_scale,
            scale, band_lo, band_hi, prefix, q_prefix, n_flags, lay_block, qfull_width, qpart_width, n_qb, n_kb,
            mask_b, mask_h, RNG, dropout_p, K2, V2, KV2_POS, stride_k2b, stride_k2n, stride_k2h, stride_v2b,
            stride_v2n, stride_v2h, n2, band2_lo, band2_hi, FULL2_NUM, FULL2_IDX, PART2_NUM, PART2_IDX, full2_width,
            part2_width, mask2_b, mask2_h, DK_OUT, DV_OUT, stride_dkb, stride_dkn, stride_dkh, stride_dvb,
            stride_dvn, stride_dvh, HQ, G, D, DV, BLOCK_D, BLOCK_DV, DQ_BLOCK_M, DQ_BLOCK_N, MBQ, MBK,
            EVEN_Q, EVEN_KV, USE_LIST, BAND, PREFIX, Q_PREFIX, HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS,
            HAS_Q_POS, HAS_KV_POS, SOFTCAP, ALIBI, DQ_UNCHAIN, DROPOUT, WIDE_ROWS, lsh_q_chunk, lsh_k_chunk,
            LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF, DQ_SEED, TWO_SOURCES, EVEN_KV2, ONE_BLOCK2, DQ_DKDV)
    else:
        piece = 0
        if ORDERED:
            tile, pid_bh, piece = heavy_first(ORDER, n_kb, n_items, mask_b, mask_h, HKV, MBK // BLOCK_N, G, pid,
                                              n_kv_tiles, grid_rows(n_rows, SPLIT_GRID), pid_offset, SPLIT_GRID,
                                              HEAD_MAJOR)
            start_n = tile * BLOCK_N
        else:
            start_n = pid * BLOCK_N
            pid_bh = grid_row(pid_offset, SPLIT_GRID)
        q_pos, kv_pos, lsh_q_chunk, lsh_k_chunk = batch_rows(Q_POS, KV_POS, LSH_Q_CHUNK, LSH_K_CHUNK,
                                                             pid_bh // HKV, seq_q, seq_kv, BATCH_POS,
                                                             LSH_EARLIER)
        _dkdv_program(
            start_n, pid_bh // HKV, pid_bh % HKV, piece, tl.program_id(2), tl.num_programs(2),
            Q, K, V, DO, LSE, DELTA, DQ, DK_OUT, DV_OUT,
            FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, TILE_OF, BITS, DOC_IDS, q_pos, kv_pos, IS_GLOBAL, LAYOUT, SLOPES,
            stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
            stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_slope_b, stride_doc_b,
            stride_lay_b, stride_lay_h, stride_lay_q,
            seq_q, seq_kv, q_off, qk_scale, cap_scale, scale, band_lo, band_hi, prefix, q_prefix, n_flags,
            lay_block, full_width, part_width, n_qb, n_kb, mask_b, mask_h, piece_len, SLOT, ACC_K, ACC_V, n_slots,
            RNG, dropout_p, HQ, HKV, G, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MBQ, MBK, EVEN_Q, EVEN_KV, USE_LIST,
            BAND, PREFIX, Q_PREFIX, HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS, HAS_Q_POS, HAS_KV_POS,
            SOFTCAP, ALIBI, DQ_ATOMIC, SPLIT_ATOMIC, PIECES, DQ_TMA, UNCHAIN, DROPOUT, WIDE_ROWS, lsh_q_chunk,
            lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF, DQ_STORE)

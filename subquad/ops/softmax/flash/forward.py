"""Flash attention forward kernel: one program per (query tile, batch, query head), online softmax over the
key tiles that the pattern keeps.

Key tiles are visited in one of two ways (``USE_LIST``):

* a band (full, causal, sliding window) needs no list: the key range of a query tile is computed in the
  kernel, split into masked edges and an unmasked middle (``tile.kv_range``);
* any other pattern follows the BlockMask: its full blocks run without masking, its partial blocks apply
  the pattern's in-kernel terms (``tile.keep_mask``: band, global tokens, block layout, documents, or a
  bitmask), empty blocks are never loaded. A BlockMask block may hold several kernel tiles (``MBQ``/``MBK``
  are the block sizes, multiples of the tile sizes).

Either walk is one loop, the mask behind a runtime branch that unmasked tiles skip, so that the software
pipeliner loads each tile during the one before it (a loop per part waited for its first tile's keys at every
boundary: 1.02-1.10x on the H200, ``2026-12-04-one-loop-walks-ab-h200.json``); where the mask reads memory the
full blocks keep a loop of their own (``tile.list_entry``).

``OVERLAP`` (a tuning configuration of band walks, ``tuning._overlaps``): FlashAttention-3's order within a
warpgroup, each tile's P.V product issued before the next tile's softmax and run beside it. Triton waits for an
asynchronous product at once in a loop with a branch, so the unmasked middle then has a loop of its own and the
masked edges come after it (H100: forward 1.055x at full 2 x 16k, 1.042x causal; slower on short walks, where the
tuner keeps the one loop).

``TWO_SOURCES`` adds a second key set after the first (a plan's gathered columns, kept by a band on their
original positions), so that a band and its global columns are one launch with one output. Its key tiles follow
its own BlockMask (``FULL2_*``/``PART2_*``, blocks of the same size as the first source's): full blocks
unmasked, partial ones under the band, empty ones never loaded.

``PIECES``: a query block whose list is far longer than the rest (the global rows of Longformer / BigBird walk
every key block) runs as several programs, each over a stretch of ``piece_len`` entries, ranked with the other
blocks in ``ORDER``; such a program writes its rows' output and LSE to ``O_PART`` / ``LSE_PART`` (fp32) at the
block's ``SLOT``, and the launcher merges them by LSE (``launch.forward``).

``SEEDED``: ``O`` and ``LSE`` come in holding a result over other pairs of the same rows, which this launch
goes on from and overwrites (a natural plan's second component, ``launch.forward``'s ``into``).

``DROPOUT``: attention dropout on the probabilities (not on the normaliser or the LSE), each pair kept or
dropped by ``tile.dropout_keep`` as every pass and tiling decides it, the kept ones scaled by ``1 / (1 - p)``.
Not with ``TWO_SOURCES`` (a gathered key's counter would be its place in the gathered set).

``BATCH_POS`` / ``LSH``: Reformer's LSH attention folds its (sequence, head, hash round) triples into the batch,
each sorted by bucket its own way, with a row of original positions per batch element and the ``LSH`` term of
``tile.keep_mask`` (``subquad.ops.lsh.flash``).

GQA/MQA: query head ``h`` reads KV head ``h // G`` in place; K/V are never repeated in memory.
Output: ``o`` in the input dtype and ``lse`` (natural log, fp32, ``-inf`` for a row that sees no key; its
output is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...chained import unchained_rescaled
from .tile import (batch_rows, bitmask_tile, dot, dot_acc, dropout_keep, grid_row, grid_rows, heavy_first,
                   keep_mask, kv_range, list_ahead, list_edge, list_part, list_row, scores, second_ahead, second_tile,
                   second_walk, tile_rows)

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_qk(q, k_base, stride_kn, start_n, seq_kv, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, EVEN_KV: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """``q . K^T`` over a key tile."""
    if EVEN_KV and D == BLOCK_D:
        k = tl.load(tile_rows(k_base, start_n, stride_kn, BLOCK_N, WIDE_ROWS) + offs_d[None, :])
    else:
        in_kv = start_n + tl.arange(0, BLOCK_N) < seq_kv
        k = tl.load(tile_rows(k_base, start_n, stride_kn, BLOCK_N, WIDE_ROWS) + offs_d[None, :],
                    mask=in_kv[:, None] & (offs_d[None, :] < D), other=0.0)
    return dot(q, tl.trans(k))


@triton.jit
def _fwd_scores(qk, start_n, edge, offs_m, qp, qi_row, seq_q, seq_kv, qk_scale, cap_scale, slope2, band_lo, band_hi,
                prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS, tile, row0, KV_POS,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_KV: tl.constexpr, BAND: tl.constexpr,
                PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr, HAS_LAYOUT: tl.constexpr,
                AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr, HAS_KV_POS: tl.constexpr,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MBQ: tl.constexpr, MBK: tl.constexpr,
                lsh_q_chunk, lsh_k_chunk, LSH_EARLIER: tl.constexpr, LSH_CHUNK: tl.constexpr, LSH: tl.constexpr,
                LSH_NOT_SELF: tl.constexpr, RAW_MAX: tl.constexpr = False):
    """A key tile's scores (base 2) from its ``q . K^T``, -inf where the pattern drops a pair; under ``RAW_MAX``
    the products themselves, scaled by ``_fwd_probs``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_kv = offs_n < seq_kv
    if HAS_KV_POS:
        kp = tl.load(KV_POS + offs_n, mask=in_kv, other=0)
    else:
        kp = offs_n
    if RAW_MAX:
        s = qk
    else:
        s, _ = scores(qk, qp[:, None], kp[None, :], qk_scale, cap_scale, slope2, SOFTCAP, ALIBI)
    if MASKED:
        if edge:
            keep = keep_mask(qi_row[:, None], offs_n[None, :], qp[:, None], kp[None, :], seq_q, seq_kv, band_lo,
                             band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS,
                             tile, (offs_m - row0)[:, None], (offs_n % MBK)[None, :], BAND, PREFIX, Q_PREFIX,
                             HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS, MBQ, MBK, not EVEN_KV, lsh_q_chunk,
                             lsh_k_chunk, LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF)
            s = tl.where(keep, s, float("-inf"))
    elif not EVEN_KV:
        s = tl.where(in_kv[None, :], s, float("-inf"))
    return s


@triton.jit
def _unmasked_scores(qk, qp, start_n, qk_scale, cap_scale, slope2, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                     ALIBI: tl.constexpr, RAW_MAX: tl.constexpr):
    """``_fwd_scores`` of a key tile that every row keeps whole (the overlapped loop's)."""
    if RAW_MAX:
        return qk
    s, _ = scores(qk, qp[:, None], (start_n + tl.arange(0, BLOCK_N))[None, :], qk_scale, cap_scale, slope2,
                  SOFTCAP, ALIBI)
    return s


@triton.jit
def _fwd_probs(s, l_i, m_i, start_n, seq_kv, rng, rng_rows, BLOCK_N: tl.constexpr, MAY_BE_EMPTY: tl.constexpr,
               DROPOUT: tl.constexpr, qk_scale=1.0, RAW_MAX: tl.constexpr = False):
    """The online softmax's step over a tile's scores: its probabilities (relative to the new running maximum),
    the factor ``alpha`` that rescales what was summed before, and the new normaliser and maximum.

    ``RAW_MAX`` (no softcap, no ALiBi, a positive scale: ``launch.forward``): ``s`` holds the raw products, whose
    row maximum is scaled once instead of every product before it (rounding is monotone, so the maximum is the
    same number), and each probability's exponent is one ``FFMA``; the scaled products had cost a tile 32 (64 x 64
    a warpgroup) or 64 (64 x 128) ``FMUL`` a thread for the maximum alone (sm90, Triton 3.6)."""
    if RAW_MAX:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if RAW_MAX:
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:     # the normaliser keeps every probability; the output only the kept ones (rescaled at the end)
        p = tl.where(dropout_keep(rng, rng_rows, start_n, seq_kv, rng_rows.shape[0], BLOCK_N), p, 0.0)
    return p, alpha, l_i, m_new


@triton.jit
def _rescaled(p, acc, alpha, seq_kv, DTYPE: tl.constexpr, UNCHAIN: tl.constexpr):
    """The accumulator rescaled after a softmax step, and the probabilities for the P.V product: as they are
    (converted at the product, so that they stay in registers) or, under ``UNCHAIN`` (query tiles shorter than 16
    rows a warp, ``subquad.ops.chained``), converted in the branch that keeps the scores' product unchained."""
    if UNCHAIN:
        p, acc = unchained_rescaled(p, acc, alpha, seq_kv > 0, DTYPE)
    else:
        acc = acc * alpha[:, None]
    return p, acc


@triton.jit
def _fwd_values(acc, p_op, v_base, stride_vn, start_n, seq_kv, offs_dv, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_N: tl.constexpr, EVEN_KV: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """``acc + p_op . V`` over a key tile."""
    if EVEN_KV and DV == BLOCK_DV:
        v = tl.load(tile_rows(v_base, start_n, stride_vn, BLOCK_N, WIDE_ROWS) + offs_dv[None, :])
    else:
        in_kv = start_n + tl.arange(0, BLOCK_N) < seq_kv
        v = tl.load(tile_rows(v_base, start_n, stride_vn, BLOCK_N, WIDE_ROWS) + offs_dv[None, :],
                    mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return dot_acc(p_op, v, acc)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, edge, offs_m, qp, qi_row,
              seq_q, seq_kv, qk_scale, cap_scale, slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL, n_flags,
              LAY, lay_block, stride_lay_q, DOC_IDS, BITS, tile, row0, KV_POS, offs_d, offs_dv,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_KV: tl.constexpr,
              BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
              HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
              HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              MBQ: tl.constexpr, MBK: tl.constexpr, UNCHAIN: tl.constexpr = False,
              rng=0, rng_rows=0, dropout_p=0.0, DROPOUT: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False,
              lsh_q_chunk=0, lsh_k_chunk=0, LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0,
              LSH: tl.constexpr = False, LSH_NOT_SELF: tl.constexpr = False, RAW_MAX: tl.constexpr = False):
    """One key tile of the online softmax: scores, probabilities, the accumulator rescaled, then P.V."""
    qk = _fwd_qk(q, k_base, stride_kn, start_n, seq_kv, offs_d, D, BLOCK_D, BLOCK_N, EVEN_KV, WIDE_ROWS)
    s = _fwd_scores(qk, start_n, edge, offs_m, qp, qi_row, seq_q, seq_kv, qk_scale, cap_scale, slope2, band_lo,
                    band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY, lay_block, stride_lay_q, DOC_IDS, BITS, tile,
                    row0, KV_POS, BLOCK_N, MASKED, EVEN_KV, BAND, PREFIX, Q_PREFIX, HAS_FLAGS, HAS_LAYOUT,
                    AND_CAUSAL, DOC, USE_BITS, HAS_KV_POS, SOFTCAP, ALIBI, MBQ, MBK, lsh_q_chunk, lsh_k_chunk,
                    LSH_EARLIER, LSH_CHUNK, LSH, LSH_NOT_SELF, RAW_MAX)
    p, alpha, l_i, m_new = _fwd_probs(s, l_i, m_i, start_n, seq_kv, rng, rng_rows, BLOCK_N, MASKED or not EVEN_KV,
                                      DROPOUT, qk_scale, RAW_MAX)
    if UNCHAIN:     # query tiles shorter than 16 rows a warp (subquad.ops.chained)
        p_op, acc = unchained_rescaled(p, acc, alpha, seq_kv > 0, q.dtype)
    else:
        p_op = p.to(q.dtype)
        acc = acc * alpha[:, None]
    acc = _fwd_values(acc, p_op, v_base, stride_vn, start_n, seq_kv, offs_dv, DV, BLOCK_DV, BLOCK_N, EVEN_KV,
                      WIDE_ROWS)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["n_rows", "pid_offset", "tune_kv", "tune_walk", "tail_heads"])
def flash_fwd_kernel(
    Q, K, V, O, LSE,
    FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, TILE_OF, BITS, DOC_IDS, Q_POS, KV_POS, IS_GLOBAL, LAYOUT, SLOPES,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_slope_b, stride_doc_b, stride_lay_b, stride_lay_h, stride_lay_q,
    seq_q, seq_kv, q_off, qk_scale, cap_scale, band_lo, band_hi, prefix, q_prefix, n_flags, lay_block,
    full_width, part_width, n_qb, n_kb, mask_b, mask_h,
    K2, V2, KV2_POS, stride_k2b, stride_k2n, stride_k2h, stride_v2b, stride_v2n, stride_v2h, n2, band2_lo, band2_hi,
    FULL2_NUM, FULL2_IDX, PART2_NUM, PART2_IDX, full2_width, part2_width, mask2_b, mask2_h,
    ORDER, n_items, piece_len, SLOT, O_PART, LSE_PART, n_slots, n_pieces, RNG, dropout_p,
    LSH_Q_CHUNK, LSH_K_CHUNK, n_rows, pid_offset, tune_kv, tune_walk, tail_heads,
    HQ: tl.constexpr, G: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MBQ: tl.constexpr, MBK: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, USE_LIST: tl.constexpr,
    BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
    HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
    HAS_Q_POS: tl.constexpr, HAS_KV_POS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    TWO_SOURCES: tl.constexpr = False, EVEN_KV2: tl.constexpr = False, ONE_BLOCK2: tl.constexpr = False,
    ORDERED: tl.constexpr = False, UNCHAIN: tl.constexpr = False, PIECES: tl.constexpr = False,
    DROPOUT: tl.constexpr = False, WIDE_ROWS: tl.constexpr = False, SPLIT_GRID: tl.constexpr = False,
    BATCH_POS: tl.constexpr = False, LSH: tl.constexpr = False, LSH_CHUNK: tl.constexpr = 0,
    LSH_NOT_SELF: tl.constexpr = False, LSH_EARLIER: tl.constexpr = 0, HEAD_MAJOR: tl.constexpr = False,
    SEEDED: tl.constexpr = False, OVERLAP: tl.constexpr = False, KV_ROWS: tl.constexpr = 0,
    RAW_MAX: tl.constexpr = False,
):
    """Grid ``(query tiles, batch x query heads)``; ``n_rows``, ``pid_offset``, ``SPLIT_GRID``: a grid past CUDA's
    limit (``tile.grid_row``); ``BATCH_POS``, ``LSH``: ``tile.batch_rows``; ``KV_ROWS``: K's and V's row stride as
    a constant (``launch._row_stride``; 0: read at run time); ``RAW_MAX``: the row maximum over the raw products
    (``_fwd_probs``)."""
    if KV_ROWS != 0:
        stride_kn = KV_ROWS
        stride_vn = KV_ROWS
    piece = 0
    if ORDERED:
        tile, pid_bh, piece = heavy_first(ORDER, n_qb, n_items, mask_b, mask_h, HQ, MBQ // BLOCK_M, 1,
                                          tl.program_id(0), tl.num_programs(0), grid_rows(n_rows, SPLIT_GRID),
                                          pid_offset, SPLIT_GRID, HEAD_MAJOR, tail_heads)
        start_m = tile * BLOCK_M
    else:
        # the longest query tiles (late rows under a causal band) start first
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        pid_bh = grid_row(pid_offset, SPLIT_GRID)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // G
    q_pos, kv_pos, lsh_q_chunk, lsh_k_chunk = batch_rows(Q_POS, KV_POS, LSH_Q_CHUNK, LSH_K_CHUNK, b, seq_q, seq_kv,
                                                         BATCH_POS, LSH_EARLIER)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < seq_q
    # rows in int64 here and at every load and store: a row's offset (row x heads x head_dim) passes 2^31
    # elements at 128k tokens of 128 heads of 128, where int32 wrapped (reads and writes outside the tensors)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    if EVEN_Q and D == BLOCK_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    if HAS_Q_POS:
        qp = tl.load(q_pos + offs_m, mask=in_q, other=0)
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

    rng_rows = offs_m
    if DROPOUT:
        rng_rows = pid_bh.to(tl.int64) * seq_q + offs_m
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    o_ok = in_q[:, None] & (offs_dv[None, :] < DV)
    o_ptrs = (O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on
              + offs_dv[None, :])
    if SEEDED:
        # O and LSE hold a result over other pairs of these rows (a plan's first component): the online softmax
        # goes on from it (m = lse, l = 1, acc = o) and overwrites it, where a second output and a merge read
        # and wrote three outputs' worth of memory. Only a cut walk's first piece starts from it
        seed_lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, mask=in_q, other=float("-inf"))
        if PIECES:
            seed_lse = tl.where(piece == 0, seed_lse, float("-inf"))
        seeded = seed_lse > float("-inf")
        m_i = tl.where(seeded, seed_lse * 1.4426950408889634, m_i)
        l_i = tl.where(seeded, 1.0, l_i)
        acc = tl.load(o_ptrs, mask=o_ok & seeded[:, None], other=0.0).to(tl.float32)

    MASK_READS: tl.constexpr = HAS_FLAGS or HAS_LAYOUT or DOC or USE_BITS or LSH
    if USE_LIST:
        SUBS: tl.constexpr = MBK // BLOCK_N
        row0, base, n_full, n_all = list_row(start_m, b, h, mask_b, mask_h, n_qb, FULL_NUM, PART_NUM, MBQ)
        for part in tl.static_range(1 + MASK_READS):    # (tile.list_entry)
            lo, hi = list_part(part, n_full, n_all, MASK_READS)
            if PIECES:      # a walk cut into pieces: this program's stretch of the row's entries
                lo = tl.maximum(lo, piece * piece_len)
                hi = tl.minimum(hi, (piece + 1) * piece_len)
            # an iteration a key tile, not a block: a block's tiles unrolled in the body took pipeline buffers
            # of their own (at 64-key tiles in 128-blocks, twice the shared memory: one program an SM)
            ahead = list_ahead(-1, lo, 1, hi, SUBS, n_full, base, FULL_IDX, full_width, PART_IDX, part_width)
            for t in range(0, (hi - lo) * SUBS):
                kb, partial = ahead
                ahead = list_ahead(t, lo, 1, hi, SUBS, n_full, base, FULL_IDX, full_width, PART_IDX, part_width)
                tile = bitmask_tile(TILE_OF, base, n_kb, kb, partial, USE_BITS)
                start_n = kb * MBK + (t % SUBS) * BLOCK_N
                edge = list_edge(partial, start_n, seq_kv, BLOCK_N, MASK_READS, EVEN_KV)
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, edge, offs_m, qp, offs_m,
                    seq_q, seq_kv, qk_scale, cap_scale, slope2, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL,
                    n_flags, lay, lay_block, stride_lay_q, doc_ids, BITS, tile, row0, kv_pos, offs_d, offs_dv, D,
                    DV, BLOCK_D, BLOCK_DV, BLOCK_N, part == 1 or not MASK_READS, EVEN_KV, BAND, PREFIX, Q_PREFIX,
                    HAS_FLAGS, HAS_LAYOUT, AND_CAUSAL, DOC, USE_BITS, HAS_KV_POS, SOFTCAP, ALIBI, MBQ, MBK,
                    UNCHAIN, RNG, rng_rows, dropout_p, DROPOUT, WIDE_ROWS, lsh_q_chunk, lsh_k_chunk, LSH_EARLIER,
                    LSH_CHUNK, LSH, LSH_NOT_SELF, RAW_MAX)
    else:
        lo, full_lo, full_hi, hi = kv_range(start_m, seq_q, seq_kv, q_off, band_lo, band_hi, BLOCK_M, BLOCK_N)
        if OVERLAP:
            # FlashAttention-3's order within a warpgroup: the scores of tile j + 1 are issued before the P.V
            # product of tile j, which then runs on the tensor cores beside the softmax of tile j + 1. Triton
            # waits for an asynchronous product where its result is first used, but at once in a loop with a
            # branch: the unmasked middle (whole key tiles, no mask) has a loop of its own, the edges come after it
            if full_lo < full_hi:
                qk = _fwd_qk(q, k_base, stride_kn, full_lo, seq_kv, offs_d, D, BLOCK_D, BLOCK_N, True, WIDE_ROWS)
                s = _unmasked_scores(qk, qp, full_lo, qk_scale, cap_scale, slope2, BLOCK_N, SOFTCAP, ALIBI, RAW_MAX)
                p, alpha, l_i, m_i = _fwd_probs(s, l_i, m_i, full_lo, seq_kv, RNG, rng_rows, BLOCK_N, False,
                                                DROPOUT, qk_scale, RAW_MAX)
                p, acc = _rescaled(p, acc, alpha, seq_kv, q.dtype, UNCHAIN)
                for start_n in range(full_lo + BLOCK_N, full_hi, BLOCK_N):
                    start_n = tl.multiple_of(start_n, BLOCK_N)
                    qk = _fwd_qk(q, k_base, stride_kn, start_n, seq_kv, offs_d, D, BLOCK_D, BLOCK_N, True,
                                 WIDE_ROWS)
                    acc = _fwd_values(acc, p.to(q.dtype), v_base, stride_vn, start_n - BLOCK_N, seq_kv, offs_dv, DV,
                                      BLOCK_DV, BLOCK_N, True, WIDE_ROWS)
                    s = _unmasked_scores(qk, qp, start_n, qk_scale, cap_scale, slope2, BLOCK_N, SOFTCAP, ALIBI,
                                         RAW_MAX)
                    p, alpha, l_i, m_i = _fwd_probs(s, l_i, m_i, start_n, seq_kv, RNG, rng_rows, BLOCK_N, False,
                                                    DROPOUT, qk_scale, RAW_MAX)
                    p, acc = _rescaled(p, acc, alpha, seq_kv, q.dtype, UNCHAIN)
                acc = _fwd_values(acc, p.to(q.dtype), v_base, stride_vn, full_hi - BLOCK_N, seq_kv, offs_dv, DV,
                                  BLOCK_DV, BLOCK_N, True, WIDE_ROWS)
            n_lead = tl.cdiv(full_lo - lo, BLOCK_N)     # (full_lo is hi where no tile is unmasked)
            for t in range(0, n_lead + tl.cdiv(hi - full_hi, BLOCK_N)):
                start_n = tl.where(t < n_lead, lo + t * BLOCK_N, full_hi + (t - n_lead) * BLOCK_N)
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, True, offs_m, qp, offs_m, seq_q,
                    seq_kv, qk_scale, cap_scale, slope2, band_lo, band_hi, 0, 0, KV_POS, 0, KV_POS, 0, 0, KV_POS,
                    KV_POS, 0, 0, KV_POS, offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASKED=True,
                    EVEN_KV=EVEN_KV, BAND=True, PREFIX=False, Q_PREFIX=False, HAS_FLAGS=False, HAS_LAYOUT=False,
                    AND_CAUSAL=False, DOC=False, USE_BITS=False, HAS_KV_POS=False, SOFTCAP=SOFTCAP, ALIBI=ALIBI,
                    MBQ=BLOCK_M, MBK=BLOCK_N, UNCHAIN=UNCHAIN, rng=RNG, rng_rows=rng_rows, dropout_p=dropout_p,
                    DROPOUT=DROPOUT, WIDE_ROWS=WIDE_ROWS, RAW_MAX=RAW_MAX)
        else:
            # one loop for the band's masked edges and unmasked middle: the software pipeliner then loads each tile
            # during the one before it, where a loop per part waited for its first tile's keys at every boundary
            for start_n in range(lo, hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n,
                    (start_n < full_lo) | (start_n >= full_hi), offs_m, qp, offs_m, seq_q, seq_kv, qk_scale, cap_scale,
                    slope2, band_lo, band_hi, 0, 0, KV_POS, 0, KV_POS, 0, 0, KV_POS, KV_POS, 0, 0, KV_POS, offs_d,
                    offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASKED=True, EVEN_KV=EVEN_KV, BAND=True, PREFIX=False,
                    Q_PREFIX=False, HAS_FLAGS=False, HAS_LAYOUT=False, AND_CAUSAL=False, DOC=False, USE_BITS=False,
                    HAS_KV_POS=False, SOFTCAP=SOFTCAP, ALIBI=ALIBI, MBQ=BLOCK_M, MBK=BLOCK_N, UNCHAIN=UNCHAIN, rng=RNG,
                    rng_rows=rng_rows, dropout_p=dropout_p, DROPOUT=DROPOUT, WIDE_ROWS=WIDE_ROWS, RAW_MAX=RAW_MAX)

    if TWO_SOURCES:
        # a second, gathered key set (a plan's global columns: ``n2`` keys at positions ``KV2_POS``, kept where
        # ``band2_lo <= q_pos - k_pos <= band2_hi``) in the same online softmax: no second launch, no second
        # read of this Q tile, no LSE merge. Its blocks are visited as its BlockMask says (when every column
        # tile was walked and masked, the fixed pattern's columns at 64k, half of them outside the band, ran at
        # 150 effective TFLOP/s on the H100)
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
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k2_base, v2_base, stride_k2n, stride_v2n, start_n,
                list_edge(partial, start_n, n2, BLOCK_N, False, EVEN_KV2), offs_m, qp, offs_m, seq_q, n2, qk_scale,
                cap_scale, slope2, band2_lo, band2_hi, 0, 0, KV2_POS, 0, KV2_POS, 0, 0, KV2_POS, KV2_POS, 0, 0, KV2_POS,
                offs_d, offs_dv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASKED=True, EVEN_KV=EVEN_KV2, BAND=True,
                PREFIX=False, Q_PREFIX=False, HAS_FLAGS=False, HAS_LAYOUT=False, AND_CAUSAL=False, DOC=False,
                USE_BITS=False, HAS_KV_POS=True, SOFTCAP=SOFTCAP, ALIBI=ALIBI, MBQ=BLOCK_M, MBK=BLOCK_N,
                UNCHAIN=UNCHAIN, WIDE_ROWS=WIDE_ROWS, RAW_MAX=RAW_MAX)

    empty = l_i == 0.0
    norm = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        norm = norm * (1.0 - dropout_p)
    acc = acc / norm[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    slot = -1
    if PIECES:
        slot = tl.load(SLOT + start_m // MBQ)
    if slot >= 0:
        # a piece of a cut walk: its rows' partial result (fp32), (batch, piece, cut row, head) and (batch,
        # piece, head, cut row), merged by LSE after the launch (launch._merge_pieces)
        n_rows = n_slots * MBQ
        cut_row = slot * MBQ + offs_m % MBQ
        bp = (b * n_pieces + piece).to(tl.int64)
        tl.store(O_PART + ((bp * n_rows + cut_row)[:, None] * HQ + h) * DV + offs_dv[None, :], acc, mask=o_ok)
        tl.store(LSE_PART + (bp * HQ + h) * n_rows + cut_row, lse, mask=in_q)
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_ok)
        tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=in_q)

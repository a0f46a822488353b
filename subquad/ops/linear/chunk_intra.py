"""Intra-chunk scores for a decay per key dimension (GLA): ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)``, j <= i,
with ``b`` the in-chunk cumulative log-decay (``chunk_cumsum`` writes it once for every kernel here).

One program per (chunk, head), two ways to the same numbers:
- Fast: with ``r`` the middle of the chunk's ``b`` per key dimension, ``exp(b_i - b_j) = exp(b_i - r) exp(r - b_j)``
  and the whole ``C x C`` block is one matmul of ``q e^{b - r}`` by ``k e^{r - b}``. Each factor is at most
  ``e^{spread / 2}``, with ``spread`` the widest range of ``b`` over the chunk's rows in any key dimension, so this
  is taken only where ``spread <= max_spread`` (chosen per dtype by the launcher so that the factors stay finite
  and far from the dtype's largest value). A GLA gate (``logsigmoid(x) / 16``) spreads a 64-token chunk by a few
  units; decays below ~0.4 per token across a whole chunk take the safe form. Two exponentials per element.
- Safe, for decays near 0 (the spread reaches hundreds and the factors would overflow): sub-blocks of ``BC``
  rows, as flash-linear-attention does. Keys of earlier sub-blocks take a reference point just before the query
  sub-block, ``exp(b_i - base) exp(base - b_j)`` with both factors <= 1, in one matmul; the diagonal sub-block is
  element-wise, one key row at a time. fla runs only this form: its diagonal costs ``BC`` exponentials per
  element of ``q``, which made it the largest kernel of GLA's forward and backward here.
The backward kernel does the same for ``dq`` (queries against earlier keys) and ``dk`` (keys against later
queries), adding to the inter-chunk parts already in dq, dk. Rows past the end of a sequence are excluded from
every exponent (their cumulative decay is not defined).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _dot
from .tuning import INTRA


@triton.jit
def chunk_cumsum(g, gc, cu_seqlens, chunk_indices, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                 BK: tl.constexpr):
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    tok = bos + i_t * C + tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (tok < eos)[:, None] & (o_k < K)[None, :]
    p = (tok[:, None] * H + i_h) * K + o_k[None, :]
    tl.store(gc + p, tl.cumsum(tl.load(g + p, mask=m, other=0.0), axis=0), mask=m)


@triton.jit
def _chunk_rows(g, cu_seqlens, chunk_indices, i_c, i_h, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr):
    """First token of the chunk, its rows still in the sequence, the ``(C, BK)`` tile's offsets and mask, the
    rows' cumulative log-decays, the reference point per key dimension (middle of the valid rows' range) and
    the widest range."""
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    tok0 = bos + i_t * C
    n_valid = tl.minimum(eos - tok0, C).to(tl.int32)
    rows, o_k = tl.arange(0, C), tl.arange(0, BK)
    m_t = rows < n_valid
    p_all = ((tok0 + rows)[:, None] * H + i_h) * K + o_k[None, :]
    m_all = m_t[:, None] & (o_k < K)[None, :]
    g_all = tl.load(g + p_all, mask=m_all, other=0.0)
    hi = tl.max(tl.where(m_t[:, None], g_all, float("-inf")), axis=0)
    lo = tl.min(tl.where(m_t[:, None], g_all, float("inf")), axis=0)
    return tok0, n_valid, p_all, m_all, g_all, (hi + lo) * 0.5, tl.max(hi - lo, axis=0)


@triton.jit
def _decay_factors(g_all, ref, m_t):
    """``e^{b - r}`` and ``e^{r - b}`` per element, 0 on rows past the sequence's end."""
    up = tl.exp(tl.where(m_t[:, None], g_all - ref[None, :], float("-inf")))
    down = tl.exp(tl.where(m_t[:, None], ref[None, :] - g_all, float("-inf")))
    return up, down


@triton.jit
def _sub_block_scores(q, k, gc, p_a, g_all, b_k, tok0, n_valid, start, i_h, H: tl.constexpr, K: tl.constexpr,
                      C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """The safe form for the query rows ``start .. start + BC`` of the chunk: writes A[sub, :]."""
    rows = tl.arange(0, C)
    sub = start + tl.arange(0, BC)
    m_t, m_s = rows < n_valid, sub < n_valid
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_sub = ((tok0 + sub)[:, None] * H + i_h) * K + o_k[None, :]
    g_sub = tl.load(gc + p_sub, mask=m_s[:, None] & m_k[None, :], other=0.0)
    base_row = tl.maximum(tl.minimum(start - 1, n_valid - 1), 0)
    base = tl.load(gc + ((tok0 + base_row) * H + i_h) * K + o_k, mask=m_k & (o_k * 0 + start > 0), other=0.0)
    q_s = tl.load(q + p_sub, mask=m_s[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    earlier = (rows < start) & m_t
    k_dec = b_k * tl.exp(tl.where(earlier[:, None], base[None, :] - g_all, float("-inf")))
    q_dec = q_s * tl.exp(tl.where(m_s[:, None], g_sub - base[None, :], float("-inf")))
    off = _dot(q_dec.to(b_k.dtype), tl.trans(k_dec.to(b_k.dtype)), IEEE)          # (BC, C)
    outside = (rows < start) | (rows >= start + BC)
    tl.store(p_a + sub[:, None] * C + rows[None, :], off, mask=outside[None, :])
    for jj in range(BC):
        j = start + jj
        m_j = o_k * 0 + j < n_valid                                             # (BK,) all equal
        k_j = tl.load(k + ((tok0 + j) * H + i_h) * K + o_k, mask=m_k & m_j, other=0.0).to(tl.float32)
        g_j = tl.load(gc + ((tok0 + j) * H + i_h) * K + o_k, mask=m_k & m_j, other=0.0)
        keep = (sub >= j) & m_s & (sub * 0 + j < n_valid)
        col = tl.sum(q_s * k_j[None, :] * tl.exp(tl.where(keep[:, None], g_sub - g_j[None, :], float("-inf"))), axis=1)
        tl.store(p_a + sub * C + j, col)


@triton.jit
def _sub_block_grads(q, k, gc, p_da, dq, dk, g_all, b_q, b_k, tok0, n_valid, start, i_h, H: tl.constexpr,
                     K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """The safe form for the rows ``start .. start + BC``: their dq (as queries) and dk (as keys) added."""
    rows = tl.arange(0, C)
    sub = start + tl.arange(0, BC)
    m_t, m_s = rows < n_valid, sub < n_valid
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_sub = m_s[:, None] & m_k[None, :]
    p_sub = ((tok0 + sub)[:, None] * H + i_h) * K + o_k[None, :]
    g_sub = tl.load(gc + p_sub, mask=m_sub, other=0.0)
    base_row = tl.maximum(tl.minimum(start - 1, n_valid - 1), 0)
    end_row = tl.minimum(start + BC - 1, n_valid - 1)
    base = tl.load(gc + ((tok0 + base_row) * H + i_h) * K + o_k, mask=m_k & (o_k * 0 + start > 0), other=0.0)
    end = tl.load(gc + ((tok0 + tl.maximum(end_row, 0)) * H + i_h) * K + o_k, mask=m_k, other=0.0)
    da_rows = tl.load(p_da + sub[:, None] * C + rows[None, :])                 # (BC, C): this block's queries
    da_cols = tl.load(p_da + rows[:, None] * C + sub[None, :])                 # (C, BC): this block's keys
    earlier = (rows < start) & m_t
    later = (rows > end_row) & m_t
    # queries of the sub-block against keys of earlier sub-blocks
    k_dec = b_k * tl.exp(tl.where(earlier[:, None], base[None, :] - g_all, float("-inf")))
    dq_s = _dot(tl.where(earlier[None, :], da_rows, 0.0).to(b_k.dtype), k_dec.to(b_k.dtype), IEEE)
    dq_s *= tl.exp(tl.where(m_s[:, None], g_sub - base[None, :], float("-inf")))
    # keys of the sub-block against queries of later sub-blocks
    q_dec = b_q * tl.exp(tl.where(later[:, None], g_all - end[None, :], float("-inf")))
    dk_s = _dot(tl.trans(tl.where(later[:, None], da_cols, 0.0)).to(b_q.dtype), q_dec.to(b_q.dtype), IEEE)
    dk_s *= tl.exp(tl.where(m_s[:, None], end[None, :] - g_sub, float("-inf")))
    # the diagonal sub-block, element-wise
    for jj in range(BC):
        j = start + jj
        m_j = o_k * 0 + j < n_valid                                             # (BK,) all equal
        p_j = ((tok0 + j) * H + i_h) * K + o_k
        k_j = tl.load(k + p_j, mask=m_k & m_j, other=0.0).to(tl.float32)
        q_j = tl.load(q + p_j, mask=m_k & m_j, other=0.0).to(tl.float32)
        g_j = tl.load(gc + p_j, mask=m_k & m_j, other=0.0)
        da_col = tl.load(p_da + sub * C + j)                                    # dA[i, j], i in the block
        da_row = tl.load(p_da + j * C + sub)                                    # dA[j, i'], i' in the block
        after = (sub >= j) & m_s & (sub * 0 + j < n_valid)
        before = (sub <= j) & m_s & (sub * 0 + j < n_valid)
        dq_s += da_col[:, None] * k_j[None, :] * tl.exp(tl.where(after[:, None], g_sub - g_j[None, :],
                                                                 float("-inf")))
        dk_s += da_row[:, None] * q_j[None, :] * tl.exp(tl.where(before[:, None], g_j[None, :] - g_sub,
                                                                 float("-inf")))
    tl.store(dq + p_sub, (tl.load(dq + p_sub, mask=m_sub, other=0.0).to(tl.float32) + dq_s)
             .to(dq.dtype.element_ty), mask=m_sub)
    tl.store(dk + p_sub, (tl.load(dk + p_sub, mask=m_sub, other=0.0).to(tl.float32) + dk_s)
             .to(dk.dtype.element_ty), mask=m_sub)


@triton.autotune(configs=INTRA, key=["K", "C"])
@triton.jit
def intra_fwd(q, k, gc, A, cu_seqlens, chunk_indices, max_spread,
              H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    tok0, n_valid, p_all, m_all, g_all, ref, spread = _chunk_rows(gc, cu_seqlens, chunk_indices, i_c, i_h, H, K,
                                                                   C, BK)
    rows = tl.arange(0, C)
    m_t = rows < n_valid
    b_k = tl.load(k + p_all, mask=m_all, other=0.0)
    p_a = A + (i_c * H + i_h).to(tl.int64) * C * C
    if spread <= max_spread:
        b_q = tl.load(q + p_all, mask=m_all, other=0.0)
        up, down = _decay_factors(g_all, ref, m_t)
        scores = _dot((b_q * up).to(b_k.dtype), tl.trans((b_k * down).to(b_k.dtype)), IEEE)
        keep = (rows[:, None] >= rows[None, :]) & m_t[:, None]
        tl.store(p_a + rows[:, None] * C + rows[None, :], tl.where(keep, scores, 0.0))
    else:
        for i_s in range(C // BC):
            _sub_block_scores(q, k, gc, p_a, g_all, b_k, tok0, n_valid, i_s * BC, i_h, H, K, C, BC, BK, IEEE)


@triton.autotune(configs=INTRA, key=["K", "C"], restore_value=["dq", "dk"])
@triton.jit
def intra_bwd(q, k, gc, dA, dq, dk, cu_seqlens, chunk_indices, max_spread,
              H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    tok0, n_valid, p_all, m_all, g_all, ref, spread = _chunk_rows(gc, cu_seqlens, chunk_indices, i_c, i_h, H, K,
                                                                   C, BK)
    rows = tl.arange(0, C)
    m_t = rows < n_valid
    b_q = tl.load(q + p_all, mask=m_all, other=0.0)
    b_k = tl.load(k + p_all, mask=m_all, other=0.0)
    p_da = dA + (i_c * H + i_h).to(tl.int64) * C * C
    if spread <= max_spread:
        keep = (rows[:, None] >= rows[None, :]) & m_t[:, None]
        d_scores = tl.where(keep, tl.load(p_da + rows[:, None] * C + rows[None, :]), 0.0).to(b_q.dtype)
        up, down = _decay_factors(g_all, ref, m_t)
        dq_add = _dot(d_scores, (b_k * down).to(b_k.dtype), IEEE) * up
        dk_add = _dot(tl.trans(d_scores), (b_q * up).to(b_q.dtype), IEEE) * down
        tl.store(dq + p_all, (tl.load(dq + p_all, mask=m_all, other=0.0).to(tl.float32) + dq_add)
                 .to(dq.dtype.element_ty), mask=m_all)
        tl.store(dk + p_all, (tl.load(dk + p_all, mask=m_all, other=0.0).to(tl.float32) + dk_add)
                 .to(dk.dtype.element_ty), mask=m_all)
    else:
        for i_s in range(C // BC):
            _sub_block_grads(q, k, gc, p_da, dq, dk, g_all, b_q, b_k, tok0, n_valid, i_s * BC, i_h, H, K, C, BC,
                             BK, IEEE)


@triton.jit(do_not_specialize=["pid_offset"])
def decay_grad(q, k, dq, dk, db, final, dg, cu_seqlens, chunk_offsets, pid_offset,
               H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, VECTOR: tl.constexpr,
               HAS_FINAL: tl.constexpr):
    """dg = per-sequence reverse cumulative sum of dB (+ the final-state term at the last token), walking the
    chunks backwards with a running carry. VECTOR: dB = q dq - k dk per key dimension, computed here;
    otherwise dB is given per token (``db`` (T_total, H)) and ``K``/``BK`` are 1. ``pid_offset``: the
    sequences of the launches before this one (``grid.launch_split``)."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H + pid_offset, i_nh % H        # (pid_offset: as chunk_fwd.state_fwd's)
    i_nh += pid_offset * H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    if HAS_FINAL:
        carry = tl.load(final + i_nh * K + o_k, mask=m_k, other=0.0)
    else:
        carry = tl.zeros([BK], dtype=tl.float32)
    for i_r in range(n_chunks):
        tok = bos + (n_chunks - 1 - i_r) * C + tl.arange(0, C)
        m = (tok < eos)[:, None] & m_k[None, :]
        p = (tok[:, None] * H + i_h) * K + o_k[None, :]
        if VECTOR:
            x = (tl.load(q + p, mask=m, other=0.0).to(tl.float32) * tl.load(dq + p, mask=m, other=0.0).to(tl.float32)
                 - tl.load(k + p, mask=m, other=0.0).to(tl.float32) * tl.load(dk + p, mask=m, other=0.0).to(tl.float32))
        else:
            x = tl.load(db + p, mask=m, other=0.0)
        total = tl.sum(x, axis=0)
        tl.store(dg + p, total[None, :] - tl.cumsum(x, axis=0) + x + carry[None, :], mask=m)
        carry += total

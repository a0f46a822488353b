"""Intra-chunk scores for a decay per key dimension (GLA): ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)``, j <= i.

The decay cannot be factored out of a matmul without a reference point, and dividing by ``e^{b_j}`` overflows
when decays are near 0. So each chunk is split into sub-blocks of ``BC`` rows (as flash-linear-attention does):
- keys in earlier sub-blocks: with ``base`` the cumulative decay just before the query sub-block,
  ``exp(b_i - b_j) = exp(b_i - base) exp(base - b_j)``, both factors <= 1, one matmul;
- the diagonal sub-block: element-wise, one key column at a time (``BC`` steps).
The backward kernel does the same for ``dq`` (queries against earlier keys) and ``dk`` (keys against later
queries, reference point at the end of the key sub-block), adding to the inter-chunk parts already in dq, dk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _dot


@triton.jit
def intra_fwd(q, k, g, A, cu_seqlens, chunk_indices,
              H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr):
    i_s, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rows = tl.arange(0, C)
    sub = i_s * BC + tl.arange(0, BC)
    tok = bos + i_t * C + rows
    tok_s = bos + i_t * C + sub
    m_t, m_s = tok < eos, tok_s < eos
    acc = tl.zeros([BC, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_g = tl.load(g + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_b = tl.cumsum(b_g, axis=0)
        base = tl.sum(tl.where(rows[:, None] < i_s * BC, b_g, 0.0), axis=0)
        g_s = tl.load(g + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                      other=0.0)
        b_s = base[None, :] + tl.cumsum(g_s, axis=0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        q_s = tl.load(q + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)
        k_dec = b_k * tl.exp(tl.where(rows[:, None] < i_s * BC, base[None, :] - b_b, float("-inf")))
        acc += _dot((q_s * tl.exp(b_s - base[None, :])).to(b_k.dtype), tl.trans(k_dec.to(b_k.dtype)), IEEE)
        k_s = tl.load(k + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)
        for jj in range(BC):
            pick = sub[:, None] == i_s * BC + jj
            k_j = tl.sum(tl.where(pick, k_s, 0.0), axis=0)
            b_j = tl.sum(tl.where(pick, b_s, 0.0), axis=0)
            decay = tl.exp(tl.where(sub[:, None] >= i_s * BC + jj, b_s - b_j[None, :], float("-inf")))
            col = tl.sum(q_s * k_j[None, :] * decay, axis=1)
            acc += tl.where(rows[None, :] == i_s * BC + jj, col[:, None], 0.0)
    tl.store(A + (i_c * H + i_h).to(tl.int64) * C * C + sub[:, None] * C + rows[None, :], acc)


@triton.jit
def intra_bwd(q, k, g, dA, dq, dk, cu_seqlens, chunk_indices,
              H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr):
    i_s, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_kb = tl.cdiv(K, BK)
    i_h, i_k = i_hk // n_kb, i_hk % n_kb
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rows = tl.arange(0, C)
    sub = i_s * BC + tl.arange(0, BC)
    tok = bos + i_t * C + rows
    tok_s = bos + i_t * C + sub
    m_t, m_s = tok < eos, tok_s < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_all = m_t[:, None] & m_k[None, :]
    m_sub = m_s[:, None] & m_k[None, :]
    b_g = tl.load(g + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_all, other=0.0)
    b_b = tl.cumsum(b_g, axis=0)
    start = i_s * BC
    end_row = i_s * BC + BC - 1
    base = tl.sum(tl.where(rows[:, None] < start, b_g, 0.0), axis=0)
    g_s = tl.load(g + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_sub, other=0.0)
    b_s = base[None, :] + tl.cumsum(g_s, axis=0)
    end = base + tl.sum(g_s, axis=0)
    b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_all, other=0.0)
    b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_all, other=0.0)
    q_s = tl.load(q + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_sub, other=0.0).to(tl.float32)
    k_s = tl.load(k + (tok_s[:, None] * H + i_h) * K + o_k[None, :], mask=m_sub, other=0.0).to(tl.float32)
    dA_base = dA + (i_c * H + i_h).to(tl.int64) * C * C
    dA_rows = tl.load(dA_base + sub[:, None] * C + rows[None, :])          # (BC, C): this sub-block's queries
    dA_cols = tl.load(dA_base + rows[:, None] * C + sub[None, :])          # (C, BC): this sub-block's keys
    # queries of the sub-block against keys of earlier sub-blocks
    k_dec = b_k * tl.exp(tl.where(rows[:, None] < start, base[None, :] - b_b, float("-inf")))
    dq_s = _dot(tl.where(rows[None, :] < start, dA_rows, 0.0).to(b_k.dtype), k_dec.to(b_k.dtype), IEEE)
    dq_s *= tl.exp(b_s - base[None, :])
    # keys of the sub-block against queries of later sub-blocks
    q_dec = b_q * tl.exp(tl.where(rows[:, None] > end_row, b_b - end[None, :], float("-inf")))
    dk_s = _dot(tl.trans(tl.where(rows[:, None] > end_row, dA_cols, 0.0)).to(b_q.dtype), q_dec.to(b_q.dtype),
                IEEE)
    dk_s *= tl.exp(end[None, :] - b_s)
    # the diagonal sub-block, element-wise
    for jj in range(BC):
        pick = sub[:, None] == start + jj
        k_j = tl.sum(tl.where(pick, k_s, 0.0), axis=0)
        q_j = tl.sum(tl.where(pick, q_s, 0.0), axis=0)
        b_j = tl.sum(tl.where(pick, b_s, 0.0), axis=0)
        da_col = tl.sum(tl.where(rows[None, :] == start + jj, dA_rows, 0.0), axis=1)     # dA[i, j], i in sub
        da_row = tl.sum(tl.where(rows[:, None] == start + jj, dA_cols, 0.0), axis=0)     # dA[j, i'], i' in sub
        dq_s += da_col[:, None] * k_j[None, :] * tl.exp(
            tl.where(sub[:, None] >= start + jj, b_s - b_j[None, :], float("-inf")))
        dk_s += da_row[:, None] * q_j[None, :] * tl.exp(
            tl.where(sub[:, None] <= start + jj, b_j[None, :] - b_s, float("-inf")))
    p_dq = dq + (tok_s[:, None] * H + i_h) * K + o_k[None, :]
    p_dk = dk + (tok_s[:, None] * H + i_h) * K + o_k[None, :]
    tl.store(p_dq, (tl.load(p_dq, mask=m_sub, other=0.0).to(tl.float32) + dq_s).to(dq.dtype.element_ty), mask=m_sub)
    tl.store(p_dk, (tl.load(p_dk, mask=m_sub, other=0.0).to(tl.float32) + dk_s).to(dk.dtype.element_ty), mask=m_sub)

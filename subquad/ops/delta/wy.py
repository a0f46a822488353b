"""The WY representation of a chunk of delta-rule updates, in Triton: one program per (chunk, head) in each kernel.

Forward: ``A_ij = beta_i (k_i . k_j) exp(b_i - b_j)`` for ``i > j``, ``T = (I + A)^-1`` (the UT transform),
``w = T (beta e^b k)``, ``u = T (beta v)``. T is found in two steps:
1. the diagonal ``16 x 16`` blocks by forward substitution, one row a step, all blocks at once as a
   ``(C / 16, 16, 16)`` tensor: 14 steps of element-wise work and reductions within a block. (Done as ``C x C``
   tf32 matmuls, 15 dependent ones per chunk, or one block at a time with rows read back from memory, the
   kernel took 587 us at 4 x 8k on the H100; this way 189 us for T alone, 417 with w and u);
2. the off-diagonal blocks, by matmuls on the whole tile: with ``N = D^-1 A_offdiag`` (nilpotent, ``N^nb = 0`` for
   nb blocks), ``T = (I - N)(I + N^2)(I + N^4)... D^-1``, log2(nb) factors.

Backward, from ``dw``, ``du`` (with ``X_k = beta e^b k``, ``X_v = beta v``): ``dX = T^T [dw, du]``,
``dT = dw X_k^T + du X_v^T``, ``dA = -(T^T dT T^T)`` on the strictly lower part, then the chain rule through
``A``, ``X_k``, ``X_v`` to k, v, beta and the in-chunk cumulative decay b (whose reverse in-chunk cumulative sum
is the log-decay gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..autotuned import Autotuned
from ..linear.chunk import block_sizes
from ..linear.chunk_fwd import _dot
from ..linear.tuning import WY, WY_FWD, hold_at_most_128

SUB = 16


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _unit_lower_inverse(a, C: tl.constexpr, BC: tl.constexpr, SQUARINGS: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^-1 for a strictly lower (C, C) fp32 tile; SQUARINGS = log2(C / BC) - 1 (at least 0)."""
    NB: tl.constexpr = C // BC
    rows = tl.arange(0, C)
    same_block = (rows[:, None] // BC) == (rows[None, :] // BC)
    # the diagonal blocks stacked, d[b, i, j] = a[b BC + i, b BC + j], all solved at once: row i of
    # M = (I + d_b)^-1 - I is -d_b,i - sum_c d_b,ic M_c over the rows c < i, already final
    d = tl.sum(tl.reshape(tl.where(same_block, a, 0.0), (NB, BC, NB, BC)), axis=2)
    at_row = tl.arange(0, BC)[None, :, None]
    m = -d
    for i in tl.static_range(2, BC):
        row = -tl.sum(tl.where(at_row == i, d, 0.0), axis=1)
        row += tl.sum(row[:, :, None] * m, axis=1)
        m = tl.where(at_row == i, row[:, None, :], m)
    inv_blocks = m + tl.where(at_row == tl.arange(0, BC)[None, None, :], 1.0, 0.0)
    blk = tl.arange(0, NB)
    on_diagonal = blk[:, None, None, None] == blk[None, None, :, None]
    inv = tl.reshape(tl.where(on_diagonal, inv_blocks[:, :, None, :], 0.0), (C, C))
    # with N = D^-1 A_offdiag, nilpotent (N^NB = 0): (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    n = _mm(inv, tl.where(same_block, 0.0, a), PREC)
    t = eye - n
    for _ in tl.static_range(SQUARINGS):
        n = _mm(n, n, PREC)
        t = _mm(t, eye + n, PREC)
    return _mm(t, inv, PREC)


@triton.autotune(configs=WY_FWD, key=["K", "V", "C", "GATE"], prune_configs_by={"early_config_prune": hold_at_most_128})
@triton.jit
def wy_fwd(k, v, beta, g, T, w, u, cu_seqlens, chunk_indices,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
           SQUARINGS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr,
           GATE: tl.constexpr, HOLD: tl.constexpr, PREC: tl.constexpr, IEEE: tl.constexpr):
    """T = (I + A)^-1 per (chunk, head), computed in fp32 and stored in T's dtype; w = T (beta e^b k), u = T (beta v).
    (T in one kernel and w, u in a second measured the same, 417 against 424 us at 4 x 8k on the H100.)
    HOLD (a tuning choice): the chunk's k and v are loaded once, whole (KP, VP: K and V padded to powers of two),
    v before the inverse, and kept for the w and u products. The other way loads k twice and v after the
    inverse, tile by tile: each program then waits on its loads after its longest computation. At 1 x 32k on the
    H200 (gated, K = V = 128) the kernel took 430 us that way, 351 us holding (the autotuner's choice)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rows = tl.arange(0, C)
    tok = bos + i_t * C + rows
    m_t = tok < eos
    b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if HOLD:
        o_k, o_v = tl.arange(0, KP), tl.arange(0, VP)
        m_k, m_v = m_t[:, None] & (o_k < K)[None, :], m_t[:, None] & (o_v < V)[None, :]
        chunk_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_k, other=0.0)
        chunk_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_v, other=0.0)
        a = _dot(chunk_k, tl.trans(chunk_k), IEEE)
    else:
        a = tl.zeros([C, C], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                          other=0.0)
            a += _dot(b_k, tl.trans(b_k), IEEE)
    lower = rows[:, None] > rows[None, :]
    if GATE:
        # rows past the sequence's end (b = 0) against far-decayed columns would overflow (inf * 0)
        b_b = tl.load(g + tok * H + i_h, mask=m_t, other=0.0)
        a = a * b_beta[:, None] * tl.exp(tl.where(lower & m_t[:, None], b_b[:, None] - b_b[None, :], float("-inf")))
        xk_scale = b_beta * tl.exp(b_b)
    else:
        a = tl.where(lower, a * b_beta[:, None], 0.0)
        xk_scale = b_beta
    t = _unit_lower_inverse(a, C, BC, SQUARINGS, PREC).to(T.dtype.element_ty)
    tl.store(T + (i_c * H + i_h).to(tl.int64) * C * C + rows[:, None] * C + rows[None, :], t)
    t_lo = t.to(k.dtype.element_ty)
    if HOLD:
        _store_product(t_lo, chunk_k, xk_scale, w, tok, i_h, o_k, m_k, H, K, IEEE)
        _store_product(t_lo, chunk_v, b_beta, u, tok, i_h, o_v, m_v, H, V, IEEE)
    else:
        _product_tiles(t_lo, k, xk_scale, w, tok, m_t, i_h, H, K, BK, IEEE)
        _product_tiles(t_lo, v, b_beta, u, tok, m_t, i_h, H, V, BV, IEEE)


@triton.jit
def _store_product(t_lo, x, scale, out, tok, i_h, o_x, m_x, H: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr):
    """out = T (scale x) on one column tile ``o_x`` of the chunk's rows (width W)."""
    prod = _dot(t_lo, (x * scale[:, None]).to(x.dtype), IEEE)
    tl.store(out + (tok[:, None] * H + i_h) * W + o_x[None, :], prod.to(out.dtype.element_ty), mask=m_x)


@triton.jit
def _product_tiles(t_lo, x, scale, out, tok, m_t, i_h, H: tl.constexpr, W: tl.constexpr, BW: tl.constexpr,
                   IEEE: tl.constexpr):
    """out = T (scale x) over the chunk's rows, BW columns of x loaded at a time."""
    for i_w in range(tl.cdiv(W, BW)):
        o_x = i_w * BW + tl.arange(0, BW)
        m_x = m_t[:, None] & (o_x < W)[None, :]
        b_x = tl.load(x + (tok[:, None] * H + i_h) * W + o_x[None, :], mask=m_x, other=0.0)
        _store_product(t_lo, b_x, scale, out, tok, i_h, o_x, m_x, H, W, IEEE)


@triton.autotune(configs=WY, key=["K", "V", "C", "GATE"], restore_value=["dk"])
@triton.jit
def wy_bwd(k, v, beta, g, T_in, dw, du, dk, dv, dbeta, dg, cu_seqlens, chunk_indices,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
           BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr, IEEE: tl.constexpr):
    """dk, dv receive the WY part of the gradients (dk is added to what is there); dbeta, dg are written."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rows = tl.arange(0, C)
    tok = bos + i_t * C + rows
    m_t = tok < eos
    lower = rows[:, None] > rows[None, :]
    b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    if GATE:
        b_b = tl.load(g + tok * H + i_h, mask=m_t, other=0.0)
        gamma = tl.exp(tl.where(lower & m_t[:, None], b_b[:, None] - b_b[None, :], float("-inf")))
        xk_scale = b_beta * tl.exp(b_b)
    else:
        gamma = tl.where(lower, 1.0, 0.0)
        xk_scale = b_beta
    t = tl.load(T_in + (i_c * H + i_h).to(tl.int64) * C * C + rows[:, None] * C + rows[None, :]).to(tl.float32)
    t_lo = t.to(k.dtype.element_ty)
    d_t = tl.zeros([C, C], dtype=tl.float32)
    kk = tl.zeros([C, C], dtype=tl.float32)
    d_beta = tl.zeros([C], dtype=tl.float32)
    d_b = tl.zeros([C], dtype=tl.float32)
    # values: dX_v = T^T du;  dv = beta dX_v;  dbeta += sum(dX_v v);  dT += du X_v^T
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m, other=0.0)
        b_du = tl.load(du + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m, other=0.0)
        d_xv = _dot(tl.trans(t_lo), b_du, IEEE)
        tl.store(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], (d_xv * b_beta[:, None]).to(dv.dtype.element_ty),
                 mask=m)
        d_beta += tl.sum(d_xv * b_v.to(tl.float32), axis=1)
        d_t += _dot(b_du, tl.trans((b_v * b_beta[:, None]).to(b_v.dtype)), IEEE)
    # keys through X_k, and dT += dw X_k^T
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m, other=0.0)
        b_dw = tl.load(dw + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m, other=0.0)
        d_xk = _dot(tl.trans(t_lo), b_dw, IEEE)
        p_dk = dk + (tok[:, None] * H + i_h) * K + o_k[None, :]
        tl.store(p_dk, (tl.load(p_dk, mask=m, other=0.0).to(tl.float32) + d_xk * xk_scale[:, None])
                 .to(dk.dtype.element_ty), mask=m)
        dxk_k = tl.sum(d_xk * b_k.to(tl.float32), axis=1)           # sum_d dX_k k
        if GATE:
            d_beta += dxk_k * tl.exp(b_b)
            d_b += dxk_k * xk_scale
        else:
            d_beta += dxk_k
        d_t += _dot(b_dw, tl.trans((b_k * xk_scale[:, None]).to(b_k.dtype)), IEEE)
        kk += _dot(b_k, tl.trans(b_k), IEEE)
    # through T = (I + A)^-1:  dA = -T^T dT T^T (strictly lower)
    d_a = -_mm(_mm(tl.trans(t), d_t, PREC), tl.trans(t), PREC)
    d_a = tl.where(lower, d_a, 0.0)
    grad_kk = d_a * gamma                                             # dA_ij gamma_ij (per unit beta_i kk_ij)
    d_beta += tl.sum(grad_kk * kk, axis=1)
    if GATE:
        m_a = grad_kk * kk * b_beta[:, None]                          # dA * A
        d_b += tl.sum(m_a, axis=1) - tl.sum(m_a, axis=0)
    d_kk = (grad_kk * b_beta[:, None]).to(k.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m, other=0.0)
        d_k2 = _dot(d_kk, b_k, IEEE) + _dot(tl.trans(d_kk), b_k, IEEE)
        p_dk = dk + (tok[:, None] * H + i_h) * K + o_k[None, :]
        tl.store(p_dk, (tl.load(p_dk, mask=m, other=0.0).to(tl.float32) + d_k2).to(dk.dtype.element_ty), mask=m)
    tl.store(dbeta + tok * H + i_h, d_beta.to(dbeta.dtype.element_ty), mask=m_t)
    if GATE:
        # b = in-chunk cumsum of g, so dg_t = sum_{s >= t in chunk} db_s
        d_g = tl.sum(tl.where(rows[:, None] <= rows[None, :], d_b[None, :], 0.0), axis=1)
        tl.store(dg + tok * H + i_h, d_g, mask=m_t)


wy_fwd_tuned, wy_bwd_tuned = Autotuned(wy_fwd), Autotuned(wy_bwd)


def _precision(dtype):
    """fp32 math of the inverse: exact for fp32 inputs; tf32 otherwise (T is rounded to the input dtype anyway)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_wy_fwd(k, v, beta, g, tables, chunk_size):
    """k (T_total, H, K), v (T_total, H, V), beta, g (T_total, H) the in-chunk cumulative log-decay
    (``launch_chunk_cumsum``) or None. Returns w, u and T, all in k's dtype (T is rounded to it for w and u
    anyway; kept in bf16 it is half the bytes for the kernel that streams w and u and for the backward)."""
    t_total, heads, dk = k.shape
    dv = v.shape[-1]
    w, u = torch.empty_like(k), torch.empty_like(v)
    t_mat = k.new_empty(tables.n_chunks, heads, chunk_size, chunk_size)
    bk, bv = block_sizes(dk, dv)
    grid = (tables.n_chunks, heads)
    meta = dict(H=heads, K=dk, V=dv, C=chunk_size, BC=SUB, SQUARINGS=max((chunk_size // SUB).bit_length() - 2, 0),
                BK=bk, BV=bv, KP=max(16, triton.next_power_of_2(dk)), VP=max(16, triton.next_power_of_2(dv)),
                GATE=g is not None, PREC=_precision(k.dtype), IEEE=k.dtype == torch.float32)
    wy_fwd_tuned[grid](k, v, beta, g, t_mat, w, u, tables.cu, tables.chunk_indices, **meta)
    return w, u, t_mat


def launch_wy_bwd(k, v, beta, g, t_mat, dw, du, dk, tables, chunk_size):
    """Adds the WY part to dk (in place); returns dv, dbeta, dg (None without gating). g cumulative, as in
    ``launch_wy_fwd``; dg is the gradient of the raw log-decay."""
    t_total, heads, dk_ = k.shape
    dv_ = v.shape[-1]
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g) if g is not None else None
    bk, bv = block_sizes(dk_, dv_)
    wy_bwd_tuned[(tables.n_chunks, heads)](k, v, beta, g, t_mat, dw, du, dk, dv, dbeta, dg, tables.cu,
                                           tables.chunk_indices, H=heads, K=dk_, V=dv_, C=chunk_size, BK=bk, BV=bv,
                                           GATE=g is not None, PREC=_precision(k.dtype),
                                           IEEE=k.dtype == torch.float32)
    return dv, dbeta, dg

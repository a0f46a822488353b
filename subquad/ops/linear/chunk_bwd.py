"""Triton backward kernels of the chunked engine (layout and ``GATE`` / ``DELTA`` switches as in chunk_fwd).
``g`` is the in-chunk cumulative log-decay, as in the forward: every kernel of both passes reads the same sums,
so ``e^{b_last - b}`` is exactly 1 at a chunk's last token and the log-decay gradient's cancelling terms cancel.
(Sums of one chunk taken in different orders differ by an ulp of ``|b|``: at decays of -40 a token that moved
dlog_decay by 1e-3 on the H100 when the forward read chunk_cumsum and these kernels summed for themselves.)

With ``h_c`` the state at the start of chunk c and ``dh_c`` the gradient of the state at its *end*:
1. ``state_bwd`` walks chunks in reverse: ``dS <- e^{b_last} dS + scale (q e^b)^T do`` (delta rule: also
   ``- w^T dv_new``, where ``dv_new = dv_local + (k e^{b_last - b}) dS`` is completed here), and stores
   ``dh_c`` per chunk and ``d initial_state``.
2. ``dv_bwd`` per (chunk, head, V block): ``dv = (decayed causal scale q k^T)^T do [+ (k e^{b_last - b}) dh_c]``.
3. ``dqk_bwd`` per (chunk, head, K block): ``dq``, ``dk`` (and the delta rule's ``dw = -dv_new h_c^T``), plus
   ``q . dq - k . dk`` per token, from which the log-decay gradient is a reverse cumulative sum.
With ``GATE == 2`` (a decay per key dimension) the intra-chunk parts come from chunk_intra: ``dv_bwd`` reads the
forward scores ``A`` and ``dqk_bwd`` stores the score gradients ``dA`` (without decay) for it. ``GATE == 3`` (a
constant per head, ``g`` the ``(H,)`` log-decays) serves a backward that needs no decay gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import _decays, _dot
from .chunk_split import compose
from .tuning import COLUMNS, STATE, TILES


@triton.autotune(configs=STATE,
                 key=["K", "V", "C", "BK", "GATE", "DELTA", "STORE_DH", "SPLIT", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def state_bwd(q, k, w, do, dv, dv_new, g, dh, dh0, dht, local, trans, seg_seq, seg_first, cu_seqlens,
              chunk_offsets, scale, pid_offset, SEQS, CHUNKS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
              HAS_DHT: tl.constexpr, STORE_DH: tl.constexpr, STORE_DH0: tl.constexpr, SPLIT: tl.constexpr,
              IEEE: tl.constexpr):
    """DELTA (BK == K): ``dv`` holds the local (intra-chunk) value gradients; ``dv_new`` receives the full ones.
    Without STORE_DH only d initial_state is kept, no dh nor dv_new (a segment's own, ``local``, in chunk_split's
    terms). SPLIT: the sequences are segments, each starting from the gradient composed from the segments after
    it (through ``trans``, the delta rule's segment transitions); the first segment of a sequence stores its d
    initial_state. ``pid_offset``: the sequences of the launches before this one (``grid.launch_split``)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H + pid_offset, i_nh % H        # (pid_offset: as state_fwd's)
    # the row of dht and dh0 (the sequence's) in int64, once: N x H states of K x V pass 2^31 elements (32k
    # sequence-heads of 256 x 256); the tile's offsets inside a state stay int32
    row = (i_nh + pid_offset * H).to(tl.int64)
    if SPLIT:
        i_seq = tl.load(seg_seq + i_n)
        row = i_seq.to(tl.int64) * H + i_h
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht + row * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
    if SPLIT:
        d_state = compose(d_state, local, trans, g, cu_seqlens, i_n + 1, tl.load(seg_first + i_seq + 1), i_h, o_k,
                          m_k, o_v, m_v, H, K, V, C, BK, GATE, DELTA, True, IEEE)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        tok = bos + i_t * C + tl.arange(0, C)
        m_t = tok < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        if STORE_DH:
            tl.store(dh + ((c0 + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                     d_state.to(dh.dtype.element_ty), mask=m_kv)
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        last = tl.minimum(bos + i_t * C + C, eos) - 1
        if GATE != 0:
            b_b, b_last = _decays(g, tok, bos + i_t * C, last, m_t, o_k, m_k, i_h, H, K, GATE)
        if GATE == 1 or GATE == 3:
            b_q = (b_q * (scale * tl.exp(b_b))[:, None]).to(b_do.dtype)
        elif GATE == 2:
            b_q = (b_q * scale * tl.exp(b_b)).to(b_do.dtype)
        else:
            b_q = (b_q * scale).to(b_do.dtype)
        if DELTA:
            b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
            if GATE == 1:
                b_k = (b_k * tl.exp(b_last - b_b)[:, None]).to(b_do.dtype)
            b_dvn = tl.load(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_dvn += _dot(b_k, d_state.to(b_k.dtype), IEEE)
            if STORE_DH:
                tl.store(dv_new + (tok[:, None] * H + i_h) * V + o_v[None, :], b_dvn.to(dv_new.dtype.element_ty),
                         mask=m_tv)
            b_w = tl.load(w + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        if GATE == 1 or GATE == 3:
            d_state *= tl.exp(b_last)
        if GATE == 2:
            d_state *= tl.exp(b_last)[:, None]
        d_state += _dot(tl.trans(b_q), b_do, IEEE)
        if DELTA:
            d_state -= _dot(tl.trans(b_w), b_dvn.to(b_w.dtype), IEEE)
    if STORE_DH0 and (not SPLIT or i_n == tl.load(seg_first + i_seq)):
        tl.store(dh0 + row * K * V + o_k[:, None] * V + o_v[None, :], d_state, mask=m_kv)


@triton.autotune(configs=TILES, key=["K", "V", "C", "GATE", "USE_DH", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def dv_bwd(q, k, g, A, do, dh, dv, cu_seqlens, chunk_indices, scale, pid_offset, SEQS, CHUNKS,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           GATE: tl.constexpr, USE_DH: tl.constexpr, IEEE: tl.constexpr):
    """``pid_offset``: the chunks of the launches before this one (``grid.launch_split``)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1) + pid_offset, tl.program_id(2)
    i_c = i_c.to(tl.uint32)     # (as output_fwd's)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    tok = bos + i_t * C + tl.arange(0, C)
    m_t = tok < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    last = tl.minimum(bos + i_t * C + C, eos) - 1
    if GATE == 1 or GATE == 3:
        b_b, b_last = _decays(g, tok, bos + i_t * C, last, m_t, None, None, i_h, H, K, GATE)
    scores_t = tl.zeros([C, C], dtype=tl.float32)     # (key j, query i)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        if GATE != 2:
            scores_t += _dot(b_k, tl.trans(b_q), IEEE)
        if USE_DH:
            b_dh = tl.load(dh + (i_c * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                           mask=m_k[:, None] & m_v[None, :], other=0.0)
            if GATE == 1 or GATE == 3:
                b_k = (b_k * tl.exp(b_last - b_b)[:, None]).to(b_q.dtype)
            if GATE == 2:
                b_bk, b_lastk = _decays(g, tok, bos + i_t * C, last, m_t, o_k, m_k, i_h, H, K, GATE)
                b_k = (b_k * tl.exp(b_lastk[None, :] - b_bk)).to(b_q.dtype)
            acc += _dot(b_k, b_dh.to(b_k.dtype), IEEE)
    rows = tl.arange(0, C)
    keep = rows[:, None] <= rows[None, :]             # key j <= query i
    if GATE == 2:                                     # A holds scale-free decayed scores (query i, key j)
        scores_t = tl.load(A + (i_c * H + i_h).to(tl.int64) * C * C + rows[None, :] * C + rows[:, None])
    elif GATE == 1 or GATE == 3:
        scores_t *= tl.exp(tl.where(keep & m_t[None, :], b_b[None, :] - b_b[:, None], float("-inf")))
    else:
        scores_t = tl.where(keep, scores_t, 0.0)
    b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc += _dot((scores_t * scale).to(b_do.dtype), b_do, IEEE)
    tl.store(dv + (tok[:, None] * H + i_h) * V + o_v[None, :], acc.to(dv.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=COLUMNS, key=["K", "V", "C", "BK", "GATE", "DELTA", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def dqk_bwd(q, k, v, g, h, do, dh, dv_new, u, dq, dk, dw, db, dA, dvu, cu_seqlens, chunk_indices, scale,
            pid_offset, SEQS, CHUNKS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, IEEE: tl.constexpr):
    """``db`` (T_total, H, n K blocks) fp32 receives ``sum_k q dq - k dk`` over this K block (GATE == 1).
    GATE == 2: only the inter-chunk parts of dq, dk; ``dA`` (n_chunks, H, C, C) fp32 gets the causal
    ``scale * do v^T`` (written by the K-block-0 programs) for chunk_intra.
    DELTA: also ``dvu`` (T_total, H) fp32 = ``sum_v dv_new (v_new - u)`` per token (for the decay gradient).
    ``pid_offset``: the chunks of the launches before this one (``grid.launch_split``)."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1) + pid_offset, tl.program_id(2)
    i_c = i_c.to(tl.uint32)     # (as output_fwd's)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    tok = bos + i_t * C + tl.arange(0, C)
    m_t = tok < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    d_scores = tl.zeros([C, C], dtype=tl.float32)
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    b_dw = tl.zeros([C, BK], dtype=tl.float32)
    b_dvu = tl.zeros([C], dtype=tl.float32)
    h_base = h + (i_c * H + i_h).to(tl.int64) * K * V
    dh_base = dh + (i_c * H + i_h).to(tl.int64) * K * V
    # loads the loop does not need, issued before it so that their latency overlaps the loop's (4 x 8k, H100:
    # SSD 556 -> 520 us, GLA 527 -> 511); the delta rule's loop holds more (dv_new, u, dw), and q, k held
    # across it cost more than they saved (868 -> 904), so it loads them after
    if not DELTA:
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    last = tl.minimum(bos + i_t * C + C, eos) - 1
    if GATE != 0:
        b_b, b_last = _decays(g, tok, bos + i_t * C, last, m_t, o_k, m_k, i_h, H, K, GATE)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dh = tl.load(dh_base + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        d_scores += _dot(b_do, tl.trans(b_v), IEEE)
        b_dq += _dot(b_do, tl.trans(b_h.to(b_do.dtype)), IEEE)
        b_dk += _dot(b_v, tl.trans(b_dh.to(b_v.dtype)), IEEE)
        if DELTA:
            b_dvn = tl.load(dv_new + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
            b_dw -= _dot(b_dvn, tl.trans(b_h.to(b_dvn.dtype)), IEEE)
            if GATE == 1:
                b_u = tl.load(u + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
                b_dvu += tl.sum(b_dvn.to(tl.float32) * (b_v.to(tl.float32) - b_u.to(tl.float32)), axis=1)
    if DELTA:
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    if GATE == 1 or GATE == 3:
        b_dq *= (scale * tl.exp(b_b))[:, None]
        b_dk *= tl.exp(b_last - b_b)[:, None]
        d_scores *= scale * tl.exp(tl.where(causal & m_t[:, None], b_b[:, None] - b_b[None, :], float("-inf")))
    elif GATE == 2:
        b_dq *= scale * tl.exp(b_b)
        b_dk *= tl.exp(b_last[None, :] - b_b)
        d_scores = tl.where(causal, d_scores * scale, 0.0)
        if i_k == 0:
            tl.store(dA + (i_c * H + i_h).to(tl.int64) * C * C + rows[:, None] * C + rows[None, :], d_scores)
    else:
        b_dq *= scale
        d_scores = tl.where(causal, d_scores * scale, 0.0)
    if GATE != 2:
        d_scores = d_scores.to(b_q.dtype)
        b_dq += _dot(d_scores, b_k, IEEE)
        b_dk += _dot(tl.trans(d_scores), b_q, IEEE)
    tl.store(dq + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if DELTA:
        tl.store(dw + (tok[:, None] * H + i_h) * K + o_k[None, :], b_dw.to(dw.dtype.element_ty), mask=m_tk)
        if GATE == 1:
            tl.store(dvu + tok * H + i_h, b_dvu, mask=m_t & (tok * 0 + i_k == 0))
    if GATE == 1:
        n_kb = tl.cdiv(K, BK)
        part = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, axis=1)
        tl.store(db + (tok * H + i_h) * n_kb + i_k, part, mask=m_t)

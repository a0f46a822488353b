"""Triton forward kernels of the chunked engine (shared by the delta rule through the ``DELTA`` switch).

Layout: q, k ``(T_total, H, K)``, v ``(T_total, H, V)`` (batches flattened into packed sequences, so one code
path serves ``cu_seqlens``), ``g`` fp32, the log-decay summed inside each chunk up to and including the token
(``chunk_intra.chunk_cumsum``; fla's chunk_local_cumsum): ``(T_total, H)`` for ``GATE == 1`` (scalar per
token), ``(T_total, H, K)`` for ``GATE == 2`` (per key dimension; the intra-chunk scores then come precomputed
from chunk_intra, ``A`` ``(n_chunks, H, C, C)``). Summed once beforehand rather than in each kernel: in the
state pass a scan across the chunk is two CTA-wide reductions on the serial chain of every chunk. ``GATE == 3``: a
constant per head (RetNet), ``g`` the ``(H,)`` log-decays themselves (the backward too, unless the decay takes a
gradient); the chunk's decays are then arithmetic, read from nothing, and the fused walk computes its chunk decay
pattern once.
``chunk_offsets[n]`` is the first global chunk of sequence n; ``chunk_indices[c] = (n, chunk within n)``.

Two passes, as in flash-linear-attention's chunk form:
1. ``state_fwd``: one program per (sequence, head, K block, V block) walks the chunks in order, storing the state
   at the start of each chunk (``h``) and keeping the running state in fp32 registers.
2. ``output_fwd``: one program per (chunk, head, V block), fully parallel:
   ``o = scale * (q * e^b) h + (decayed causal q k^T) v``.

or both in one (``fused_fwd``, fla's fused_chunk): one program per (sequence, head, V block) walks the chunks,
computing each chunk's output from the state in registers, so ``h`` (as many bytes as q, k and v together at
D = 128, C = 64) is neither written nor read back. It has as many programs as the state pass alone, so it pays
where sequences times heads fill the GPU (``chunk.fused_forward``); where they do not, ``chunk_split`` cuts the
sequences into segments, and the walks (these two kernels' and the backward's ``state_bwd``) run on the segments
under the ``SPLIT`` switch, each program composing its incoming state from the segments before it.
Decays use ``b``, the cumulative log-decay inside the chunk; every exponent is ``b_i - b_j`` with i at or after j
(or ``b_i`` itself), so it is <= 0 and nothing overflows for decays near 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_split import compose
from .tuning import FUSED, STATE, TILES


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _decays(g, tok, first, last, m_t, o_k, m_k, i_h, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """The chunk rows' cumulative log-decays and the last row's: ``(C,)`` and a scalar for GATE 1 and 3, ``(C, BK)``
    and ``(BK,)`` (the key block ``o_k``) for GATE 2. GATE 3 (the constant ``g[i_h]``) reads nothing more: the
    sums follow from the rows' places in the chunk that starts at token ``first``. Rows past ``last`` (a short
    chunk) get the last row's sum, so that ``b_last - b_i`` stays <= 0 as GATE 1's zeros keep it: counted on, it
    overflows exp for a strong decay, and inf times their zero values is a NaN state."""
    if GATE == 3:
        lg = tl.load(g + i_h)
        b_b = (tl.minimum(tok, last) - first + 1).to(tl.float32) * lg
        b_last = (last - first + 1).to(tl.float32) * lg
    elif GATE == 1:
        b_b = tl.load(g + tok * H + i_h, mask=m_t, other=0.0)
        b_last = tl.load(g + last * H + i_h)
    else:
        b_b = tl.load(g + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_last = tl.load(g + (last * H + i_h) * K + o_k, mask=m_k, other=0.0)
    return b_b, b_last


@triton.autotune(configs=STATE,
                 key=["K", "V", "C", "BK", "GATE", "DELTA", "STORE_H", "SPLIT", "TRANSITION", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def state_fwd(k, v, g, h, h0, ht, w, v_new, local, trans, seg_seq, seg_first, cu_seqlens, chunk_offsets, pid_offset,
              SEQS, CHUNKS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
              STORE_H: tl.constexpr, STORE_HT: tl.constexpr, SPLIT: tl.constexpr, TRANSITION: tl.constexpr,
              IEEE: tl.constexpr):
    """DELTA: ``v`` holds u, and the corrected values ``v_new = u - w S`` (needs BK == K) are stored and used.
    Without STORE_H only the final state is kept, no h nor v_new (a segment's own, ``local``, in chunk_split's
    terms). SPLIT: the sequences are segments (``chunk_split``), each starting from the segments before it
    (through ``trans``, the delta rule's segment transitions). TRANSITION (DELTA, V == K, no v): the walk
    starts from the identity with zero values, so its final state is the sequence's transition matrix.
    ``pid_offset``: the sequences of the launches before this one (``grid.launch_split``)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # pid_offset counts sequences: the head, i_nh % H, in every address of the loop, stays the program id's
    # alone, whose range the compiler knows (with the offset added to i_nh instead, fused_fwd's loop for GLA went
    # from 1,254 to 1,275 instructions, 24 of them spill loads: Triton 3.6, sm90)
    i_n, i_h = i_nh // H + pid_offset, i_nh % H
    # the row of h0 and ht (the sequence's) in int64, once: N x H states of K x V pass 2^31 elements (32k
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
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if TRANSITION:
        state = tl.where(o_k[:, None] == o_v[None, :], 1.0, 0.0)
    if HAS_H0:
        state += tl.load(h0 + row * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    if SPLIT:
        state = compose(state, local, trans, g, cu_seqlens, tl.load(seg_first + i_seq), i_n, i_h, o_k, m_k, o_v,
                        m_v, H, K, V, C, BK, GATE, DELTA, False, IEEE)
    for i_t in range(n_chunks):
        tok = bos + i_t * C + tl.arange(0, C)
        m_t = tok < eos
        if STORE_H:
            tl.store(h + ((c0 + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                     state.to(h.dtype.element_ty), mask=m_kv)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        if not TRANSITION:
            b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                          other=0.0)
        if DELTA:
            b_w = tl.load(w + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0)
            b_vn = -_dot(b_w, state.to(b_w.dtype), IEEE)
            if not TRANSITION:
                b_vn += b_v.to(tl.float32)
            if STORE_H:
                tl.store(v_new + (tok[:, None] * H + i_h) * V + o_v[None, :], b_vn.to(v_new.dtype.element_ty),
                         mask=m_t[:, None] & m_v[None, :])
            b_v = b_vn.to(b_k.dtype)
        last = tl.minimum(bos + i_t * C + C, eos) - 1
        if GATE != 0:
            b_b, b_last = _decays(g, tok, bos + i_t * C, last, m_t, o_k, m_k, i_h, H, K, GATE)
        if GATE == 1 or GATE == 3:
            state *= tl.exp(b_last)
            b_k = (b_k * tl.exp(b_last - b_b)[:, None]).to(b_v.dtype)
        if GATE == 2:
            state *= tl.exp(b_last)[:, None]
            b_k = (b_k * tl.exp(b_last[None, :] - b_b)).to(b_v.dtype)
        state += _dot(tl.trans(b_k), b_v, IEEE)
    # (over segments, the sequence's last one stores its final state)
    if STORE_HT and (not SPLIT or i_n == tl.load(seg_first + i_seq + 1) - 1):
        tl.store(ht + row * K * V + o_k[:, None] * V + o_v[None, :], state, mask=m_kv)


@triton.autotune(configs=TILES, key=["K", "V", "C", "GATE", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def output_fwd(q, k, v, g, h, A, o, cu_seqlens, chunk_indices, scale, pid_offset, SEQS, CHUNKS,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, GATE: tl.constexpr, IEEE: tl.constexpr):
    """``pid_offset``: the chunks of the launches before this one (``grid.launch_split``)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1) + pid_offset, tl.program_id(2)
    # unsigned: the program id was known non-negative, so the chunk's offsets were widened unsigned; the sum with
    # the offset, signed, would be sign-extended (the delta rule's dqk_bwd prologue and loop changed: Triton 3.6, sm90)
    i_c = i_c.to(tl.uint32)
    i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
    i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    tok = bos + i_t * C + tl.arange(0, C)
    m_t = tok < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    acc = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    h_base = h + (i_c * H + i_h).to(tl.int64) * K * V
    if GATE == 1:
        # issued before the loop so that its memory latency overlaps the loop's loads instead of following them
        b_b = tl.load(g + tok * H + i_h, mask=m_t, other=0.0)
    if GATE == 3:
        b_b, _ = _decays(g, tok, bos + i_t * C, eos, m_t, None, None, i_h, H, K, GATE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_h = tl.load(h_base + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        if GATE == 2:
            b_g = tl.load(g + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0)
            acc += _dot((b_q * tl.exp(b_g)).to(b_q.dtype), b_h.to(b_q.dtype), IEEE)
        else:
            acc += _dot(b_q, b_h.to(b_q.dtype), IEEE)
            scores += _dot(b_q, tl.trans(b_k), IEEE)
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    if GATE == 2:
        scores = tl.load(A + (i_c * H + i_h).to(tl.int64) * C * C + rows[:, None] * C + rows[None, :])
    elif GATE == 1 or GATE == 3:
        acc *= tl.exp(b_b)[:, None]
        # rows past the sequence's end (b = 0) would overflow against far-decayed columns: never stored, but kept finite
        scores *= tl.exp(tl.where(causal & m_t[:, None], b_b[:, None] - b_b[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc += _dot(scores.to(b_v.dtype), b_v, IEEE)
    tl.store(o + (tok[:, None] * H + i_h) * V + o_v[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=FUSED, key=["K", "V", "C", "GATE", "DELTA", "SPLIT", "SEQS", "CHUNKS"])
@triton.jit(do_not_specialize=["pid_offset"])
def fused_fwd(q, k, v, g, A, w, o, h0, ht, local, trans, seg_seq, seg_first, cu_seqlens, chunk_offsets, scale,
              pid_offset, SEQS, CHUNKS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, HAS_H0: tl.constexpr,
              SPLIT: tl.constexpr, IEEE: tl.constexpr):
    """state_fwd and output_fwd in one walk over the chunks (needs BK >= K): the chunk's output takes the state
    before the chunk, then the chunk's keys and values are added to it. DELTA: as state_fwd's (``v`` holds u;
    the corrected values are used, not stored: the backward recomputes them). SPLIT, pid_offset: as state_fwd's."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H + pid_offset, i_nh % H        # (pid_offset: as state_fwd's)
    row = (i_nh + pid_offset * H).to(tl.int64)         # (int64: as state_fwd's)
    if SPLIT:
        i_seq = tl.load(seg_seq + i_n)
        row = i_seq.to(tl.int64) * H + i_h
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, C)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + row * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
    if SPLIT:
        state = compose(state, local, trans, g, cu_seqlens, tl.load(seg_first + i_seq), i_n, i_h, o_k, m_k, o_v,
                        m_v, H, K, V, C, BK, GATE, DELTA, False, IEEE)
    # The decays and A feed no tl.dot, so Triton's pipeliner leaves their loads where they are: on the serial
    # chain of every chunk, a memory latency each. They are loaded one chunk ahead instead.
    if GATE == 3:
        # the same in every chunk (rows past a sequence's end included: never stored, and finite, as b_i - b_j
        # <= 0 for i >= j)
        b_b, _ = _decays(g, bos + rows, bos, bos + C - 1, None, o_k, m_k, i_h, H, K, GATE)
        row_decays = tl.exp(b_b)
        score_decays = tl.exp(tl.where(causal, b_b[:, None] - b_b[None, :], float("-inf")))
    if GATE == 1 or GATE == 2:
        # (an empty sequence reads a row that exists and uses none of it)
        next_b, next_last = _decays(g, bos + rows, bos, tl.maximum(tl.minimum(bos + C, eos) - 1, 0),
                                    bos + rows < eos, o_k, m_k, i_h, H, K, GATE)
    if GATE == 2:
        a_rows = rows[:, None] * C + rows[None, :]
        next_a = tl.load(A + (c0 * H + i_h) * C * C + a_rows, mask=a_rows < tl.where(n_chunks > 0, C * C, 0),
                         other=0.0)
    for i_t in range(n_chunks):
        tok = bos + i_t * C + rows
        m_t = tok < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
        b_v = tl.load(v + (tok[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        if GATE == 3:
            b_b, b_last = _decays(g, tok, bos + i_t * C, tl.minimum(bos + i_t * C + C, eos) - 1, m_t, o_k, m_k, i_h,
                                  H, K, GATE)
        elif GATE != 0:
            b_b, b_last = next_b, next_last
            next_b, next_last = _decays(g, tok + C, bos + i_t * C + C,
                                        tl.minimum(bos + i_t * C + 2 * C, eos) - 1, tok + C < eos, o_k, m_k, i_h, H,
                                        K, GATE)
        if GATE == 2:
            scores = next_a
            next_a = tl.load(A + ((c0 + i_t + 1) * H + i_h) * C * C + a_rows,
                             mask=a_rows < tl.where(i_t + 1 < n_chunks, C * C, 0), other=0.0)
        if DELTA:
            b_w = tl.load(w + (tok[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
            b_v = (b_v.to(tl.float32) - _dot(b_w, state.to(b_w.dtype), IEEE)).to(b_k.dtype)
        # b_u: the values as the state takes them (a scalar decay goes on the values, the smaller tile, so that
        # k goes to both products as loaded)
        b_u = b_v
        if GATE == 2:
            acc = _dot((b_q * tl.exp(b_b)).to(b_q.dtype), state.to(b_q.dtype), IEEE)
            b_k = (b_k * tl.exp(b_last[None, :] - b_b)).to(b_v.dtype)
            state *= tl.exp(b_last)[:, None]
        else:
            scores = _dot(b_q, tl.trans(b_k), IEEE)
            acc = _dot(b_q, state.to(b_q.dtype), IEEE)
            if GATE == 3:
                acc *= row_decays[:, None]
                scores *= score_decays
            if GATE == 1:
                acc *= tl.exp(b_b)[:, None]
                # rows past the sequence's end (b = 0) kept finite against far-decayed columns (never stored)
                scores *= tl.exp(tl.where(causal & m_t[:, None], b_b[:, None] - b_b[None, :], float("-inf")))
            if GATE == 1 or GATE == 3:
                b_u = (b_v * tl.exp(b_last - b_b)[:, None]).to(b_v.dtype)
                state *= tl.exp(b_last)
            else:
                scores = tl.where(causal, scores, 0.0)
        acc += _dot(scores.to(b_v.dtype), b_v, IEEE)
        tl.store(o + (tok[:, None] * H + i_h) * V + o_v[None, :], (acc * scale).to(o.dtype.element_ty), mask=m_tv)
        state += _dot(tl.trans(b_k), b_u, IEEE)
    if not SPLIT or i_n == tl.load(seg_first + i_seq + 1) - 1:
        tl.store(ht + row * K * V + o_k[:, None] * V + o_v[None, :], state, mask=m_kv)

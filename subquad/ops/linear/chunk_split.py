"""Sequence-parallel state passes: long sequences cut into segments when sequences x heads are too few to fill
the GPU.

The state walks (the forward's state pass or fused kernel, the backward's reverse walk) are serial along a
sequence, one program per (sequence, head, value tile): at one sequence of 32k tokens and 16 heads that is 32
programs for 132 SMs, each walking 512 chunks. The recurrence is affine in the state, ``S_end = e^{D} S_start +
L`` over a segment (``D`` the segment's summed log-decay, ``L`` its state from zero), so:

1. every segment's ``L`` is computed at once, from a zero state, with nothing stored per chunk;
2. the usual walk runs on all segments at once, each program first composing the segments before it in its
   sequence (``compose``: a few tiles read) into its incoming state; the last segment of a sequence stores the
   final state.

Composing in the walk rather than in a pass of its own saves a launch and two allocations per walk: the first
version had a scan kernel between the passes, and at 1 x 8k its four-launch forward took 211-237 us per call for
120 us of kernels (H200, ``2026-12-03-linear-split-profile-1x8192-fwd-h200.json``); at 1 x 32k (~0.3 ms of
kernels) some of its timed rounds were host-bound (``2026-12-03-linear-suite-1x32768-h200.json``).

The backward's reverse walk splits the same way (``L`` is then a segment's own d initial_state, composed from the
sequence's end; the first segment stores d initial_state). Segments are whole chunks, so chunk ``c`` is the same
tokens under the segment tables as under the sequence ones: kernels indexed by chunk take either.

The delta rule's recurrence is affine too, ``S_end = M S_start + L``, but its transition ``M`` over a segment is
a K x K matrix, the product of the chunks' ``e^{g} I - k~^T w``. Each value column of the state evolves on its own,
so ``M`` is the walk's final state from the identity with no values (``state_fwd``'s ``TRANSITION``): one more
pass of the local kind, V = K wide. The reverse walk composes with ``M^T``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..grid import cdiv

# Programs of the fused walk (sequences x heads x 64-wide value tiles) below which sequences are cut, and the
# count aimed at (two per SM on the H100), with segments of at least SPLIT_MIN_CHUNKS chunks and at most
# SPLIT_MAX_SEGMENTS per sequence (the last segment's program composes all the others before its walk: the
# prologues grow as the square of the segments).
SPLIT_BELOW_PROGRAMS = 128
SPLIT_TARGET_PROGRAMS = 256
SPLIT_MIN_CHUNKS = 16
SPLIT_MAX_SEGMENTS = 32


class SegmentSplit:
    """``tables``: ChunkTables whose sequences are the segments (``segment_chunks`` chunks each, the last of a
    sequence shorter); ``first`` (N+1) int32, the first segment of each sequence (one of length 0 has none);
    ``seq`` (n_segs) int32, the sequence of each segment."""

    def __init__(self, lengths: tuple[int, ...], chunk_size: int, segment_chunks: int, device):
        from .chunk import ChunkTables

        span = segment_chunks * chunk_size
        bounds, first = [0], [0]
        for n in lengths:
            start = bounds[-1]
            bounds += [start + min(cut, n) for cut in range(span, n + span, span)]
            first.append(len(bounds) - 1)
        self.n_segs, self.n_seqs = len(bounds) - 1, len(lengths)
        self.has_empty = 0 in lengths
        self.tables = ChunkTables(torch.tensor(bounds, dtype=torch.int32), 1, 0, chunk_size, device)
        self.first = torch.tensor(first, dtype=torch.int32, device=device)
        self.seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(first).diff()).to(
            device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _segments(lengths: tuple[int, ...], chunk_size: int, segment_chunks: int, device) -> SegmentSplit:
    return SegmentSplit(lengths, chunk_size, segment_chunks, device)


def segment_split(tables, heads: int, dk: int, dv: int) -> SegmentSplit | None:
    """The segments to run the state walks on, or None where the sequences fill the GPU or are too short to
    cut. Only with K <= 128, where the forward's walk is the fused kernel (the state whole in registers)."""
    programs = tables.n_seqs * heads * cdiv(dv, 64)
    if dk > 128 or programs >= SPLIT_BELOW_PROGRAMS:
        return None
    longest = cdiv(max(tables.lengths, default=0), tables.chunk_size)
    segment_chunks = max(SPLIT_MIN_CHUNKS, cdiv(tables.n_chunks * heads * cdiv(dv, 64), SPLIT_TARGET_PROGRAMS),
                         cdiv(longest, SPLIT_MAX_SEGMENTS))
    if longest <= segment_chunks:
        return None
    return _segments(tuple(tables.lengths), tables.chunk_size, segment_chunks, tables.cu.device)


@triton.jit
def compose(state, local, trans, g, seg_cu, lo, hi, i_h, o_k, m_k, o_v, m_v, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
            REVERSE: tl.constexpr, IEEE: tl.constexpr):
    """``state <- T_s state + local[s]`` for the segments s in [lo, hi), in order (from hi - 1 down if
    REVERSE): from the sequence's initial state, the state entering segment hi; from its final-state gradient,
    the gradient leaving segment lo - 1. ``T_s`` is ``e^{D_s}``, with ``D_s`` the segment's log-decay, the sum
    of its chunks' in-chunk cumulative log-decays ``g`` at their last tokens (its length times ``g[i_h]`` for a
    constant decay, GATE 3); for the delta rule it is the
    matrix ``trans[s]`` (transposed if REVERSE), which holds the decays already."""
    tile = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    for i in range(hi - lo):
        s = (hi - 1 - i) if REVERSE else (lo + i)
        if DELTA:
            at = trans + (s * H + i_h).to(tl.int64) * K * K
            if REVERSE:
                m = tl.load(at + o_k[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_k[None, :], other=0.0)
            else:
                m = tl.load(at + o_k[:, None] * K + o_k[None, :], mask=m_k[:, None] & m_k[None, :], other=0.0)
            # the whole state goes through this product, once per earlier segment: tf32 alone would round it
            # to 11 bits each time
            state = tl.dot(m, state, input_precision="ieee" if IEEE else "tf32x3")
        elif GATE == 3:
            state *= tl.exp((tl.load(seg_cu + s + 1) - tl.load(seg_cu + s)).to(tl.float32) * tl.load(g + i_h))
        elif GATE != 0:
            bos = tl.load(seg_cu + s).to(tl.int64)
            eos = tl.load(seg_cu + s + 1).to(tl.int64)
            if GATE == 1:
                total = tl.zeros([16], dtype=tl.float32)
            else:
                total = tl.zeros([16, BK], dtype=tl.float32)
            for c in range(0, tl.cdiv(eos - bos, C), 16):
                o_c = c + tl.arange(0, 16)
                last = tl.minimum(bos + o_c * C + C, eos) - 1
                m_c = bos + o_c * C < eos
                if GATE == 1:
                    total += tl.load(g + last * H + i_h, mask=m_c, other=0.0)
                else:
                    total += tl.load(g + (last[:, None] * H + i_h) * K + o_k[None, :],
                                     mask=m_c[:, None] & m_k[None, :], other=0.0)
            if GATE == 1:
                state *= tl.exp(tl.sum(total, axis=0))
            else:
                state *= tl.exp(tl.sum(total, axis=0))[:, None]
        state += tl.load(local + (s * H + i_h).to(tl.int64) * K * V + tile, mask=m_kv, other=0.0)
    return state


def final_states(like, split, heads: int, dk: int, dv: int, start):
    """The per-sequence output of a walk over segments (final states, or d initial_state): written by each
    sequence's last (first) segment; a sequence of length 0 has none and keeps ``start`` (or zeros)."""
    if not split.has_empty:
        return like.new_empty(split.n_seqs, heads, dk, dv, dtype=torch.float32)
    if start is None:
        return like.new_zeros(split.n_seqs, heads, dk, dv, dtype=torch.float32)
    return start.float().clone()

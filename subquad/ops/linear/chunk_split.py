"""Sequence-parallel state passes: long sequences cut into segments when sequences x heads are too few to fill
the GPU.

The state walks (the forward's state pass or fused kernel, the backward's reverse walk) are serial along a
sequence, one program per (sequence, head, value tile): at one sequence of 32k tokens and 16 heads that is 32
programs for 132 SMs, each walking 512 chunks. The recurrence is affine in the state, ``S_end = e^{D} S_start +
L`` over a segment (``D`` the segment's summed log-decay, ``L`` its state from zero), so:

1. every segment's ``L`` is computed at once, from a zero state, with nothing stored per chunk;
2. ``segment_scan`` composes them along each sequence (a few segments: one small program per tile), giving every
   segment's incoming state and the sequence's final one;
3. the usual walk runs on all segments at once, each from its incoming state.

The backward's reverse walk splits the same way (``L`` is then a segment's own d initial_state, the scan runs
from the end). Segments are whole chunks, so chunk ``c`` is the same tokens under the segment tables as under the
sequence ones: kernels indexed by chunk take either. The delta rule's transition ``I - beta k k^T`` is a matrix,
not a decay, and is not split.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..grid import cdiv

# Programs of the fused walk (sequences x heads x 64-wide value tiles) below which sequences are cut, and the
# count aimed at (two per SM on the H100), with segments of at least SPLIT_MIN_CHUNKS chunks.
SPLIT_BELOW_PROGRAMS = 128
SPLIT_TARGET_PROGRAMS = 256
SPLIT_MIN_CHUNKS = 16


class SegmentSplit:
    """``tables``: ChunkTables whose sequences are the segments (``segment_chunks`` chunks each, the last of a
    sequence shorter); ``first`` (N+1) int32, the first segment of each sequence (one of length 0 has none)."""

    def __init__(self, lengths: tuple[int, ...], chunk_size: int, segment_chunks: int, device):
        from .chunk import ChunkTables

        span = segment_chunks * chunk_size
        bounds, first = [0], [0]
        for n in lengths:
            start = bounds[-1]
            bounds += [start + min(cut, n) for cut in range(span, n + span, span)]
            first.append(len(bounds) - 1)
        self.n_segs = len(bounds) - 1
        self.tables = ChunkTables(torch.tensor(bounds, dtype=torch.int32), 1, 0, chunk_size, device)
        self.first = torch.tensor(first, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _segments(lengths: tuple[int, ...], chunk_size: int, segment_chunks: int, device) -> SegmentSplit:
    return SegmentSplit(lengths, chunk_size, segment_chunks, device)


def segment_split(tables, heads: int, dk: int, dv: int) -> SegmentSplit | None:
    """The segments to run the state walks on, or None where the sequences fill the GPU or are too short to
    cut. Only with K <= 128, where the forward's walk is the fused kernel (the state whole in registers)."""
    programs = tables.n_seqs * heads * cdiv(dv, 64)
    if dk > 128 or programs >= SPLIT_BELOW_PROGRAMS:
        return None
    segment_chunks = max(SPLIT_MIN_CHUNKS, cdiv(tables.n_chunks * heads * cdiv(dv, 64), SPLIT_TARGET_PROGRAMS))
    if max(tables.lengths, default=0) <= segment_chunks * tables.chunk_size:
        return None
    return _segments(tuple(tables.lengths), tables.chunk_size, segment_chunks, tables.cu.device)


@triton.jit
def segment_scan(local, g, h_in, incoming, out, seg_cu, first, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
                 GATE: tl.constexpr, REVERSE: tl.constexpr, HAS_IN: tl.constexpr):
    """One program per (K tile, V tile, sequence x head): ``incoming[s]`` = the state entering segment s in the
    walk's direction (from ``h_in`` at the sequence's first, or last if REVERSE, segment), then
    ``state <- e^{D_s} state + local[s]``; ``out`` the state after the last. ``D_s``, the segment's log-decay,
    is the sum of its chunks' in-chunk cumulative log-decays ``g`` at their last tokens."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    s_first = tl.load(first + i_n)
    n_segs = tl.load(first + i_n + 1) - s_first
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    tile = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_IN:
        state += tl.load(h_in + i_nh.to(tl.int64) * K * V + tile, mask=m_kv, other=0.0)
    for i in range(n_segs):
        s = (s_first + n_segs - 1 - i) if REVERSE else (s_first + i)
        base = (s * H + i_h).to(tl.int64) * K * V
        tl.store(incoming + base + tile, state, mask=m_kv)
        if GATE != 0:
            bos = tl.load(seg_cu + s).to(tl.int64)
            eos = tl.load(seg_cu + s + 1).to(tl.int64)
            if GATE == 1:
                total = tl.zeros([BC], dtype=tl.float32)
            else:
                total = tl.zeros([BC, BK], dtype=tl.float32)
            for c in range(0, tl.cdiv(eos - bos, C), BC):
                o_c = c + tl.arange(0, BC)
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
        state += tl.load(local + base + tile, mask=m_kv, other=0.0)
    tl.store(out + i_nh.to(tl.int64) * K * V + tile, state, mask=m_kv)


def launch_segment_scan(local, g, h_in, split: SegmentSplit, chunk_size: int, *, reverse: bool):
    """local (n_segs, H, K, V) fp32, g the in-chunk cumulative log-decay or None, h_in (N, H, K, V) or None.
    Returns (incoming (n_segs, H, K, V) fp32, out (N, H, K, V) fp32)."""
    _, heads, dk, dv = local.shape
    n_seqs = split.first.numel() - 1
    incoming = torch.empty_like(local)
    out = local.new_empty(n_seqs, heads, dk, dv)
    gate = 0 if g is None else (1 if g.dim() == 2 else 2)
    bk = min(64, max(16, triton.next_power_of_2(dk)))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    segment_scan[(cdiv(dk, bk), cdiv(dv, bv), n_seqs * heads)](
        local, g, h_in, incoming, out, split.tables.cu, split.first, H=heads, K=dk, V=dv, C=chunk_size, BK=bk,
        BV=bv, BC=16, GATE=gate, REVERSE=reverse, HAS_IN=h_in is not None, num_warps=4)
    return incoming, out

"""Split-KV ("flash-decoding") Triton kernels: a few new query tokens against a long KV cache.

Decoding reads the whole cache to produce a few rows of output: a memory-bandwidth problem. So:

* the KV length of each sequence is split across ``num_splits`` programs (enough programs to fill the
  GPU even at batch 1); each computes a partial softmax over its chunk and writes ``(o, lse)`` in fp32;
  the last program of a tile to finish (an arrival counter per tile) merges the partials by their LSE and
  writes the output: no second kernel, whose launch and tail were ~1% of a 32k decode on the H100;
* the query heads that share one KV head (GQA), times the ``T`` new tokens, are packed as the rows of one
  tile, so each K/V tile is read from memory once for the whole group (rows ``r = t * G + g``);
* storage is read in place, whatever the layout: dense ``(B, S, H, D)``, a ring of slots (rolling window;
  positions derived from the slot index and the length), or pages through a block table;
* MLA's latent layout (K = ``[c_kv, k_rope]``, V = ``c_kv``, one row of storage) is the same kernel with
  the score split into a main and a rope part (``D_ROPE``) and V taken from the K tile already loaded.

Scores follow ``subquad.attention``: ``scale * q.k``, softcap, ALiBi ``-slope * |q_pos - k_pos|``, causal
among the new tokens, optional sliding window; base-2 exponentials inside.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..chained import chains_replicate, unchained_rescaled
from ..grid import cdiv, launch_split, next_power_of_2, num_sms
from ..softmax.flash.tile import UPCAST_DOT

# storage layouts (kernel constexprs; Triton only reads globals that are constexpr)
DENSE, RING, PAGED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_LAYOUT_IDS = {"dense": 0, "ring": 1, "paged": 2}


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot`` at ``PRECISION``; in fp32 under the interpreter, as ``flash.tile.dot`` (``UPCAST_DOT``)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit(do_not_specialize=["pid_offset"])
def _decode_kernel(
    Q, K, V, O_part, LSE_part, COUNTERS, OUT, LSE, SEQLENS, BLOCK_TABLE, SLOPES,
    stride_qb, stride_qt, stride_qh,
    stride_ob, stride_ot, stride_oh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_bt, stride_sl,
    scale, softcap, window, capacity, pid_offset,
    HKV: tl.constexpr, T: tl.constexpr, G: tl.constexpr, NUM_SPLITS: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_DR: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, N_DV_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    LAYOUT: tl.constexpr, V_IS_K: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_SCORE_TILE: tl.constexpr,
    SPLIT_GRID: tl.constexpr,
):
    """Grid ``(row blocks x V column blocks, splits, batch x KV heads)``; ``pid_offset``: the batch x KV heads of
    the launches before this one, read under ``SPLIT_GRID`` only (``grid.launch_split``). The programs that meet
    at an arrival counter, a tile's splits, share its batch x KV head, so a split grid keeps them in one launch."""
    # axis 0: (row block, V column block) of one (sequence, KV head, split): neighbours share K/V in L2
    pid_mv = tl.program_id(0)
    split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    if SPLIT_GRID:
        # only there (as flash.tile.grid_row): added in every variant, the offset took the dense GQA kernel (B 8,
        # 32 / 8 heads of 128) from 96 to 106 registers, 5 -> 4 programs per SM, and the MLA kernel's spills from
        # 404 to 464 B (Triton 3.6, sm90: the program id alone is known to be below 65,536, which lets the
        # compiler widen and divide it unsigned)
        pid_bh += pid_offset
    m_blk = pid_mv // N_DV_BLOCKS
    dv_blk = pid_mv % N_DV_BLOCKS
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    seqlen = tl.load(SEQLENS + b)

    # rows of the tile: new token t, query head hkv * G + g
    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    t = rows // G
    head = hkv * G + rows % G
    q_pos = seqlen - T + t

    # the stretch of storage this sequence needs, cut into NUM_SPLITS chunks of whole blocks (a length past
    # the storage, which the host does not read back to check, reads no further than the storage holds)
    lo = 0
    hi = tl.minimum(seqlen, capacity)
    if LAYOUT != RING and HAS_WINDOW:
        lo = tl.maximum(seqlen - T + 1 - window, 0)
    n_blocks = tl.cdiv(hi - lo, BLOCK_N)
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    start = lo + split * per_split * BLOCK_N
    end = tl.minimum(hi, start + per_split * BLOCK_N)

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = dv_blk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if D_ROPE > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        q_rope = tl.load(q_ptrs + D + offs_dr[None, :], mask=row_ok[:, None] & (offs_dr[None, :] < D_ROPE),
                         other=0.0)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_sl + head, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        in_range = idx < end
        if LAYOUT == PAGED:
            page = tl.load(BLOCK_TABLE + b * stride_bt + idx // PAGE_SIZE, mask=in_range, other=0)
            k_row = K + page.to(tl.int64) * stride_kb + (idx % PAGE_SIZE) * stride_kn + hkv * stride_kh
            v_row = V + page.to(tl.int64) * stride_vb + (idx % PAGE_SIZE) * stride_vn + hkv * stride_vh
        else:
            k_row = K + b.to(tl.int64) * stride_kb + idx.to(tl.int64) * stride_kn + hkv * stride_kh
            v_row = V + b.to(tl.int64) * stride_vb + idx.to(tl.int64) * stride_vn + hkv * stride_vh
        if LAYOUT == RING:
            # slot idx holds the latest position p < seqlen with p % slots == idx
            k_pos = seqlen - 1 - (seqlen - 1 - idx) % capacity
        else:
            k_pos = idx
        k = tl.load(k_row[:, None] + offs_d[None, :], mask=in_range[:, None] & (offs_d[None, :] < D), other=0.0)
        # (scaled before the sum: a dot's result added to another's would become that dot's accumulator, which
        # chains the two; see subquad.ops.chained)
        s = _dot(q, tl.trans(k), DOT_PRECISION) * scale
        if D_ROPE > 0:
            k_rope = tl.load(k_row[:, None] + D + offs_dr[None, :],
                             mask=in_range[:, None] & (offs_dr[None, :] < D_ROPE), other=0.0)
            s += _dot(q_rope, tl.trans(k_rope), DOT_PRECISION) * scale
        if V_IS_K:
            v = k
        else:
            v = tl.load(v_row[:, None] + offs_dv[None, :], mask=in_range[:, None] & (offs_dv[None, :] < DV),
                        other=0.0)
        if HAS_SOFTCAP:
            # softcap * tanh(s / softcap), tanh through exp (stable: e in (0, 1])
            e = tl.exp(-2.0 * tl.abs(s) / softcap)
            th = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(s < 0, -th, th)
        dist = q_pos[:, None] - k_pos[None, :]
        if HAS_ALIBI:
            s = s - slope[:, None] * tl.abs(dist).to(tl.float32)
        keep = in_range[None, :] & (dist >= 0)
        if HAS_WINDOW:
            keep = keep & (dist < window)
        s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SPLIT_SCORE_TILE:    # 64 heads, 8 warps: see subquad.ops.chained
            p_op, acc = unchained_rescaled(p, acc, alpha, seqlen > 0, v.dtype)
            acc += _dot(p_op, v, DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out_ptrs = OUT + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    out_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    lse_ptrs = LSE + (b * (HKV * G) + head) * T + t          # natural-log LSE, (B, H_q, T)
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=out_ok)
        if dv_blk == 0:
            tl.store(lse_ptrs, lse * 0.6931471805599453, mask=row_ok)
    else:
        # partials: (B * HKV, NUM_SPLITS, T * G, DV) and (B * HKV, NUM_SPLITS, T * G), base-2 LSE. Every V
        # column block writes the (equal) LSE, so that whichever program merges finds all of them written.
        part = (pid_bh * NUM_SPLITS + split).to(tl.int64) * (T * G)
        tl.store(O_part + (part + rows[:, None]) * DV + offs_dv[None, :], o, mask=out_ok)
        tl.store(LSE_part + part + rows, lse, mask=row_ok)
        # every thread's stores precede the release of the arrival; the last to arrive merges
        tl.debug_barrier()
        tile = pid_bh * tl.num_programs(0) + pid_mv
        arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            tl.store(COUNTERS + tile, 0)                    # ready for the next call
            # row vectors only, split by split: a split's weight taken out of a (splits x rows) tile was a
            # reduction across warps, five barriers a split between its loads (sm90 SASS, GQA at 6 splits)
            first = (pid_bh * NUM_SPLITS).to(tl.int64) * (T * G)
            lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for i in range(NUM_SPLITS):
                # .cg: read the other programs' partials from L2, not from a stale L1 line
                lse_i = tl.load(LSE_part + first + i * (T * G) + rows, mask=row_ok, other=float("-inf"),
                                cache_modifier=".cg")
                lse_max = tl.maximum(lse_max, lse_i)
            lse_use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
            total = tl.zeros([BLOCK_M], tl.float32)
            merged = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            for i in range(NUM_SPLITS):
                part_i = first + i * (T * G)
                w_i = tl.exp2(tl.load(LSE_part + part_i + rows, mask=row_ok, other=float("-inf"),
                                      cache_modifier=".cg") - lse_use)
                o_i = tl.load(O_part + (part_i + rows[:, None]) * DV + offs_dv[None, :], mask=out_ok, other=0.0,
                              cache_modifier=".cg")
                merged += o_i * w_i[:, None]
                total += w_i
            none = total == 0.0
            tl.store(out_ptrs, (merged / tl.where(none, 1.0, total)[:, None]).to(OUT.dtype.element_ty), mask=out_ok)
            if dv_blk == 0:
                tl.store(lse_ptrs, tl.where(none, float("-inf"), (lse_use + tl.log2(tl.where(none, 1.0, total)))
                                            * 0.6931471805599453), mask=row_ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, next_power_of_2(n))


_COUNTERS: dict = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, kept per (device, stream): the program that
    merges a tile sets its counter back to zero, so a buffer is zeroed once and reused by every call on its
    stream (CUDA graphs included). Calls on two streams at once get two buffers."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if len(_COUNTERS) > 64:
            # a pool of short-lived streams: dropped buffers return to their stream's allocator pool
            _COUNTERS.clear()
        buf = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def _split_count(programs: int, slots: int, most: int) -> int:
    """Splits of the KV length: the fewest that fill the GPU's program slots in whole waves (>= 95% of the
    last wave busy), at most ``most``; else the best filled.

    H100 sweeps (benchmarks/results/*decode-tune*): about 3 programs fit on an SM beside each other (two
    64-key K/V stages in shared memory), and a split needs at least 16 key tiles. At 32k context (B 8, 8 KV
    heads: 64 programs per split) 6 splits, one wave of 384, read 2,928 GB/s (97.6% of copy) where 17 splits
    (1,088 programs, the last of three waves 75% busy) read 2,780 and 24 (1,536, four waves) 2,886; at 8k, 9
    splits of 14 tiles ran at 2,250-2,440 GB/s, 32 splits of 4 tiles 1,100-1,560."""
    def filled(s: int) -> float:
        return programs * s / (-(-programs * s // slots) * slots)

    most = max(1, most)
    for s in range(1, most + 1):
        if filled(s) >= 0.95:
            return s
    return max(range(1, most + 1), key=filled)


def decode_splitkv(q: torch.Tensor, view, *, window: int | None, scale: float, softcap: float | None,
                   alibi_slopes: torch.Tensor | None, num_splits: int | None = None, block_n: int | None = None,
                   block_m: int | None = None, block_dv: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, split_score_tile: bool | None = None,
                   own_counters: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on checked arguments; returns ``out (B, T, H_q, D_v)`` and ``lse (B, H_q, T)``.

    The block sizes and split count have defaults picked for the H100 (memory bound: enough programs in
    flight to keep every SM loading); they are arguments so that the benchmark can sweep them.
    ``own_counters``: zero this call's arrival counters (one more fill) rather than reuse the stream's buffer:
    the custom op's, whose calls may run inside a CUDA graph's memory pool, where a buffer kept for later
    calls is a live allocation that the graph does not own (``mode="reduce-overhead"`` refused to run).
    """
    # (the kernel reads rows of K and V with unit stride: a cache's storage has it, a strided view is copied)
    k = view.k if view.k.stride(-1) == 1 else view.k.contiguous()
    v = view.v if view.v.stride(-1) == 1 else view.v.contiguous()
    bsz, t, hq, dq = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    layout = _LAYOUT_IDS[view.layout]
    # MLA's latent layout: V is the first dv columns of K's own storage. Score = main part + rope part,
    # and V is the K tile already in registers (when one program covers all of V's columns).
    latent = v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and dv < dq
    d_main, d_rope = (dv, dq - dv) if latent else (dq, 0)
    rows = t * g
    if block_m is None:
        block_m = min(_pow2(rows), 64 if dv > 256 else 128)
    if block_dv is None:
        block_dv = _pow2(dv) if block_m * _pow2(dv) <= 64 * 512 else 256
    n_dv_blocks = cdiv(dv, block_dv)
    v_is_k = latent and n_dv_blocks == 1 and block_dv == _pow2(d_main) == d_main
    tile_given = block_n is not None
    if block_n is None:
        # measured on the H100 (benchmarks/decode_tune.py, two sweeps): 64 keys per tile for dense storage,
        # once the grid has enough splits; MLA's 576-wide rows too, with 64 heads per program and 8 warps
        # (benchmarks/results/*decode-tune*). Pages gathered row by row take 128: on the H200 (faster memory,
        # more bytes in flight needed) 0.2624 ms at 32k against 0.2752 with 64 (static: 0.2594), 0.9955 at 128k
        # against 1.082; on the H100 it cost ~2% (0.3807 against 0.3725, within 5% of static either way)
        block_n = 128 if view.layout == "paged" and not latent else 64
    m_blocks = cdiv(rows, block_m)

    max_len = view.max_seqlen
    if max_len is None:
        # lengths only on the device: the storage bounds them (reading their max back would stall the stream
        # on every step); splits past a sequence's end find no keys and cost a launch slot each
        max_len = view.capacity
    if view.layout == "ring":
        max_len = min(max_len, k.shape[1])
    if window is not None:
        max_len = min(max_len, window + t - 1)
    if num_splits is None:
        num_splits = _split_count(bsz * hkv * m_blocks * n_dv_blocks, 3 * num_sms(q.device),
                                  cdiv(max_len, 16 * block_n))
    # fourth sweep (2026-11-23-decode-tune4): a split of >= 16k keys of dense storage streams best in 128-key
    # tiles three deep (128k context, 6 splits of 22k: 1.4012 ms against 1.4075); 5.5k keys do not (32k:
    # 0.3697 against 0.3647)
    long_split = view.layout == "dense" and not latent and max_len >= 16384 * num_splits
    if long_split and not tile_given:
        block_n = 128
    if num_warps is None:
        num_warps = 8 if block_m * block_dv >= 64 * 256 else 4
    if num_stages is None and long_split:
        num_stages = 3
    if num_stages is None:
        # pages of 64-key tiles gathered through the block table: one more tile in flight paid on the H100
        # (2,883 GB/s against 2,869 with two stages at 32k), not on dense storage (2,911 against 2,928); with
        # 128-key tiles two stages are enough (H200: 0.2624 ms against 0.2637 at 32k)
        num_stages = 3 if view.layout == "paged" and block_n < 128 else 2

    if split_score_tile is None:
        # tiles of 64+ rows whose chained dots would run once per warpgroup (the MLA suite's 64 heads, 8 warps;
        # H200, 64 x 16k latent: 1.01 ms against 1.22); smaller tiles are read-bound and keep P in registers
        split_score_tile = block_m >= 64 and chains_replicate(block_m, num_warps)

    # one workspace for both partials: at 8k context the host-side cost of each call is comparable to the
    # kernel's, so allocations and launches are kept few
    n_part = bsz * hkv * num_splits * rows if num_splits > 1 else 1
    work = torch.empty(n_part * (dv + 1), dtype=torch.float32, device=q.device)
    o_part, lse_part = work[:n_part * dv], work[n_part * dv:]
    n_counters = bsz * hkv * m_blocks * n_dv_blocks
    counters = torch.zeros(n_counters, dtype=torch.int32, device=q.device) if own_counters \
        else _arrival_counters(q.device, n_counters)
    out = torch.empty(bsz, t, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, t, dtype=torch.float32, device=q.device)
    seqlens = view.seqlens.to(torch.int32)
    table = view.block_table if view.layout == "paged" else seqlens
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else q
    stride_sl = (hq if alibi_slopes.dim() == 2 and alibi_slopes.shape[0] > 1 else 0) if alibi_slopes is not None else 0

    launch_split(
        _decode_kernel, lambda n: (m_blocks * n_dv_blocks, num_splits, n), bsz * hkv,
        q, k, v, o_part, lse_part, counters, out, lse, seqlens, table, slopes,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        table.stride(0) if view.layout == "paged" else 0, stride_sl,
        scale, softcap if softcap is not None else 1.0, window if window is not None else 0,
        view.capacity,
        HKV=hkv, T=t, G=g, NUM_SPLITS=num_splits,
        D=d_main, BLOCK_D=_pow2(d_main), D_ROPE=d_rope, BLOCK_DR=_pow2(d_rope) if d_rope else 16,
        DV=dv, BLOCK_DV=block_dv, N_DV_BLOCKS=n_dv_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=k.shape[1] if view.layout == "paged" else 1,
        LAYOUT=layout, V_IS_K=v_is_k, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_ALIBI=alibi_slopes is not None,
        # fp32 caches get full-precision products (no tf32), as the reference computes them
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SPLIT_SCORE_TILE=split_score_tile,
        num_warps=num_warps, num_stages=num_stages, flag="SPLIT_GRID",
    )
    return out, lse

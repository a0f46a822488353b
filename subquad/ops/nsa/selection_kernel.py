"""The selection on a Triton kernel: ``selection``'s rule without an ``N x M`` tensor in memory.

For a chunk of queries the kernel ranks, per query token and KV head, every selection block by one int64 key:

* the block's importance (``selection``: each query head's softmax probability of the summary keys, summed over
  the heads of the group, carried from compression blocks to selection blocks by shared ``stride`` segments),
  plus ``tier * bound`` for the forced blocks (own, initial, previous);
* its float bits (non-negative floats order as their bits do) shifted left, the block's index counted down from
  ``2^20`` in the low bits: equal importances then rank the lower block first, the sort's tie rule;
* ``-1`` for a block that is not a candidate (causal: starts after the query).

and keeps the ``top_k`` highest as it walks the blocks (a sort of the kept keys and a tile's new ones), so that
the selection leaves the kernel as indices: the same as the stable sort of ``selection.select_blocks``. The
softmax runs over the summary keys twice per program, a pass for each row's maximum and sum and a pass for the
probabilities, with scores of near-fp32 accuracy: fp32 summary keys enter the tensor cores as two half-precision
parts (high and residual, ~2^-16 relative), so that rankings follow the fp32 reference, not the rounding of a
bf16 score (the PyTorch selection materialised fp32 scores chunk by chunk: 60 of NSA's 84 ms at 2 x 16k, 64 / 4
heads, on the H100; keys written out and ranked by ``torch.topk`` took 16 of its 93 ms at 1 x 64k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grid import cdiv, next_power_of_2
from ..softmax.flash.tile import UPCAST_DOT
from . import selection

#: the low bits of a key: the block's index counted down (blocks per row at most 2^20)
INDEX_BITS = 20
INDEX_MASK = (1 << INDEX_BITS) - 1
#: keys (int64) of one launch when they go to ``torch.topk``
SELECTION_ELEMENTS = 1 << 25
#: keep each row's top-k in the kernel (a sort of the kept keys and each tile's) instead of writing every block's key
#: for ``torch.topk``. H100, NSA forward (64 / 4 heads, the dynamic suite's shapes) alternated in one process
#: (``benchmarks/gpu/nsa_topk_ab.py``, benchmarks/results/2026-12-05-nsa-topk-ab-h100.json): 23.03 against 23.95
#: ms at 2 x 16k, 89.09 against 93.41 at 1 x 64k, the same selections; Triton 3.6 (sm90) compiles the kernel's
#: second loop to 1,125 instructions a tile with the sort against 927 without (144 / 116 registers, no spill)
KEEP_TOP_IN_KERNEL = True
LOG2E = 1.4426950408889634
# for the kernel (Triton reads only globals that are constexpr): the index bits and ``selection``'s tiers
_INDEX_BITS, _INDEX_MASK = tl.constexpr(INDEX_BITS), tl.constexpr(INDEX_MASK)
OWN, INITIAL, PREVIOUS = (tl.constexpr(t) for t in (selection.OWN, selection.INITIAL, selection.PREVIOUS))


@triton.jit
def _scores(q, KC, kc_base, c, c_ok, stride_km, offs_d, D: tl.constexpr, scale_log2):
    """Base-2 scaled scores of the tile's rows against summary keys ``c`` (``-inf`` outside ``c_ok``)."""
    kc = tl.load(KC + kc_base + c.to(tl.int64)[:, None] * stride_km + offs_d[None, :],
                 mask=c_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(kc))
    else:
        high = kc.to(q.dtype)
        residual = (kc - high.to(tl.float32)).to(q.dtype)
        s = tl.dot(q, tl.trans(high))
        s = tl.dot(q, tl.trans(residual), s)
    return s * scale_log2


@triton.jit
def _ends(c, seq_kv, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """The position of summary ``c``'s last token (a short last block of pooled keys ends at the sequence's end)."""
    return tl.minimum(c * CMP_STRIDE + CMP_BLOCK, seq_kv) - 1


@triton.jit
def _selection_kernel(
    Q, KC, OUT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_km, stride_kh, stride_ob, stride_ot, stride_oh,
    n_tokens, q_pos0, n_cmp, seq_kv, n_sel, scale_log2, bound,
    HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, J_STEP: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
    FORCED: tl.constexpr, TOP_K: tl.constexpr, KEEP_TOP: tl.constexpr,
):
    """Grid ``(cdiv(n_tokens, BLOCK_T), B x H_kv)``: ``BLOCK_T`` tokens of one KV head, their group's query heads
    as the rows ``t * G_P2 + g`` of the tile. A selection block ``j`` gathers compression blocks
    ``j * PER_BLOCK - SPAN + 1 .. (j + 1) * PER_BLOCK - 1``, so that a tile of ``BLOCK_C`` of them serves
    ``J_STEP`` blocks. ``KEEP_TOP``: the ``BLOCK_J >= TOP_K`` best keys of a row are kept as the walk goes and
    ``OUT`` is the selection ``(B, n_tokens, H_kv, TOP_K)`` int64; else ``OUT`` is every block's key
    ``(B, n_tokens, H_kv, n_sel)`` int64, for ``torch.topk``."""
    SPAN: tl.constexpr = CMP_BLOCK // CMP_STRIDE
    PER_BLOCK: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    IDENTITY: tl.constexpr = SPAN == 1 and PER_BLOCK == 1
    ROWS: tl.constexpr = BLOCK_T * G_P2
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = tl.arange(0, ROWS)
    t = pid_t * BLOCK_T + rows // G_P2
    g = rows % G_P2
    row_ok = (t < n_tokens) & (g < G)
    q_pos = q_pos0 + t
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + t.to(tl.int64)[:, None] * stride_qt
                + (hkv * G + g)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    kc_base = b.to(tl.int64) * stride_kb + hkv * stride_kh
    last = tl.minimum(q_pos0 + pid_t * BLOCK_T + BLOCK_T, q_pos0 + n_tokens) - 1
    if CAUSAL:
        # summaries the tile's last query sees, and the blocks it may select
        complete = tl.where(last + 1 >= CMP_BLOCK, (last + 1 - CMP_BLOCK) // CMP_STRIDE + 1, 0)
        seen_cmp = tl.where(last >= seq_kv - 1, n_cmp, tl.minimum(n_cmp, complete))
        candidates = tl.minimum(n_sel, last // SEL_BLOCK + 1)
    else:
        seen_cmp = n_cmp
        candidates = n_sel

    # each row's softmax over the summaries it sees: maximum and sum
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for c0 in range(0, seen_cmp, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < n_cmp
        s = _scores(q, KC, kc_base, c, c_ok, stride_km, offs_d, D, scale_log2)
        keep = c_ok[None, :]
        if CAUSAL:
            keep = keep & (_ends(c, seq_kv, CMP_BLOCK, CMP_STRIDE)[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)

    tq = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_pos = q_pos0 + tq
    own = t_pos // SEL_BLOCK
    jj = tl.arange(0, BLOCK_J)
    out_rows = OUT + b.to(tl.int64) * stride_ob + tq.to(tl.int64)[:, None] * stride_ot + hkv * stride_oh
    lanes = (tq < n_tokens)[:, None] & (jj < J_STEP)[None, :]
    best = tl.full([BLOCK_T, BLOCK_J], -1, tl.int64)
    computed = tl.cdiv(candidates, J_STEP) * J_STEP
    for j0 in range(0, computed, J_STEP):
        j = j0 + jj
        c = j0 * PER_BLOCK - (SPAN - 1) + tl.arange(0, BLOCK_C)
        c_ok = (c >= 0) & (c < n_cmp)
        s = _scores(q, KC, kc_base, c, c_ok, stride_km, offs_d, D, scale_log2)
        keep = c_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (_ends(c, seq_kv, CMP_BLOCK, CMP_STRIDE)[None, :] <= q_pos[:, None])
        p = tl.where(keep, tl.exp2(s - m_use[:, None]) * inv[:, None], 0.0)
        # summed over the group's heads first (BLOCK_T rows, not BLOCK_T * G_P2), then carried to the blocks
        per_summary = tl.sum(tl.reshape(p, (BLOCK_T, G_P2, BLOCK_C)), 1)
        if IDENTITY:
            importance = per_summary
        else:
            # weight of summary c in block j: the stride segments they share
            lo = tl.maximum(c[:, None], j[None, :] * PER_BLOCK)
            hi = tl.minimum(c[:, None] + SPAN - 1, j[None, :] * PER_BLOCK + PER_BLOCK - 1)
            weight = tl.maximum(hi - lo + 1, 0).to(tl.float32)
            if BLOCK_T >= 16:
                # (small groups: BLOCK_T x BLOCK_C x BLOCK_J products would not fit in registers)
                importance = tl.dot(per_summary, weight, input_precision="ieee")
            else:
                importance = tl.sum(per_summary[:, :, None] * weight[None, :, :], 1)
        candidate = ((jj < J_STEP) & (j < n_sel))[None, :]
        if CAUSAL:
            tier = tl.where(j[None, :] == own[:, None], OWN, 0)
            if FORCED:
                others = tl.where(j[None, :] == 0, INITIAL, tl.where(j[None, :] == own[:, None] - 1, PREVIOUS, 0))
                tier = tl.where(j[None, :] == own[:, None], OWN, others)
            candidate = candidate & (j[None, :] * SEL_BLOCK <= t_pos[:, None])
        else:
            tier = tl.zeros([BLOCK_T, BLOCK_J], tl.int32)
        value = importance + tier.to(tl.float32) * bound
        bits = value.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(candidate, (bits << _INDEX_BITS) | (_INDEX_MASK - j[None, :]), -1)
        if KEEP_TOP:
            # the kept keys and the tile's, sorted: the first half is the new best (keys are distinct but the -1s)
            merged = tl.sort(tl.reshape(tl.join(best, key), (BLOCK_T, 2 * BLOCK_J)), dim=1, descending=True)
            best, _ = tl.split(tl.permute(tl.reshape(merged, (BLOCK_T, 2, BLOCK_J)), (0, 2, 1)))
        else:
            tl.store(out_rows + j[None, :], key, mask=lanes & (j < n_sel)[None, :])
    if KEEP_TOP:
        # the best TOP_K by index, a missing one (key -1) after them as -1
        none = _INDEX_MASK + 1
        index = tl.where((best >= 0) & (jj < TOP_K)[None, :], _INDEX_MASK - (best & _INDEX_MASK), none)
        index = tl.sort(index, dim=1)
        tl.store(out_rows + jj[None, :], tl.where(index == none, -1, index),
                 mask=(tq < n_tokens)[:, None] & (jj < TOP_K)[None, :])
    else:
        # blocks after the tile's last query: no candidate of any row
        for j0 in range(computed, n_sel, J_STEP):
            j = j0 + jj
            tl.store(out_rows + j[None, :], tl.full([BLOCK_T, BLOCK_J], -1, tl.int64),
                     mask=lanes & (j < n_sel)[None, :])


def select_top_blocks(q: torch.Tensor, k_cmp: torch.Tensor, *, q_pos0: int, seq_kv: int, compress_block: int,
                      compress_stride: int, block: int, n_blocks: int, top_k: int, causal: bool, forced: bool,
                      bound: float, scale: float) -> torch.Tensor:
    """The selection ``(B, N_q, H_kv, top_k)`` int64 (increasing, ``-1`` after them where fewer blocks are
    candidates) of queries ``q`` ``(B, N_q, H_q, D)`` at positions ``q_pos0, q_pos0 + 1, ...`` over summary
    keys ``k_cmp`` ``(B, M, H_kv, D)`` (compression block ``i``: tokens ``[i * compress_stride, i *
    compress_stride + compress_block)``, the last one cut at ``seq_kv``), among ``n_blocks`` blocks of ``block``.
    Without ``KEEP_TOP_IN_KERNEL`` the keys go through ``torch.topk``, ``SELECTION_ELEMENTS`` keys at a time."""
    if n_blocks > INDEX_MASK:
        raise ValueError(f"block: at most {INDEX_MASK} selection blocks per sequence, got {n_blocks}")
    # the kernel steps through the head dim one element at a time (a transposed view of the caller's would be
    # read as other numbers)
    q, k_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cmp))
    bsz, n_tokens, hq, d = q.shape
    hkv = k_cmp.shape[2]
    g = hq // hkv
    g_p2 = next_power_of_2(g)
    block_t = max(1, 128 // g_p2)
    span, per_block = compress_block // compress_stride, block // compress_stride
    identity = span == 1 and per_block == 1
    if identity:
        block_c = j_step = 64
    else:
        block_c = max(64, next_power_of_2(per_block + span - 1))
        j_step = (block_c - span + 1) // per_block
    block_j = max(16, next_power_of_2(j_step))
    if KEEP_TOP_IN_KERNEL:
        # the tile of blocks is also the width of the kept keys: at least top_k
        block_j = max(block_j, next_power_of_2(top_k))
        if identity:
            block_c = j_step = block_j
    kc = k_cmp if k_cmp.shape[1] else q      # no summary yet: a valid pointer, never read

    def launch(q_chunk, out, pos0):
        _selection_kernel[(cdiv(q_chunk.shape[1], block_t), bsz * hkv)](
            q_chunk, kc, out,
            q_chunk.stride(0), q_chunk.stride(1), q_chunk.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            q_chunk.shape[1], pos0, k_cmp.shape[1], seq_kv, n_blocks, scale * LOG2E, bound,
            HKV=hkv, G=g, G_P2=g_p2, BLOCK_T=block_t, D=d, BLOCK_D=max(16, next_power_of_2(d)), BLOCK_C=block_c,
            BLOCK_J=block_j, J_STEP=j_step, CMP_BLOCK=compress_block, CMP_STRIDE=compress_stride,
            SEL_BLOCK=block, CAUSAL=causal, FORCED=forced, TOP_K=top_k, KEEP_TOP=KEEP_TOP_IN_KERNEL,
            num_warps=8 if block_t * g_p2 >= 128 else 4, num_stages=2,
        )
        return out

    if KEEP_TOP_IN_KERNEL:
        return launch(q, torch.empty(bsz, n_tokens, hkv, top_k, dtype=torch.int64, device=q.device), q_pos0)
    rows = max(1, min(n_tokens, SELECTION_ELEMENTS // max(bsz * hkv * n_blocks, 1)))
    return torch.cat([
        _top_blocks(launch(q[:, t0:t0 + rows], torch.empty(bsz, min(rows, n_tokens - t0), hkv, n_blocks,
                                                           dtype=torch.int64, device=q.device), q_pos0 + t0), top_k)
        for t0 in range(0, n_tokens, rows)], 1)


def _top_blocks(keys: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` blocks of the highest keys, in increasing order, ``-1`` after them (where fewer blocks are
    candidates): ``(..., n_blocks)`` int64 keys -> ``(..., top_k)`` int64 indices."""
    n_blocks = keys.shape[-1]
    kept = min(top_k, n_blocks)
    top = torch.topk(keys, kept, dim=-1, sorted=False).values
    chosen = torch.where(top >= 0, INDEX_MASK - (top & INDEX_MASK), n_blocks)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == n_blocks, -1, chosen)
    return torch.nn.functional.pad(chosen, (0, top_k - kept), value=-1)

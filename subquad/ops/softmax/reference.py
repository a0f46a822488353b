"""Exact softmax attention in plain PyTorch: the CPU path and the specification of the flash kernels.

Tiled like the kernels: for each query block, the key blocks that the BlockMask keeps are gathered and
processed in chunks with an online softmax (running max ``m``, running sum ``l``), so time and memory
follow the pattern's density rather than N^2. Full key blocks are used as they are; partial ones apply the
pattern's element predicate. Under autograd each query block is checkpointed, so the backward pass
recomputes its scores instead of keeping them, and takes its keys as separate block tensors, so each
block's gradient is accumulated in place: memory stays linear in N, work follows the kept pairs.

Scores are ``s = scale * q.k``, then ``softcap * tanh(s / softcap)``, then the ALiBi bias
``-slope * |q_pos - k_pos|``, then a user's ``score_mod``, then the mask. Accumulation is fp32 whatever the
input dtype. A query with no visible key gets output 0 and LSE -inf. Dropout (``Dropout``) removes the pairs
that the flash kernels remove (``subquad.ops.softmax.dropout``) from the output, not from the normaliser or LSE,
and scales the output by ``1 / (1 - p)``.
"""

from __future__ import annotations

import torch
from typing import NamedTuple

from torch.utils.checkpoint import checkpoint

from ...masks import BlockMask
from . import dropout as _dropout


class Dropout(NamedTuple):
    """A call's attention dropout: probability ``p``, its ``rng`` (``dropout.new_rng``), and the call's query heads
    and lengths, which number its pairs."""
    p: float
    rng: torch.Tensor
    heads: int
    seq_q: int
    seq_kv: int

#: keys processed at once for one query block (bounds the score tile: block_q x KV_CHUNK x heads)
KV_CHUNK = 8192


def _key_groups(full_blocks: list[int], partial_blocks: list[int], block_kv: int, seq_kv: int, device):
    """The keys one query block visits, as ``(index, masked)`` chunks of at most KV_CHUNK keys.

    Full and partial key blocks form separate chunks, so the pattern's predicate is evaluated only on the
    partial ones. A contiguous run of blocks (a window, a causal prefix) is a slice, i.e. a view of K/V with
    no gather; scattered blocks are gathered by index.
    """
    groups = []
    for blocks, masked in ((full_blocks, False), (partial_blocks, True)):
        if not blocks:
            continue
        if blocks[-1] - blocks[0] + 1 == len(blocks):
            lo, hi = blocks[0] * block_kv, min((blocks[-1] + 1) * block_kv, seq_kv)
            groups += [(slice(s, min(s + KV_CHUNK, hi)), masked) for s in range(lo, hi, KV_CHUNK)]
        else:
            idx = (torch.tensor(blocks, device=device).view(-1, 1) * block_kv
                   + torch.arange(block_kv, device=device)).flatten()
            idx = idx[idx < seq_kv]
            groups += [(idx[s:s + KV_CHUNK], masked) for s in range(0, idx.numel(), KV_CHUNK)]
    return groups


def _positions(index, kv_pos, device) -> torch.Tensor:
    if kv_pos is not None:
        return kv_pos[index]
    if isinstance(index, slice):
        return torch.arange(index.start, index.stop, device=device)
    return index


def _kept(dropout: Dropout, b_index, h_index, qrows, keys, hkv, g):
    """The dropout decisions of a score tile (``(b, hkv, g, nq, nk)``), as float 0/1."""
    rows = (b_index * dropout.heads + h_index) * dropout.seq_q + qrows.view(1, 1, -1, 1)
    draw = _dropout.keep_traced if torch.compiler.is_compiling() else _dropout.keep
    keep = draw(dropout.rng, rows, keys.view(1, 1, 1, -1), dropout.seq_kv)
    keep = keep.view(keep.shape[0], hkv, g, *keep.shape[2:]) if keep.shape[1] > 1 else \
        keep.view(keep.shape[0], 1, 1, *keep.shape[2:])
    return keep.float()


def _attend(q, k, v, groups, qpos, kv_pos, pattern, b_index, h_index, softcap, alibi, score_mod=None,
            dropout: Dropout | None = None, qrows=None, key_index=None):
    """One query block against its key chunks, with an online softmax across chunks.

    q: (b, hkv, g, nq, d) fp32, already multiplied by the scale; k, v: (b, hkv, N, d*) fp32; groups from
    ``_key_groups``; qpos and the keys' positions are what the mask, ALiBi and ``score_mod`` see; alibi
    (b, hkv, g) or None; ``score_mod(score, b, h, q_pos, k_pos)`` on broadcastable ``(b, h, q, k)`` tensors.
    ``dropout``: its decisions need the block's query rows ``qrows`` and the keys' indices in the call
    (``key_index[j]`` for the key at ``j`` of ``k``; None: ``j``). Returns o (b, nq, hkv, g, dv) fp32 and lse
    (b, hkv, g, nq) fp32.
    """
    bsz, hkv, g, nq, d = q.shape
    dv = v.shape[-1]
    # Without autograd the score tile is updated in place (fewer and same-sized allocations).
    # (not after a score_mod: its result may alias the scores or be broadcast, or feed a gradient it reads)
    inplace = score_mod is None and (not torch.is_grad_enabled() or not (
        q.requires_grad or k.requires_grad or v.requires_grad or (alibi is not None and alibi.requires_grad)))
    q2 = q.view(bsz, hkv, g * nq, d)
    m = torch.full((bsz, hkv, g, nq), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(bsz, hkv, g, nq, dv, device=q.device)
    for index, masked in groups:
        kc, vc = k[:, :, index], v[:, :, index]
        nk = kc.shape[2]
        s = torch.matmul(q2, kc.transpose(-1, -2)).view(bsz, hkv, g, nq, nk)
        if softcap is not None:
            s = s.div_(softcap).tanh_().mul_(softcap) if inplace else softcap * torch.tanh(s / softcap)
        kp = _positions(index, kv_pos, q.device) if (masked or alibi is not None or score_mod is not None) else None
        if alibi is not None:
            bias = alibi[..., None, None] * (qpos.view(-1, 1) - kp.view(1, -1)).abs().float()
            s = s.sub_(bias) if inplace else s - bias
        if score_mod is not None:
            s4 = s.view(bsz, hkv * g, nq, nk)
            s = torch.as_tensor(score_mod(s4, b_index, h_index, qpos.view(1, 1, -1, 1), kp.view(1, 1, 1, -1)),
                                dtype=torch.float32, device=s.device).expand_as(s4).reshape(s.shape)
        if masked:
            keep = pattern.predicate(b_index, h_index, qpos.view(1, 1, -1, 1), kp.view(1, 1, 1, -1))
            # keep: (b or 1, hq or 1, nq, nk) -> (b or 1, hkv or 1, g or 1, nq, nk)
            keep = keep.view(keep.shape[0], 1, 1, *keep.shape[2:]) if keep.shape[1] == 1 else \
                keep.view(keep.shape[0], hkv, g, *keep.shape[2:])
            s = s.masked_fill_(~keep, float("-inf")) if inplace else s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1)).detach()
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = s.sub_(m_safe[..., None]).exp_() if inplace else torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        if dropout is not None:
            p = p * _kept(dropout, b_index, h_index, qrows, _positions(index, key_index, q.device), hkv, g)
        pv = torch.matmul(p.view(bsz, hkv, g * nq, nk), vc).view(bsz, hkv, g, nq, dv)
        acc = acc.mul_(alpha[..., None]).add_(pv) if inplace else acc * alpha[..., None] + pv
        m = m_new
    empty = l == 0
    norm = torch.where(empty, torch.ones_like(l), l)
    o = acc / (norm if dropout is None else norm * (1 - dropout.p))[..., None]
    m_fin = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m_fin + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return o.permute(0, 3, 1, 2, 4), lse


def _attend_blocks(q, kidx, n_full, qpos, kv_pos, pattern, b_index, h_index, softcap, alibi, score_mod, dropout,
                   qrows, *kv_blocks):
    """``_attend`` over key blocks handed in as separate tensors (the autograd path).

    Concatenating the blocks here, inside the checkpoint, sends each block's gradient to that block alone:
    slicing one full-length K/V instead would make every query block's backward build (and add) a
    gradient as long as the whole sequence, O(N^2 / block) work and memory traffic.
    """
    half = len(kv_blocks) // 2
    k, v = torch.cat(kv_blocks[:half], dim=2), torch.cat(kv_blocks[half:], dim=2)
    total = k.shape[2]
    groups = [(slice(s, min(s + KV_CHUNK, n_full)), False) for s in range(0, n_full, KV_CHUNK)]
    groups += [(slice(s, min(s + KV_CHUNK, total)), True) for s in range(n_full, total, KV_CHUNK)]
    positions = kidx if kv_pos is None else kv_pos[kidx]
    return _attend(q, k, v, groups, qpos, positions, pattern, b_index, h_index, softcap, alibi, score_mod,
                   dropout, qrows, kidx)


def attention_traced(q, k, v, pattern, scale: float, softcap=None, alibi_slopes=None, q_pos=None, kv_pos=None,
                     score_mod=None, dropout: Dropout | None = None):
    """``attention_reference`` as a traced call (torch.compile) runs it, on a prepared ``pattern`` (None: full)
    rather than a BlockMask: every key chunk of every query block, masked by the pattern's predicate. A
    BlockMask's build and its block lists read values on the host, which broke the graph (``fullgraph``
    failed). The same maths; it visits the pairs the block lists would skip."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    k_t, v_t = k.transpose(1, 2).float(), v.transpose(1, 2).float()
    alibi = None
    if alibi_slopes is not None:
        alibi = alibi_slopes.float().view(-1 if alibi_slopes.dim() == 2 else 1, hq).expand(bsz, hq)
        alibi = alibi.reshape(bsz, hkv, g)
    groups = [(slice(s, min(s + KV_CHUNK, seq_kv)), pattern is not None) for s in range(0, seq_kv, KV_CHUNK)]
    b_index = torch.arange(bsz, device=q.device).view(-1, 1, 1, 1)
    h_index = torch.arange(hq, device=q.device).view(1, -1, 1, 1)
    outs, lses = [], []
    for q0 in range(0, seq_q, TRACED_BLOCK_Q):
        q1 = min(q0 + TRACED_BLOCK_Q, seq_q)
        qpos = torch.arange(q0, q1, device=q.device) + (seq_kv - seq_q) if q_pos is None else q_pos[q0:q1]
        qt = (q[:, q0:q1].float() * scale).view(bsz, q1 - q0, hkv, g, d).permute(0, 2, 3, 1, 4).contiguous()
        o, lse = _attend(qt, k_t, v_t, groups, qpos, kv_pos, pattern, b_index, h_index, softcap, alibi, score_mod,
                         dropout, torch.arange(q0, q1, device=q.device))
        outs.append(o.reshape(bsz, q1 - q0, hq, dv))
        lses.append(lse.reshape(bsz, hq, q1 - q0))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 2)


#: query rows per block of ``attention_traced`` (its memory: a block's scores against one key chunk at a time)
TRACED_BLOCK_Q = 128


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None,
                        scale: float, softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                        q_pos: torch.Tensor | None = None, kv_pos: torch.Tensor | None = None,
                        block_q: int | None = None, score_mod=None,
                        dropout: Dropout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``(batch, seq, heads, dim)`` tensors; returns ``(out, lse)`` with lse ``(B, H_q, N_q)``.

    ``q_pos`` (seq_q,) and ``kv_pos`` (seq_kv,) are the positions the mask predicate and ALiBi see, for
    sequences that were permuted or gathered (LSH buckets, gathered columns); by default query ``i`` sits at
    ``i + seq_kv - seq_q`` and key ``j`` at ``j``. The BlockMask must have been built for those positions.
    ``score_mod(score, b, h, q_pos, k_pos)``: applied after softcap and ALiBi, on broadcastable tensors.
    ``dropout``: attention dropout, the flash kernels' pairs dropped. Arguments are assumed checked
    (``subquad.attention`` checks them). Traced (torch.compile): ``attention_traced``.
    """
    if torch.compiler.is_compiling():
        return attention_traced(q, k, v, block_mask.pattern if block_mask is not None else None, scale, softcap,
                                alibi_slopes, q_pos, kv_pos, score_mod, dropout)
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    device = q.device
    block_q = block_mask.block_q if block_mask is not None else (block_q or 128)
    block_kv = block_mask.block_kv if block_mask is not None else 128
    n_qb = -(-seq_q // block_q)
    n_kb = -(-seq_kv // block_kv)
    q_offset = seq_kv - seq_q
    bm_b = block_mask.kind.shape[0] if block_mask is not None else 1
    bm_h = block_mask.kind.shape[1] if block_mask is not None else 1
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().view(-1 if alibi_slopes.dim() == 2 else 1, hq)
        slopes = slopes.expand(bsz, hq).reshape(bsz, hkv, g)

    # (a score_mod may read tensors that need gradients: without the checkpointed path autograd would keep every
    # score tile, memory growing with N^2)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                             or score_mod is not None)
    # K and V as (b, hkv, N, d) fp32 views of the (b, N, hkv, d) inputs: every key chunk is a strided view (or
    # a gather along N) whose rows are contiguous, which the CPU and GPU matmuls take as they are. A
    # contiguous transposed copy would be two more passes over K and V per call, out of cache at long N.
    k_t = k.transpose(1, 2).float()
    v_t = v.transpose(1, 2).float()
    pattern = block_mask.pattern if block_mask is not None else None
    outs, lses = [], []
    # Groups of (batch, head) that share one block plan: all of them when the pattern is uniform.
    for b in range(bm_b):
        bsl = slice(None) if bm_b == 1 else slice(b, b + 1)
        for h in range(bm_h):
            # Per-head plans attend one query head at a time (its KV head is h // g).
            hsl = slice(None) if bm_h == 1 else slice(h, h + 1)
            ksl = slice(None) if bm_h == 1 else slice(h // g, h // g + 1)
            qh = q[bsl, :, hsl]
            kh, vh = k_t[bsl, ksl], v_t[bsl, ksl]
            heads_kv = hkv if bm_h == 1 else 1
            groups = g if bm_h == 1 else 1
            al = None
            if slopes is not None:
                al = slopes[bsl].reshape(-1, hkv * g)[:, hsl].reshape(-1, heads_kv, groups)
            b_index = torch.tensor(b, device=device).view(1, 1, 1, 1) if bm_b > 1 else \
                torch.arange(bsz, device=device).view(-1, 1, 1, 1)
            h_index = torch.tensor(h, device=device).view(1, 1, 1, 1) if bm_h > 1 else \
                torch.arange(hq, device=device).view(1, -1, 1, 1)
            if block_mask is not None:
                (fnum, fidx), (pnum, pidx) = block_mask.full_kv, block_mask.partial_kv
                fnum, fidx, pnum, pidx = (x[b, h].tolist() for x in (fnum, fidx, pnum, pidx))
            if need_grad:
                k_blocks, v_blocks = kh.split(block_kv, dim=2), vh.split(block_kv, dim=2)
            # Query blocks as the outputs of one split (whose backward is one concatenation), not slices of
            # q: each slice's backward would fill a zero gradient as long as q, O(N^2 / block) in all.
            q_blocks = qh.split(block_q, dim=1)
            row_o, row_l = [], []
            if not need_grad:
                # Each block's result goes straight into the output: a list of blocks and their concatenation
                # would hold the output twice, and at long N the fresh pages of both cost more than the copy.
                o_bh = q.new_empty(qh.shape[0], seq_q, heads_kv * groups, dv)
                l_bh = q.new_empty(qh.shape[0], heads_kv * groups, seq_q, dtype=torch.float32)
            for qb in range(n_qb):
                q0, q1 = qb * block_q, min((qb + 1) * block_q, seq_q)
                qrows = torch.arange(q0, q1, device=device)
                qpos = qrows + q_offset if q_pos is None else q_pos[q0:q1]
                # (b, nq, hq, d) -> (b, hkv, g, nq, d), scaled once here rather than on every score tile.
                qt = (q_blocks[qb].float() * scale).view(qh.shape[0], q1 - q0, heads_kv, groups, d)
                qt = qt.permute(0, 2, 3, 1, 4).contiguous()
                if need_grad:
                    full = list(range(n_kb)) if block_mask is None else fidx[qb][:fnum[qb]]
                    partial = [] if block_mask is None else pidx[qb][:pnum[qb]]
                    if not full and not partial:
                        # Nothing visible: key block 0 as a masked block (the pattern keeps none of it, as
                        # the BlockMask's bounds are exact or over-approximate) gives zeros and -inf.
                        partial = [0]
                    blocks = full + partial
                    kidx = (torch.tensor(blocks, device=device).view(-1, 1) * block_kv
                            + torch.arange(block_kv, device=device)).flatten()
                    kidx = kidx[kidx < seq_kv]
                    n_full = sum(min(block_kv, seq_kv - i * block_kv) for i in full)
                    pieces = [k_blocks[i] for i in blocks] + [v_blocks[i] for i in blocks]
                    o_blk, l_blk = checkpoint(_attend_blocks, qt, kidx, n_full, qpos, kv_pos, pattern, b_index,
                                              h_index, softcap, al, score_mod, dropout, qrows, *pieces,
                                              use_reentrant=False)
                else:
                    if block_mask is None:
                        key_groups = _key_groups(list(range(n_kb)), [], block_kv, seq_kv, device)
                    else:
                        key_groups = _key_groups(fidx[qb][:fnum[qb]], pidx[qb][:pnum[qb]], block_kv, seq_kv,
                                                 device)
                    o_blk, l_blk = _attend(qt, kh, vh, key_groups, qpos, kv_pos, pattern, b_index, h_index,
                                           softcap, al, score_mod, dropout, qrows)
                o_blk = o_blk.reshape(o_blk.shape[0], q1 - q0, heads_kv * groups, dv)
                l_blk = l_blk.reshape(l_blk.shape[0], heads_kv * groups, q1 - q0)
                if need_grad:
                    row_o.append(o_blk)
                    row_l.append(l_blk)
                else:
                    o_bh[:, q0:q1] = o_blk
                    l_bh[..., q0:q1] = l_blk
            if need_grad:
                o_bh = torch.cat(row_o, dim=1).to(q.dtype)
                l_bh = torch.cat(row_l, dim=2)
            if bm_b == 1 and bm_h == 1:
                return o_bh, l_bh
            outs.append((bsl, hsl, o_bh))
            lses.append((bsl, hsl, l_bh))
    # Per-(batch, head) plans: stitch the pieces back (out of place, so autograd sees it).
    rows = []
    for b in range(bm_b):
        pieces = [o for (bs, hs, o) in outs if (bm_b == 1 or bs.start == b)]
        rows.append(torch.cat(pieces, dim=2) if bm_h > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if bm_b > 1 else rows[0]
    lrows = []
    for b in range(bm_b):
        pieces = [x for (bs, hs, x) in lses if (bm_b == 1 or bs.start == b)]
        lrows.append(torch.cat(pieces, dim=1) if bm_h > 1 else pieces[0])
    lse = torch.cat(lrows, dim=0) if bm_b > 1 else lrows[0]
    return out, lse

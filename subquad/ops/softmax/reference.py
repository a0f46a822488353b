"""Exact softmax attention in plain PyTorch: the CPU path and the specification of the flash kernels.

Tiled like the kernels: for each query block, the key blocks that the BlockMask keeps are gathered and
processed in chunks with an online softmax (running max ``m``, running sum ``l``), so time and memory
follow the pattern's density rather than N^2. Full key blocks are used as they are; partial ones apply the
pattern's element predicate. Under autograd each query block is checkpointed, so the backward pass
recomputes its scores instead of keeping them: memory stays linear in N.

Scores are ``s = scale * q.k``, then ``softcap * tanh(s / softcap)``, then the ALiBi bias
``-slope * |q_pos - k_pos|``, then the mask. Accumulation is fp32 whatever the input dtype. A query with no
visible key gets output 0 and LSE -inf.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ...masks import FULL, PARTIAL, BlockMask

#: keys processed at once for one query block (bounds the score tile: block_q x KV_CHUNK x heads)
KV_CHUNK = 8192


def _block_keys(bm: BlockMask | None, b: int, h: int, qb: int, n_kb: int, block_kv: int, seq_kv: int,
                device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Key positions this query block visits, and for each a flag 'in a partial block' (None: all full)."""
    if bm is None:
        return torch.arange(seq_kv, device=device), None
    kind = bm.kind[b, h, qb]
    kbs = torch.nonzero(kind != 0).flatten()
    if kbs.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device), None
    pos = (kbs.view(-1, 1) * block_kv + torch.arange(block_kv, device=device)).flatten()
    partial = (kind[kbs] == PARTIAL).view(-1, 1).expand(-1, block_kv).flatten()
    keep = pos < seq_kv
    pos, partial = pos[keep], partial[keep]
    return pos, (partial if bool(partial.any()) else None)


def _attend(q, k, v, kidx, partial, qpos, kv_pos, pattern, b_index, h_index, scale, softcap, alibi):
    """One query block against its gathered keys, online softmax over KV_CHUNK-sized chunks.

    q: (b, nq, hkv, g, d) fp32; k, v: (b, nk_all, hkv, d*) in their dtype; kidx: (nk,) key indices; qpos and
    ``kv_pos[kidx]`` are the positions that the mask and ALiBi see; returns o (b, nq, hkv, g, dv) fp32 and
    lse (b, hkv, g, nq) fp32.
    """
    bsz, nq, hkv, g, _ = q.shape
    dv = v.shape[-1]
    m = torch.full((bsz, hkv, g, nq), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(bsz, hkv, g, nq, dv, device=q.device)
    for start in range(0, kidx.numel(), KV_CHUNK):
        ki = kidx[start:start + KV_CHUNK]
        kc = k[:, ki].float()
        vc = v[:, ki].float()
        kp = ki if kv_pos is None else kv_pos[ki]
        s = torch.einsum("bqhgd,bkhd->bhgqk", q, kc) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if alibi is not None:
            s = s - alibi[..., None, None] * (qpos.view(-1, 1) - kp.view(1, -1)).abs().float()
        if partial is not None:
            part = partial[start:start + KV_CHUNK]
            if bool(part.any()):
                keep = pattern.predicate(b_index, h_index, qpos.view(1, 1, -1, 1), kp.view(1, 1, 1, -1))
                keep = keep | ~part.view(1, 1, 1, -1)
                # keep: (b or 1, h or 1, nq, nk) -> (b or 1, hkv or 1, g or 1, nq, nk)
                keep = keep.view(keep.shape[0], 1, 1, *keep.shape[2:]) if keep.shape[1] == 1 else \
                    keep.view(keep.shape[0], hkv, g, *keep.shape[2:])
                s = s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1)).detach()
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgqk,bkhd->bhgqd", p, vc)
        m = m_new
    empty = l == 0
    o = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
    m_fin = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m_fin + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return o.permute(0, 3, 1, 2, 4), lse


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None,
                        scale: float, softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                        q_pos: torch.Tensor | None = None, kv_pos: torch.Tensor | None = None,
                        block_q: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``(batch, seq, heads, dim)`` tensors; returns ``(out, lse)`` with lse ``(B, H_q, N_q)``.

    ``q_pos`` (seq_q,) and ``kv_pos`` (seq_kv,) are the positions the mask predicate and ALiBi see, for
    sequences that were permuted or gathered (LSH buckets, gathered columns); by default query ``i`` sits at
    ``i + seq_kv - seq_q`` and key ``j`` at ``j``. The BlockMask must have been built for those positions.
    Arguments are assumed checked (``subquad.attention`` checks them).
    """
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

    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    # Groups of (batch, head) that share one block plan: all of them when the pattern is uniform.
    for b in range(bm_b):
        bsl = slice(None) if bm_b == 1 else slice(b, b + 1)
        for h in range(bm_h):
            # Per-head plans attend one query head at a time (its KV head is h // g).
            hsl = slice(None) if bm_h == 1 else slice(h, h + 1)
            ksl = slice(None) if bm_h == 1 else slice(h // g, h // g + 1)
            qh = q[bsl, :, hsl]
            kh, vh = k[bsl, :, ksl], v[bsl, :, ksl]
            heads_kv = hkv if bm_h == 1 else 1
            groups = g if bm_h == 1 else 1
            al = None
            if slopes is not None:
                al = slopes[bsl].reshape(-1, hkv * g)[:, hsl].reshape(-1, heads_kv, groups)
            b_index = torch.tensor(b, device=device).view(1, 1, 1, 1) if bm_b > 1 else \
                torch.arange(bsz, device=device).view(-1, 1, 1, 1)
            h_index = torch.tensor(h, device=device).view(1, 1, 1, 1) if bm_h > 1 else \
                torch.arange(hq, device=device).view(1, -1, 1, 1)
            row_o, row_l = [], []
            for qb in range(n_qb):
                q0, q1 = qb * block_q, min((qb + 1) * block_q, seq_q)
                kidx, partial = _block_keys(block_mask, b, h, qb, n_kb, block_kv, seq_kv, device)
                qpos = torch.arange(q0, q1, device=device) + q_offset if q_pos is None else q_pos[q0:q1]
                qt = qh[:, q0:q1].float().reshape(qh.shape[0], q1 - q0, heads_kv, groups, d)
                pattern = block_mask.pattern if block_mask is not None else None
                args = (qt, kh, vh, kidx, partial, qpos, kv_pos, pattern, b_index, h_index, scale, softcap, al)
                if need_grad:
                    o_blk, l_blk = checkpoint(_attend, *args, use_reentrant=False)
                else:
                    o_blk, l_blk = _attend(*args)
                row_o.append(o_blk.reshape(o_blk.shape[0], q1 - q0, heads_kv * groups, dv))
                row_l.append(l_blk.reshape(l_blk.shape[0], heads_kv * groups, q1 - q0))
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

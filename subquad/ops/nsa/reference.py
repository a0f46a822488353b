"""Native Sparse Attention and top-k block attention in plain PyTorch: the CPU path and the specification.

Queries run in chunks: a chunk's scores against the compressed keys, its tokens' selected blocks (gathered per
token) and its sliding window hold at most ``CHUNK_ELEMENTS`` numbers, whatever ``N``; under autograd each chunk is
checkpointed, so the backward recomputes its scores rather than keeping them. Accumulation is fp32 (fp64 for
fp64 inputs). Queries are aligned to the end of the keys (query ``i`` of ``N_q`` at position
``i + N_kv - N_q``). A branch that leaves a query no key (the compressed branch before the first block is
complete) gives that branch 0.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .compression import block_ends, pool_blocks, pooled_ends
from .selection import select_nsa, select_topk

#: score elements (over every head) that one chunk of queries may hold per branch
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(seq_q: int, heads_q: int, heads_kv: int, keys_per_query: int, head_dims: int) -> int:
    """Queries per chunk: their scores (``heads_q x keys``) and gathered keys (``heads_kv x keys x dims``)."""
    per_query = keys_per_query * (heads_q + heads_kv * head_dims)
    return max(1, min(seq_q, CHUNK_ELEMENTS // max(per_query, 1)))


def _masked_softmax(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the kept scores; a row with no kept score is all 0 (not NaN), and so is a
    last dim of size 0 (no compressed key yet: ``amax`` has nothing to reduce, the product with V gives 0)."""
    s = s.masked_fill(~keep, float("-inf"))
    if s.shape[-1] == 0:
        return s
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total == 0, 1.0, total)


def _shared_keys(qc, k, v, keep):
    """``qc`` ``(B, C, H_kv, G, D)`` (scaled) against keys shared by the chunk ``(B, K, H_kv, D)`` under
    ``keep`` ``(C, K)``; returns the output ``(B, C, H_kv, G, D_v)`` and the probabilities ``(B, C, H_kv, G, K)``."""
    s = torch.einsum("bchgd,bkhd->bchgk", qc, k)
    p = _masked_softmax(s, keep.view(1, keep.shape[0], 1, 1, -1))
    return torch.einsum("bchgk,bkhd->bchgd", p, v), p


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, N, H, D)`` -> ``(B, ceil(N / block), H, block, D)`` (zeros past ``N``): each selected block is then
    one contiguous row to gather."""
    bsz, n, h, d = x.shape
    n_blocks = -(-n // block)
    padded = F.pad(x, (0, 0, 0, 0, 0, n_blocks * block - n))
    return padded.view(bsz, n_blocks, block, h, d).transpose(2, 3).contiguous()


def _selected(qc, k_blocks, v_blocks, indices, q_pos, seq_kv: int, block: int, causal: bool):
    """Each token of the chunk over the blocks ``indices`` ``(B, C, H_kv, S)`` chose (``-1``: none), from K/V
    as ``as_blocks`` lays them out."""
    bsz, c, hkv, s_count = indices.shape
    tokens = (indices.clamp(min=0) * block).unsqueeze(-1) + torch.arange(block, device=indices.device)
    keep = (indices >= 0).unsqueeze(-1) & (tokens < seq_kv)
    if causal:
        keep = keep & (tokens <= q_pos.view(1, -1, 1, 1, 1))
    keep = keep.view(bsz, c, hkv, 1, s_count * block)
    b_index = torch.arange(bsz, device=indices.device).view(-1, 1, 1, 1)
    h_index = torch.arange(hkv, device=indices.device).view(1, 1, -1, 1)
    picked = indices.clamp(min=0)
    k = k_blocks[b_index, picked, h_index].view(bsz, c, hkv, s_count * block, -1)
    v = v_blocks[b_index, picked, h_index].view(bsz, c, hkv, s_count * block, -1)
    p = _masked_softmax(torch.matmul(qc, k.transpose(-1, -2)), keep)
    return torch.matmul(p, v)


def _window(qc, k, v, q_start: int, window: int):
    """Each token (the first at ``q_start``) over its ``window`` most recent keys (itself included)."""
    lo, hi = max(q_start - window + 1, 0), q_start + qc.shape[1]
    q_pos = torch.arange(q_start, hi, device=k.device)
    kv_pos = torch.arange(lo, hi, device=k.device)
    dist = q_pos.view(-1, 1) - kv_pos.view(1, -1)
    return _shared_keys(qc, k[:, lo:hi], v[:, lo:hi], (dist >= 0) & (dist < window))[0]


def _nsa_chunk(q_start: int, q, gates, k, v, k_blocks, v_blocks, k_cmp, v_cmp, *, compress_block: int,
               compress_stride: int, block: int, top_k: int, window: int, scale: float):
    bsz, c, hq, d = q.shape
    hkv = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    q_pos = torch.arange(q_start, q_start + c, device=q.device)
    qc = (q.to(acc) * scale).view(bsz, c, hkv, hq // hkv, d)
    k, v, k_cmp, v_cmp = (x.to(acc) for x in (k, v, k_cmp, v_cmp))
    seq_kv = k.shape[1]
    ends = block_ends(k_cmp.shape[1], compress_block, compress_stride, q.device)
    o_cmp, p_cmp = _shared_keys(qc, k_cmp, v_cmp, ends.view(1, -1) <= q_pos.view(-1, 1))
    with torch.no_grad():
        indices = select_nsa(p_cmp, q_pos, compress_block=compress_block, compress_stride=compress_stride,
                             block=block, top_k=top_k, n_blocks=k_blocks.shape[1])
    o_slc = _selected(qc, k_blocks.to(acc), v_blocks.to(acc), indices, q_pos, seq_kv, block, causal=True)
    o_win = _window(qc, k, v, q_start, window)
    w = gates.to(acc).view(bsz, c, hkv, hq // hkv, 3, 1)
    o = w[..., 0, :] * o_cmp + w[..., 1, :] * o_slc + w[..., 2, :] * o_win
    return o.reshape(bsz, c, hq, -1), indices


def _topk_chunk(q_start: int, q, k_blocks, v_blocks, k_pool, *, seq_kv: int, block: int, top_k: int, causal: bool,
                scale: float):
    bsz, c, hq, d = q.shape
    hkv = k_blocks.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    q_pos = torch.arange(q_start, q_start + c, device=q.device)
    qc = (q.to(acc) * scale).view(bsz, c, hkv, hq // hkv, d)
    with torch.no_grad():
        indices = select_topk(qc, k_pool, pooled_ends(seq_kv, block, q.device), q_pos, block=block,
                              top_k=top_k, causal=causal)
    o = _selected(qc, k_blocks.to(acc), v_blocks.to(acc), indices, q_pos, seq_kv, block, causal)
    return o.reshape(bsz, c, hq, -1), indices


def _run_chunks(fn, rows: int, seq_q: int, q_offset: int, per_query: tuple, shared: tuple, needs_grad: bool):
    """``fn(q_start, *per_query[t0:t1], *shared)`` over chunks of ``rows`` queries, checkpointed under autograd;
    its ``(out, indices)`` concatenated along the sequence."""
    outs, picked = [], []
    for t0 in range(0, seq_q, rows):
        t1 = min(t0 + rows, seq_q)
        args = (q_offset + t0, *(x[:, t0:t1] for x in per_query), *shared)
        o, idx = checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args)
        outs.append(o)
        picked.append(idx)
    return torch.cat(outs, 1), torch.cat(picked, 1)


def nsa_reference(q, k, v, gates, k_cmp, v_cmp, *, block: int, compress_block: int, compress_stride: int,
                  top_k: int, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA (arguments checked by ``subquad.nsa``) on given compressed keys/values ``(B, M, H_kv, D*)``; returns
    ``(out (B, N_q, H_q, D_v) in q's dtype, indices (B, N_q, H_kv, top_k))``."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv = k.shape[1], k.shape[2]
    keys = max(k_cmp.shape[1], top_k * block, window)
    rows = _chunk_rows(seq_q, hq, hkv, keys, d + v.shape[-1])
    fn = partial(_nsa_chunk, compress_block=compress_block, compress_stride=compress_stride, block=block,
                 top_k=top_k, window=window, scale=scale)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, gates, k_cmp, v_cmp))
    shared = (k, v, as_blocks(k, block), as_blocks(v, block), k_cmp, v_cmp)
    out, indices = _run_chunks(fn, rows, seq_q, seq_kv - seq_q, (q, gates), shared, needs_grad)
    return out.to(q.dtype), indices


def topk_block_attention_reference(q, k, v, *, block: int, top_k: int, causal: bool,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k block attention (arguments checked by ``subquad.topk_block_attention``); returns
    ``(out, indices (B, N_q, H_kv, top_k))``."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv = k.shape[1], k.shape[2]
    k_pool = pool_blocks(k, block)
    rows = _chunk_rows(seq_q, hq, hkv, max(k_pool.shape[1], top_k * block), d + v.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    fn = partial(_topk_chunk, seq_kv=seq_kv, block=block, top_k=top_k, causal=causal, scale=scale)
    shared = (as_blocks(k, block), as_blocks(v, block), k_pool)
    out, indices = _run_chunks(fn, rows, seq_q, seq_kv - seq_q, (q,), shared, needs_grad)
    return out.to(q.dtype), indices

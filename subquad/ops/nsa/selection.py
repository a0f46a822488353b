"""Top-k block selection: the key blocks each query token attends to, one choice per token shared by the query
heads of its GQA group (NSA's selection; K/V of a chosen block are then read once for the whole group).

The rule, for a query token at position ``t`` and a KV head:

1. Importance of a summary key: each query head's softmax probability of it in the attention over the summary
   keys the token sees (NSA's compressed branch; ``topk_block_attention``'s mean-pooled keys), summed over the
   heads of the group (NSA, eq. 10).
2. Importance of selection block ``j`` (``block`` tokens): the importances of the compression blocks, each
   counted once per ``stride``-token segment it shares with ``j`` (NSA, eq. 9: with block 32, stride 16 and
   selection blocks of 64, the five compression blocks that overlap ``j`` weigh 1, 2, 2, 2, 1). With
   compression blocks equal to the selection blocks this is the identity.
3. Candidates: causal, the blocks that start at or before ``t``; otherwise every block.
4. Forced blocks come first, in this order: the query's own block ``t // block`` (the diagonal; causal only),
   then with ``initial_and_local`` (NSA) block 0 and the block before the query's own. The other candidates
   follow by importance, ties by lower index. The first ``top_k`` are kept.
5. Indices are returned in increasing order, ``-1`` after them where fewer than ``top_k`` blocks are candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OWN, INITIAL, PREVIOUS = 3, 2, 1


def block_importance(p: torch.Tensor, compress_block: int, compress_stride: int, block: int,
                     n_blocks: int) -> torch.Tensor:
    """``p`` ``(..., M)``: summary-key importances (compression block ``i`` covering tokens
    ``[i * stride, i * stride + compress_block)``) -> ``(..., n_blocks)`` selection-block importances."""
    span = compress_block // compress_stride          # segments per compression block
    per_block = block // compress_stride              # segments per selection block
    # segment u is covered by compression blocks u - span + 1 .. u
    segments = sum(F.pad(p, (shift, span - 1 - shift)) for shift in range(span))
    segments = F.pad(segments, (0, n_blocks * per_block - segments.shape[-1]))
    return segments.view(*p.shape[:-1], n_blocks, per_block).sum(-1)


def select_blocks(importance: torch.Tensor, q_pos: torch.Tensor, block: int, top_k: int, *, causal: bool,
                  initial_and_local: bool, bound: float) -> torch.Tensor:
    """``importance`` ``(B, C, H_kv, n_blocks)`` of the queries at ``q_pos`` ``(C,)`` -> indices
    ``(B, C, H_kv, top_k)`` int64 by the module's rule. ``bound``: more than any importance can be (the
    forced blocks are ranked above it)."""
    n_blocks = importance.shape[-1]
    j = torch.arange(n_blocks, device=importance.device)
    tier = torch.zeros(q_pos.numel(), n_blocks, device=importance.device, dtype=importance.dtype)
    candidate = torch.ones_like(tier, dtype=torch.bool)
    if causal:
        own = (q_pos // block).view(-1, 1)
        candidate = j * block <= q_pos.view(-1, 1)
        if initial_and_local:
            tier = torch.where(j == own - 1, PREVIOUS, tier)
            tier = torch.where(j == 0, INITIAL, tier)
        tier = torch.where(j == own, OWN, tier)
    key = (importance + tier.view(1, -1, 1, n_blocks) * bound).masked_fill(~candidate.view(1, -1, 1, n_blocks),
                                                                            float("-inf"))
    kept = min(top_k, n_blocks)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :kept]
    chosen = torch.where(key.gather(-1, order) == float("-inf"), n_blocks, order)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == n_blocks, -1, chosen)
    return F.pad(chosen, (0, top_k - kept), value=-1)


def select_nsa(p: torch.Tensor, q_pos: torch.Tensor, *, compress_block: int, compress_stride: int, block: int,
               top_k: int, n_blocks: int) -> torch.Tensor:
    """NSA's selection for a chunk of queries at ``q_pos`` ``(C,)`` from their compressed-branch probabilities
    ``p`` ``(B, C, H_kv, G, M)``: every query-side rule of the module, with the initial and local blocks forced.
    Returns ``(B, C, H_kv, top_k)`` int64."""
    importance = block_importance(p.sum(3), compress_block, compress_stride, block, n_blocks)
    # each head's probabilities sum to at most 1, and a compression block counts at most compress_block / stride
    # times
    bound = float(p.shape[3] * (compress_block // compress_stride) + 1)
    return select_blocks(importance, q_pos, block, top_k, causal=True, initial_and_local=True, bound=bound)


def select_topk(q_scaled: torch.Tensor, k_pool: torch.Tensor, pool_ends: torch.Tensor, q_pos: torch.Tensor, *,
                block: int, top_k: int, causal: bool) -> torch.Tensor:
    """``topk_block_attention``'s selection for a chunk of queries ``q_scaled`` ``(B, C, H_kv, G, D)`` (already
    multiplied by the scale) at ``q_pos``: their softmax over the mean-pooled keys ``k_pool`` ``(B, n_blocks,
    H_kv, D)`` (causal: the complete blocks, ``pool_ends <= q_pos``; the query's own block is forced in).
    Returns ``(B, C, H_kv, top_k)`` int64."""
    s = torch.einsum("bchgd,bkhd->bchgk", q_scaled, k_pool.to(q_scaled.dtype))
    if causal:
        s = s.masked_fill((pool_ends.view(1, -1) > q_pos.view(-1, 1)).view(1, q_pos.numel(), 1, 1, -1),
                          float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    total = p.sum(-1, keepdim=True)
    importance = (p / torch.where(total == 0, 1.0, total)).sum(3)
    return select_blocks(importance, q_pos, block, top_k, causal=causal, initial_and_local=False,
                         bound=float(q_scaled.shape[3] + 1))

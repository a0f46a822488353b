"""LSH attention on the flash kernels: every (sequence, head, hash round) is one batch element of a single launch.

Each element's queries, keys and values are gathered in its round's sorted order; one BlockMask, the same for
every element, lists per query block the key blocks of its chunks and of the chunks before (all partial). Inside
them the kernels' ``LSH`` term keeps a round's window, drops the pairs of earlier rounds (read from tables of each
token's chunk in those rounds, laid out in the element's sorted order: ``earlier_chunks``) and, for shared QK, the
self pair; causality is the ``causal`` band on the original positions, a row of them per element (``BATCH_POS``).
Outputs and LSEs go back to position order and the rounds merge by LSE, as in the reference.

Shared QK sorts per KV head, and the group's query heads ride along (GQA stays in the kernel); otherwise each
query head has its own order, and its KV head's keys and values are gathered for it (``heads_q / heads_kv``
copies).
"""

from __future__ import annotations

import functools

import torch

from ... import masks
from ...masks import PARTIAL, BlockMask
from ..softmax.flash import MASK_BLOCK, SMALL_MASK_BLOCK, LshWindows, _mask_block, flash_attention_lsh
from ..softmax.lse_merge import merge_lse_stacked
from .hashing import SortedRounds
from .reference import self_when_alone


@functools.lru_cache(maxsize=32)
def chunk_block_mask(seq: int, chunk: int, block: int, causal: bool, device: torch.device) -> BlockMask:
    """The BlockMask of the sorted order: per query block, the key blocks from the chunk before its first
    chunk to its last chunk, all partial (the ``LSH`` term decides each pair)."""
    n_blocks = -(-seq // block)
    q_first = torch.arange(n_blocks, device=device) * block
    q_last = torch.clamp(q_first + block, max=seq) - 1
    k_first = torch.clamp(q_first // chunk - 1, min=0) * chunk
    k_last = torch.clamp((q_last // chunk + 1) * chunk, max=seq) - 1
    kb_first, kb_last = q_first.view(1, -1), q_last.view(1, -1)
    visited = (kb_last >= k_first.view(-1, 1)) & (kb_first <= k_last.view(-1, 1))
    kind = (visited.to(torch.int8) * PARTIAL).view(1, 1, n_blocks, n_blocks)
    return BlockMask(masks.causal if causal else masks.full, kind, seq, seq, block, block, 1, 1)


def _block(chunk: int, device) -> int:
    """BlockMask blocks of whole chunks where chunks are whole 128-blocks, else 64 (a 128-block of 64-chunks
    visits twice the pairs it needs); the interpreter's small blocks under it."""
    block = _mask_block(device)
    if block != MASK_BLOCK:
        return block
    return MASK_BLOCK if chunk % MASK_BLOCK == 0 else SMALL_MASK_BLOCK


def _gather(x: torch.Tensor, head: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(B, N, H, W)``: for each (batch, folded head, round) of ``order`` ``(B, F, R, N)``, head
    ``head[f]``'s vectors in that order, as ``(B * F * R, N, W)``."""
    bsz, seq, heads, width = x.shape
    index = (order * heads + head.view(1, -1, 1, 1)).reshape(bsz, -1, 1).expand(-1, -1, width)
    return x.reshape(bsz, seq * heads, width).gather(1, index).view(-1, seq, width)


#: an earlier-round row of the queries' chunk table for a round that is not earlier: 2 or more below any key's
#: chunk, so that the kernels' test ``0 <= q - k <= 1`` finds no pair there
NOT_EARLIER = -2


def earlier_chunks(rank: torch.Tensor, order: torch.Tensor, chunk: int, queries: bool) -> torch.Tensor:
    """The kernels' chunk table of one side (``LshWindows``): for each (batch, head, round) of ``order`` ``(B, F,
    R, N)`` and each round ``s < R - 1``, the chunk in round ``s`` (``rank // chunk``) of the token at each sorted
    index of the round, as ``(B * F * R, R - 1, N)`` int32; ``queries``: ``NOT_EARLIER`` where ``s`` is not
    before the round (the keys' table need not say: the queries' decides)."""
    bsz, heads, rounds, seq = order.shape
    chunk_of = (rank[:, :, :rounds - 1] // chunk).to(torch.int32)
    table = chunk_of.unsqueeze(2).expand(-1, -1, rounds, -1, -1).gather(
        -1, order.unsqueeze(3).expand(-1, -1, -1, rounds - 1, -1))
    if queries:
        slot = torch.arange(rounds - 1, device=order.device)
        later = slot.view(1, -1) >= torch.arange(rounds, device=order.device).view(-1, 1)
        table = table.masked_fill(later.view(1, 1, rounds, rounds - 1, 1), NOT_EARLIER)
    return table.view(bsz * heads * rounds, rounds - 1, seq)


def lsh_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rounds: SortedRounds,
                        k_rounds: SortedRounds, chunk: int, causal: bool, exclude_self: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``lsh_attention_reference``'s contract (fp16 / bf16)."""
    bsz, seq, heads_q, head_dim = q.shape
    heads_kv, dv = k.shape[2], v.shape[3]
    group = heads_q // heads_kv
    n_rounds = k_rounds.order.shape[2]
    if exclude_self:        # one order per KV head, its query heads together
        folded, per_element = heads_kv, group
        kv_head = torch.arange(heads_kv, device=q.device)
        q_order, q_rank, k_order, k_rank = k_rounds.order, k_rounds.rank, k_rounds.order, k_rounds.rank
        qf = _gather(q.reshape(bsz, seq, heads_kv, group * head_dim), kv_head, q_order)
    else:                   # one order per query head
        folded, per_element = heads_q, 1
        kv_head = torch.arange(heads_q, device=q.device) // group
        q_order, q_rank = q_rounds.order, q_rounds.rank
        k_order, k_rank = (t.repeat_interleave(group, dim=1) for t in k_rounds)
        qf = _gather(q, torch.arange(heads_q, device=q.device), q_order)
    elements = bsz * folded * n_rounds
    qf = qf.view(elements, seq, per_element, head_dim)
    kf = _gather(k, kv_head, k_order).view(elements, seq, 1, head_dim)
    vf = _gather(v, kv_head, k_order).view(elements, seq, 1, dv)
    flat = lambda t: t.reshape(elements, seq)  # noqa: E731
    windows = LshWindows(earlier_chunks(q_rank, q_order, chunk, True), earlier_chunks(k_rank, k_order, chunk, False),
                         n_rounds, chunk, exclude_self)
    block_mask = chunk_block_mask(seq, chunk, _block(chunk, q.device), causal, masks.canonical_device(q.device))
    out, lse = flash_attention_lsh(qf, kf, vf, block_mask, scale, flat(q_order), flat(k_order), windows,
                                   deterministic=torch.are_deterministic_algorithms_enabled())
    # back to position order, then (B, rounds, N, Hq, Dv) / (B, rounds, Hq, N) for the merge
    rank = flat(q_rank)
    out = out.gather(1, rank.view(elements, seq, 1, 1).expand(-1, -1, per_element, dv))
    lse = lse.gather(2, rank.view(elements, 1, seq).expand(-1, per_element, -1))
    out = out.view(bsz, folded, n_rounds, seq, per_element, dv).permute(0, 2, 3, 1, 4, 5)
    lse = lse.view(bsz, folded, n_rounds, per_element, seq).permute(0, 2, 1, 3, 4)
    out, lse = merge_lse_stacked(out.reshape(bsz, n_rounds, seq, heads_q, dv),
                                 lse.reshape(bsz, n_rounds, heads_q, seq), q.dtype)
    if exclude_self:
        out, lse = self_when_alone(out, lse, q, k, v, scale)
    return out, lse

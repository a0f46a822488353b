"""Reformer's LSH attention in plain PyTorch: the CPU path and the specification of the Triton path.

Given each round's sort of the queries and of the keys (``hashing.sort_rounds``), a query at sorted index ``i``
of round ``r`` sees the keys whose sorted index lies in its chunk or the chunk before (``i // chunk - 1 <=
j // chunk <= i // chunk``). A round's first chunk looks back at nothing: trax and Hugging Face sort all rounds
as one sequence, so that there it looks back at the previous round's last chunk (round 0's at the last round's).
Causality and "not to itself" are decided on the original positions.

The rounds are combined as one softmax over the union of the pairs they found, each pair once: round ``r``
keeps only the pairs that no earlier round found (exact de-duplication; the Reformer paper subtracts ``log`` of
a pair's round count from its score in every round that found it, which sums to the same softmax; Hugging
Face's Reformer counts a pair once per round that finds it), so the rounds' pair sets are disjoint and their
results merge by log-sum-exp.

With shared QK (``exclude_self``) a token never attends to itself while it has another key in some round; a
query with no other key attends to itself alone (output its own value, LSE its own score), as the paper says.
Reformer's code masks the self pair with a large finite negative score (Hugging Face: -1e5 in fp32), whose
limit this is. Without shared QK a query that finds no key gets output 0 and LSE -inf.

Memory is O(N * chunk) per round: the scores of each chunk of queries against its two chunks of keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..softmax.lse_merge import merge_lse_stacked
from .hashing import SortedRounds


def by_query_head(rounds: SortedRounds, heads_q: int) -> SortedRounds:
    """A KV head's sort, repeated for each query head of its group."""
    group = heads_q // rounds.order.shape[1]
    return SortedRounds(*(t.repeat_interleave(group, dim=1) for t in rounds))


def _gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, H, D)`` at ``positions`` ``(B, H, *idx)`` (-1: none, read as position 0) -> ``(B, H, *idx,
    D)``."""
    bsz, heads = positions.shape[:2]
    flat = positions.clamp(min=0).reshape(bsz, heads, -1, 1).expand(-1, -1, -1, x.shape[-1])
    return x.transpose(1, 2).gather(2, flat).view(*positions.shape, x.shape[-1])


def _gather_chunk(chunk_of: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``chunk_of`` ``(B, H, N)`` at ``positions`` ``(B, H, ...)`` (-1 reads position 0: those pairs are masked)."""
    flat = positions.clamp(min=0).reshape(*positions.shape[:2], -1)
    return chunk_of.gather(2, flat).view(positions.shape)


def _found_in_round(q_chunk: torch.Tensor, k_chunk: torch.Tensor) -> torch.Tensor:
    """Whether a round put the key in the query's chunk or the chunk before, from their chunks in it."""
    gap = q_chunk - k_chunk
    return (gap >= 0) & (gap <= 1)


def self_when_alone(out, lse, q, k, v, scale: float):
    """Shared QK: a query whose union of keys is empty attends to itself (output its value, LSE its score)."""
    group = q.shape[2] // k.shape[2]
    alone = torch.isneginf(lse).transpose(1, 2).unsqueeze(-1)                    # (B, N, Hq, 1)
    k_q, v_q = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    own_score = (q.float() * k_q.float()).sum(-1).transpose(1, 2) * scale       # (B, Hq, N)
    out = torch.where(alone, v_q.to(out.dtype), out)
    lse = torch.where(alone.squeeze(-1).transpose(1, 2), own_score, lse)
    return out, lse


def lsh_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rounds: SortedRounds,
                            k_rounds: SortedRounds, chunk: int, causal: bool, exclude_self: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, N, Hq, Dv) in q's dtype, lse (B, Hq, N) fp32)``. ``q_rounds``: the queries' sort per query
    head or per KV head (shared QK: the keys' sort, which a group's query heads follow); ``k_rounds``: per KV
    head. ``k`` is the keys as attended (length-normalised for shared QK)."""
    bsz, seq, heads_q, _ = q.shape
    qr, kr = by_query_head(q_rounds, heads_q), by_query_head(k_rounds, heads_q)
    group = heads_q // k.shape[2]
    k_q, v_q = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    n_chunks = -(-seq // chunk)
    pad = n_chunks * chunk - seq
    q_chunk, k_chunk = qr.rank // chunk, kr.rank // chunk                    # (B, Hq, rounds, N)
    outs, lses = [], []
    for r in range(qr.order.shape[2]):
        # each round's sorted positions in whole chunks (-1: past the last token)
        q_pos = F.pad(qr.order[:, :, r], (0, pad), value=-1).view(bsz, heads_q, n_chunks, chunk)
        own = F.pad(kr.order[:, :, r], (0, pad), value=-1).view(bsz, heads_q, n_chunks, chunk)
        before = F.pad(own, (0, 0, 1, 0), value=-1)[:, :, :-1]
        k_pos = torch.cat([before, own], -1)                                  # (B, Hq, chunks, 2 chunk)
        qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
        keep = (qp >= 0) & (kp >= 0)
        if causal:
            keep = keep & (kp <= qp)
        if exclude_self:
            keep = keep & (kp != qp)
        for earlier in range(r):
            seen = _found_in_round(_gather_chunk(q_chunk[:, :, earlier], q_pos).unsqueeze(-1),
                                   _gather_chunk(k_chunk[:, :, earlier], k_pos).unsqueeze(-2))
            keep = keep & ~seen
        scores = torch.einsum("bhcid,bhcjd->bhcij", _gather_positions(q, q_pos).float(),
                              _gather_positions(k_q, k_pos).float()) * scale
        scores = scores.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        empty = torch.isneginf(lse)
        probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
        out = torch.einsum("bhcij,bhcjd->bhcid", probs, _gather_positions(v_q, k_pos).float())
        # back from sorted order to positions
        rank = qr.rank[:, :, r]
        out = out.reshape(bsz, heads_q, -1, out.shape[-1]).gather(2, rank.unsqueeze(-1).expand(-1, -1, -1,
                                                                                                out.shape[-1]))
        outs.append(out.transpose(1, 2))
        lses.append(lse.reshape(bsz, heads_q, -1).gather(2, rank))
    out, lse = merge_lse_stacked(torch.stack(outs, 1), torch.stack(lses, 1), q.dtype)
    if exclude_self:
        out, lse = self_when_alone(out, lse, q, k, v, scale)
    return out, lse

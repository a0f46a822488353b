"""Decode in plain PyTorch, for every cache layout: the specification of the split-KV kernel.

Each sequence's kept keys are gathered in position order (``KVView.dense``), padded to one length, and handed
to the softmax reference with a ``score_mod`` that places every sequence's keys and new queries at that
sequence's own positions: key ``j`` of sequence ``b`` at ``j - kept[b]`` from the sequence's end, new query
``i`` of ``T`` at ``i - T``. Causality, the sliding window and ALiBi see differences of those positions.
Nothing is read back to the host but the padded length (none when traced: the storage's length), so a
compiled decoding step runs it whole.
"""

from __future__ import annotations

import torch

from ..softmax import attention


def decode_reference(q: torch.Tensor, view, *, window: int | None, scale: float, softcap: float | None,
                     alibi_slopes: torch.Tensor | None, pattern=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, T, H_q, D_v)``, ``lse (B, H_q, T)``. A new token at a position below 0 (a sequence with
    fewer tokens than ``T``, e.g. a freed slot of a batch) sees no key: zeros, LSE ``-inf``, as in the
    kernel. ``pattern``: a prepared ``subquad.masks`` pattern that also decides each pair, its predicate
    evaluated at the sequence's absolute positions (the new tokens end at ``view.seqlens``)."""
    k, v, lengths = view.dense()
    t, n = q.shape[1], k.shape[1]
    if n == 0:
        bsz, _, hq, _ = q.shape
        return (q.new_zeros(bsz, t, hq, v.shape[3]),
                torch.full((bsz, hq, t), float("-inf"), dtype=torch.float32, device=q.device))
    kept = lengths.long()
    total = view.seqlens.long()
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().view(-1 if alibi_slopes.dim() == 2 else 1, q.shape[2])

    def place(score, b, h, q_idx, k_idx):
        # the reference puts query i at n - t + i and key j at j; shift both to the sequence's end
        end = kept[b]
        q_pos, k_pos = q_idx - n, k_idx - end
        keep = (k_idx < end) & (q_pos + end >= 0) & (k_pos <= q_pos)
        if window is not None:
            keep = keep & (q_pos - k_pos < window)
        if pattern is not None:
            keep = keep & pattern.predicate(b, h, q_pos + total[b], k_pos + total[b])
        if slopes is not None:
            score = score - slopes[b if slopes.shape[0] > 1 else 0, h] * (q_pos - k_pos).abs()
        return torch.where(keep, score, float("-inf"))

    return attention(q, k, v, scale=scale, softcap=softcap, score_mod=place, return_lse=True, backend="reference")

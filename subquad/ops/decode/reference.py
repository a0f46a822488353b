"""Decode in plain PyTorch, for every cache layout: the specification of the split-KV kernel.

Each sequence's kept keys are gathered in position order (``KVView.dense``) and handed to the softmax
reference with the new queries aligned to the end (causal among them), plus the sliding window if any.
Positions are relative to the first kept key, which changes nothing: causality, windows and ALiBi only see
differences of positions.
"""

from __future__ import annotations

import torch

from ... import masks
from ..softmax import attention


def decode_reference(q: torch.Tensor, view, *, window: int | None, scale: float, softcap: float | None,
                     alibi_slopes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, T, H_q, D_v)``, ``lse (B, H_q, T)``; one sequence at a time (lengths differ). A new token
    at a position below 0 (a sequence with fewer tokens than ``T``, e.g. a freed slot of a batch) sees no
    key: zeros, LSE ``-inf``, as in the kernel."""
    k, v, lengths = view.dense()
    mask = masks.sliding_window(window) if window is not None else None
    bsz, t = q.shape[:2]
    out = q.new_zeros(bsz, t, q.shape[2], v.shape[3], dtype=q.dtype)
    lse = torch.full((bsz, q.shape[2], t), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(lengths.tolist()):
        rows = min(t, n)        # the new tokens at positions >= 0
        if rows == 0:
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b if alibi_slopes.dim() == 2 and alibi_slopes.shape[0] > 1 else 0] \
                if alibi_slopes.dim() == 2 else alibi_slopes
        out[b:b + 1, t - rows:], lse[b:b + 1, :, t - rows:] = attention(
            q[b:b + 1, t - rows:], k[b:b + 1, :n], v[b:b + 1, :n], causal=True, mask=mask, scale=scale,
            softcap=softcap, alibi_slopes=slopes, return_lse=True, backend="reference")
    return out, lse

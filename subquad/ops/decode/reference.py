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
    """``out (B, T, H_q, D_v)``, ``lse (B, H_q, T)``; one sequence at a time (lengths differ)."""
    k, v, lengths = view.dense()
    mask = masks.sliding_window(window) if window is not None else None
    outs, lses = [], []
    for b, n in enumerate(lengths.tolist()):
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b if alibi_slopes.dim() == 2 and alibi_slopes.shape[0] > 1 else 0] \
                if alibi_slopes.dim() == 2 else alibi_slopes
        o, lse = attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True, mask=mask, scale=scale,
                           softcap=softcap, alibi_slopes=slopes, return_lse=True, backend="reference")
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)

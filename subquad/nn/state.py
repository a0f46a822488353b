"""The cache of a recurrent token mixer: its fp32 state, its short-convolution tail, and the tokens seen.

A KV cache grows with the sequence; this one does not, which is why decoding a recurrent mixer costs O(1) per
token. Layers update it in place, as the KV caches are updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RecurrentState:
    """Attributes:
        batch: sequences in the batch.
        kind: the class name of the layer that made it (a layer refuses another layer's state).
        state: the recurrence's state, ``(batch, heads, d_k, d_v)`` fp32 (linear attention with normalisation:
            the pair ``(S, z)``); None before the first token.
        conv: the short convolution's last inputs ``(batch, kernel_size - 1, channels)``, or None.
        position: tokens seen so far (the absolute position of the next one: RoPE, cosFormer).
    """

    batch: int
    kind: str
    state: Any = None
    conv: torch.Tensor | None = None
    position: int = 0

    def reset(self) -> None:
        self.state, self.conv, self.position = None, None, 0

    @property
    def nbytes(self) -> int:
        parts = list(self.state) if isinstance(self.state, tuple) else [self.state]
        parts.append(self.conv)
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def check_recurrent_cache(cache, layer, batch: int) -> RecurrentState | None:
    """``cache`` must be None or a RecurrentState made by a layer of ``layer``'s class for ``batch`` sequences."""
    if cache is None:
        return None
    kind = type(layer).__name__
    if not isinstance(cache, RecurrentState) or cache.kind != kind:
        got = cache.kind if isinstance(cache, RecurrentState) else type(cache).__name__
        raise ValueError(f"cache: expected the RecurrentState of a {kind} layer (from its new_cache()), got {got}")
    if cache.batch != batch:
        raise ValueError(f"cache: expected a cache for batch {batch}, got one for batch {cache.batch}")
    return cache

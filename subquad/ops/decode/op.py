"""The split-KV decode kernel as a ``torch.library`` custom op, so that a compiled decoding step
(``torch.compile`` of a model's one-token forward over its caches) runs it without a graph break.

Eager calls launch it directly (``decode_splitkv``): the op's dispatch is host time that a decoding step,
tens of microseconds of kernel, would feel. Traced calls pass the view's tensors and no host lengths
(``max_seqlen`` None: the grid covers the storage, and programs past a sequence's end return at once), and
take the default launch options.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...cache import KVView
from .splitkv import decode_splitkv


@torch.library.custom_op("subquad::decode_splitkv", mutates_args=())
def decode_op(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, block_table: Optional[Tensor],
              alibi_slopes: Optional[Tensor], layout: str, cache_window: int, window: int, scale: float,
              softcap: float) -> tuple[Tensor, Tensor]:
    """``window``, ``cache_window``: 0 for none; ``softcap`` 0 for none."""
    view = KVView(k, v, seqlens, layout, block_table=block_table, window=cache_window or None)
    return decode_splitkv(q, view, window=window or None, scale=scale, softcap=softcap or None,
                          alibi_slopes=alibi_slopes, own_counters=True)


@decode_op.register_fake
def _decode_fake(q, k, v, *args):
    bsz, t, hq, _ = q.shape
    return q.new_empty(bsz, t, hq, v.shape[3]), q.new_empty(bsz, hq, t, dtype=torch.float32)


def decode_traced(q: Tensor, view: KVView, *, window: int | None, scale: float, softcap: float | None,
                  alibi_slopes: Tensor | None) -> tuple[Tensor, Tensor]:
    """``decode_splitkv`` through the custom op (what ``subquad.decode`` calls while tracing)."""
    return decode_op(q, view.k, view.v, view.seqlens, view.block_table, alibi_slopes, view.layout,
                     view.window or 0, window or 0, scale, softcap or 0.0)

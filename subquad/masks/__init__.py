"""Attention patterns and their block summaries.

A pattern is a small predicate on (batch, head, query position, key position) that compiles into a
``BlockMask``; patterns compose with ``|`` and ``&`` and negate with ``~``::

    from subquad import masks
    m = masks.longformer(window=512, global_tokens=[0]) & masks.document(seq_ids)
    bm = m.block_mask(seq_q=4096)          # BlockMask: full / partial key blocks per query block
    bm.density(), bm.plot("mask.png")
    far = masks.causal & ~masks.sliding_window(256)   # only the keys 256 or more positions back

A query that a pattern leaves no key (``far``'s first 256) gets a zero output and an LSE of -inf.
"""

from __future__ import annotations

import torch

from .block_mask import EMPTY, FULL, PARTIAL, BlockMask, canonical_device
from .named import (
    bigbird,
    block_sparse,
    causal,
    dilated,
    document,
    fixed,
    from_predicate,
    from_tensor,
    full,
    longformer,
    padding,
    prefix_lm,
    sliding_window,
    strided,
    window,
)
from .composition import Complement
from .patterns import Band, BuildContext, Pattern, Tensor

#: ``resolve``'s ``causal`` argument shadows the pattern's name there (and dynamo cannot trace ``globals()``)
_CAUSAL_PATTERN = causal

__all__ = [
    "BlockMask", "Pattern", "Band", "Complement", "BuildContext", "EMPTY", "PARTIAL", "FULL",
    "causal", "full", "sliding_window", "strided", "fixed", "dilated", "block_sparse", "longformer", "bigbird",
    "document", "padding", "prefix_lm", "window", "from_tensor", "from_predicate", "resolve", "and_causal",
]


def and_causal(pattern: Pattern) -> Pattern:
    """``pattern & causal``, made once per pattern and kept on it, so that what is derived from it (its kernel
    terms, plans) is kept too: a traced call (torch.compile) then finds it instead of rebuilding it."""
    kept = pattern.memo("_and_causal")
    if "pattern" not in kept:
        kept["pattern"] = pattern & _CAUSAL_PATTERN
    return kept["pattern"]


def check_prebuilt(mask: BlockMask, *, causal: bool, batch: int, heads: int, seq_q: int, seq_kv: int) -> None:
    """A prebuilt BlockMask fits the call, whatever backend runs it (FA4 and flex rebuild one on their own
    tiles from its pattern, and had taken its shape and ``causal`` on trust)."""
    if not mask.matches(batch, heads, seq_q, seq_kv):
        raise ValueError(f"mask: expected a BlockMask for seq_q={seq_q}, seq_kv={seq_kv}, batch in "
                         f"(1, {batch}), heads in (1, {heads}); got seq_q={mask.seq_q}, seq_kv={mask.seq_kv}, "
                         f"kind {tuple(mask.kind.shape)}")
    if causal:
        raise ValueError("causal: pass causal=False with a prebuilt BlockMask (build it from "
                         "pattern & masks.causal instead)")


def as_pattern(mask, causal: bool) -> Pattern:
    """``attention``'s ``mask`` (a pattern, a bool tensor, a predicate; not None unless ``causal``) as one
    pattern, intersected with causality when ``causal``. A tensor is not copied (a pattern made per call)."""
    if mask is None:
        return _CAUSAL_PATTERN
    if isinstance(mask, Pattern):
        pattern = mask
    elif isinstance(mask, torch.Tensor):
        pattern = Tensor(mask)
    elif callable(mask):
        pattern = from_predicate(mask)
    else:
        raise ValueError(f"mask: expected a subquad.masks pattern, a BlockMask, a bool tensor or a predicate, "
                         f"got {type(mask).__name__}")
    return and_causal(pattern) if causal else pattern


def resolve(mask, *, causal: bool, batch: int, heads: int, seq_q: int, seq_kv: int, device,
            block_q: int = 128, block_kv: int = 128) -> BlockMask | None:
    """Turn ``attention``'s ``causal``/``mask`` arguments into a BlockMask (None for full attention).

    Patterns cache their BlockMask per call signature, so building one costs once per shape.
    """
    if mask is None and not causal:
        return None
    if isinstance(mask, BlockMask):
        check_prebuilt(mask, causal=causal, batch=batch, heads=heads, seq_q=seq_q, seq_kv=seq_kv)
        return mask.to(device)
    pattern = as_pattern(mask, causal)
    if causal and mask is not None:
        cache_owner = mask if isinstance(mask, Pattern) else None
        key_tag = "causal"
    else:
        cache_owner, key_tag = pattern, ""
    key = (key_tag, batch, heads, seq_q, seq_kv, block_q, block_kv, str(canonical_device(device)))
    cache = cache_owner.memo("_block_masks") if cache_owner is not None else None
    if cache is not None and key in cache:
        return cache[key]
    bm = BlockMask.build(pattern, batch=batch, heads=heads, seq_q=seq_q, seq_kv=seq_kv,
                         block_q=block_q, block_kv=block_kv, device=device)
    if cache is not None:
        if len(cache) > 64:
            cache.clear()
        cache[key] = bm
    return bm

"""FlexAttention's API over subquad: ``from subquad.integrations.flex_attention import flex_attention,
create_block_mask, and_masks, or_masks, noop_mask``.

The functions keep ``torch.nn.attention.flex_attention``'s names, signatures and conventions (``(batch, heads,
seq, head_dim)`` layouts, ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)`` on
flex's indices, ``q_idx`` counted from 0 whatever the lengths, B/H None broadcast, GQA only with
``enable_gqa=True``, a query that sees no key giving zeros and an LSE of -inf) and run ``subquad.attention``.
``flex_attention`` takes one more keyword, ``backend`` (subquad's: ``"auto"``, ``"triton"``, ``"reference"``,
...; a ``score_mod`` runs on ``"flex"`` or ``"reference"``).

What differs: ``create_block_mask`` returns this module's ``BlockMask``, subquad patterns for the call's lengths
(subquad builds its own block map, at its own block size, when the call runs: ``BLOCK_SIZE``, ``device`` and
``_compile`` are accepted and unused, as is ``kernel_options``); with ``Q_LEN > KV_LEN`` the queries run in chunks
of ``KV_LEN``, a call each (subquad aligns queries to the end of the keys, so under a mask it places no more
queries than keys). PyTorch's own ``BlockMask`` is taken too, kept exactly as flex reads it: a pair is kept where
its block is one of the mask's full blocks, or one of its partial blocks and ``mask_mod`` holds (so masks from
``BlockMask.from_kv_blocks``, whose mask_mod keeps everything, keep their blocks whole). The LSE comes back with
``return_lse=True``; flex's ``return_aux`` is not taken.
"""

from __future__ import annotations

import functools

import torch

from ..masks.patterns import Predicate
from ..ops.softmax import attention

__all__ = ["BlockMask", "create_block_mask", "flex_attention", "and_masks", "or_masks", "noop_mask"]


def noop_mask(b, h, q_idx, kv_idx):
    """Every key for every query (flex's ``noop_mask``)."""
    return b.new_ones(size=(), dtype=torch.bool, device=b.device)


def _no_mask(b, h, q_idx, kv_idx):
    return b.new_zeros(size=(), dtype=torch.bool, device=b.device)


def _check_mods(mods):
    for mod in mods:
        if not callable(mod):
            raise ValueError(f"mask_mods: expected callables mask_mod(b, h, q_idx, kv_idx), got {mod!r}")


def and_masks(*mask_mods):
    """The pairs every ``mask_mod`` keeps (none given: all)."""
    _check_mods(mask_mods)

    def and_mask(b, h, q_idx, kv_idx):
        return functools.reduce(lambda acc, mod: acc & mod(b, h, q_idx, kv_idx), mask_mods,
                                noop_mask(b, h, q_idx, kv_idx))
    return and_mask


def or_masks(*mask_mods):
    """The pairs any ``mask_mod`` keeps (none given: none)."""
    _check_mods(mask_mods)

    def or_mask(b, h, q_idx, kv_idx):
        return functools.reduce(lambda acc, mod: acc | mod(b, h, q_idx, kv_idx), mask_mods,
                                _no_mask(b, h, q_idx, kv_idx))
    return or_mask


class BlockMask:
    """``create_block_mask``'s result (not ``subquad.masks.BlockMask``, which subquad builds from a pattern per
    call): ``mask_mod`` as subquad patterns for ``Q_LEN`` queries against ``KV_LEN`` keys, one per chunk of at
    most ``KV_LEN`` queries (``chunks``: ``(start, stop, pattern)``; a single chunk unless ``Q_LEN > KV_LEN``)."""

    def __init__(self, mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE):
        self.mask_mod, self.B, self.H, self.BLOCK_SIZE = mask_mod, B, H, BLOCK_SIZE
        self.seq_lengths = (Q_LEN, KV_LEN)
        # subquad places no more queries than keys under a mask, at the end of the keys: more queries run as
        # chunks of KV_LEN, each its own call
        self.chunks = [(start, min(start + KV_LEN, Q_LEN), self._pattern(start, min(start + KV_LEN, Q_LEN)))
                       for start in range(0, Q_LEN, KV_LEN)]

    def _pattern(self, start: int, stop: int) -> Predicate:
        mask_mod, kv_len = self.mask_mod, self.seq_lengths[1]
        # subquad hands the predicate absolute positions, the chunk's query i at i + KV_LEN - (stop - start);
        # flex's q_idx is start + i
        offset = query_offset(kv_len, start, stop)
        # B or H of None (or 1, as flex's BlockMask stores None) broadcast: flex then calls mask_mod with index 0
        by_batch, by_head = self.B not in (None, 1), self.H not in (None, 1)

        def on_flex_indices(b, h, q, k):
            return mask_mod(b if by_batch else torch.zeros_like(b), h if by_head else torch.zeros_like(h),
                            q - offset, k)

        return Predicate(on_flex_indices, name=getattr(mask_mod, "__name__", "mask_mod"),
                         varies_with_batch=by_batch, varies_with_heads=by_head)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.B or 1, self.H or 1, *self.seq_lengths)

    def to_dense(self) -> torch.Tensor:
        """The kept pairs, ``shape`` bool (small lengths only: it is Q_LEN x KV_LEN)."""
        b, h, _, kv_len = self.shape
        return torch.cat([pattern.to_dense(stop - start, kv_len, batch=b, heads=h)
                          for start, stop, pattern in self.chunks], dim=2)

    def check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        if self.seq_lengths != (q_len, kv_len) or self.shape[0] not in (1, batch) or self.shape[1] not in (1, heads):
            raise ValueError(f"block_mask: expected one made for B in (None, 1, {batch}), H in (None, 1, {heads}), "
                             f"Q_LEN={q_len}, KV_LEN={kv_len}; got shape {self.shape}")

    def __repr__(self):
        return f"BlockMask(shape={self.shape}, mask_mod={getattr(self.mask_mod, '__name__', 'mask_mod')})"


def query_offset(kv_len: int, start: int, stop: int) -> int:
    """subquad's position of queries ``start..stop`` (aligned to the end of ``kv_len`` keys) less flex's q_idx."""
    return kv_len - (stop - start) - start


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=128, _compile=False) -> BlockMask:
    """``torch.nn.attention.flex_attention.create_block_mask``: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, called
    with broadcastable int64 index tensors, ``q_idx`` in ``[0, Q_LEN)`` and ``kv_idx`` in ``[0, KV_LEN)``. B or H
    None: the same mask for every sequence / head. More queries than keys run in chunks of ``KV_LEN`` queries."""
    if not callable(mask_mod):
        raise ValueError(f"mask_mod: expected a callable mask_mod(b, h, q_idx, kv_idx), got {mask_mod!r}")
    for name, value in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    for name, value in (("B", B), ("H", H)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name}: expected None or a positive integer, got {value!r}")
    return BlockMask(mask_mod, B, H, Q_LEN, KV_LEN, BLOCK_SIZE)


def _is_torch_block_mask(block_mask) -> bool:
    kind = type(block_mask)
    return kind.__name__ == "BlockMask" and kind.__module__ == "torch.nn.attention.flex_attention"


def _block_map(num_blocks: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """flex's (num_blocks (B, H, nq), indices (B, H, nq, nk)) lists as a dense (B, H, nq, nk) bool map."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], indices.shape[-1] + 1, dtype=torch.bool, device=indices.device)
    # entries past a row's count may repeat listed blocks or hold anything: send them to a spare column
    dense.scatter_(-1, torch.where(listed, indices.long(), indices.shape[-1]), True)
    return dense[..., :-1]


def from_torch_block_mask(block_mask) -> BlockMask:
    """PyTorch's ``BlockMask`` as this module's: its partial blocks with its ``mask_mod``, its full blocks whole,
    every other block dropped, as flex runs it."""
    q_len, kv_len = block_mask.seq_lengths
    block_q, block_kv = block_mask.BLOCK_SIZE
    partial = _block_map(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = (_block_map(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
            if block_mask.full_kv_num_blocks is not None else torch.zeros_like(partial))
    mask_mod = block_mask.mask_mod
    batch, heads = partial.shape[:2]

    # the maps on each device the predicate is evaluated on (a BlockMask build calls it once per query block)
    maps = {partial.device: (full, partial)}

    def torch_block_mask(b, h, q, k):
        # a tile's padding past the lengths may be asked about too: its answer is never used
        blocks = (b % batch, h % heads, q.clamp(0, q_len - 1) // block_q, k.clamp(0, kv_len - 1) // block_kv)
        if q.device not in maps:
            maps[q.device] = (full.to(q.device), partial.to(q.device))
        kept_whole, kept_partly = (m[blocks] for m in maps[q.device])
        return kept_whole | (kept_partly & torch.as_tensor(mask_mod(b, h, q, k), dtype=torch.bool))

    torch_block_mask.__name__ = getattr(mask_mod, "__name__", "mask_mod")
    return BlockMask(torch_block_mask, batch if batch > 1 else None, heads if heads > 1 else None,
                     q_len, kv_len, (block_q, block_kv))


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, backend="auto"):
    """``torch.nn.attention.flex_attention.flex_attention``: query ``(B, Hq, L, E)``, key ``(B, Hkv, S, E)``, value
    ``(B, Hkv, S, Ev)``; ``Hq != Hkv`` only with ``enable_gqa``. Returns ``(B, Hq, L, Ev)``, or with
    ``return_lse`` ``(out, lse (B, Hq, L) fp32)``. ``kernel_options`` (flex's kernel tuning) is accepted and
    unused; ``backend`` is subquad's."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a tensor (batch, heads, seq, head_dim), got {shape}")
    if score_mod is not None and not callable(score_mod):
        # (checked here: the shift to flex's q_idx wraps it in a callable before attention sees it)
        raise ValueError(f"score_mod: expected a callable score_mod(score, b, h, q_idx, kv_idx), got {score_mod!r}")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise ValueError(f"kernel_options: expected None or a dict, got {type(kernel_options).__name__}")
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if key.shape[1] != heads and not enable_gqa:
        raise ValueError(f"enable_gqa: expected True for {heads} query heads over {key.shape[1]} key/value heads "
                         f"(as FlexAttention asks), got {enable_gqa!r}")
    chunks = [(0, q_len, None)]
    if block_mask is not None:
        if _is_torch_block_mask(block_mask):
            block_mask = from_torch_block_mask(block_mask)
        if not isinstance(block_mask, BlockMask):
            raise ValueError(f"block_mask: expected a BlockMask (this module's create_block_mask, or PyTorch's), "
                             f"got {type(block_mask).__module__}.{type(block_mask).__name__}")
        block_mask.check(batch, heads, q_len, kv_len)
        chunks = block_mask.chunks
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    results = [attention(q[:, start:stop], k, v, mask=pattern, scale=scale, return_lse=return_lse, backend=backend,
                         score_mod=_on_flex_indices(score_mod, kv_len, start, stop))
               for start, stop, pattern in chunks]
    if len(results) == 1:
        result = results[0]
    elif return_lse:
        result = torch.cat([out for out, _ in results], dim=1), torch.cat([lse for _, lse in results], dim=2)
    else:
        result = torch.cat(results, dim=1)
    if return_lse:
        out, lse = result
        return out.transpose(1, 2), lse.float()
    return result.transpose(1, 2)


def _on_flex_indices(score_mod, kv_len: int, start: int, stop: int):
    """``score_mod`` on flex's q_idx for queries ``start..stop`` (as the block mask's patterns shift theirs)."""
    offset = query_offset(kv_len, start, stop)
    if score_mod is None or offset == 0:
        return score_mod

    def shifted(score, b, h, q, k):
        return score_mod(score, b, h, q - offset, k)
    return shifted

"""From a pattern (or a BlockMask) to what the flash kernels read: in-kernel terms, block lists, bitmask tiles.

``kernel_terms`` recognises the patterns whose element predicate the kernels evaluate themselves (a band,
prefix-LM, documents, and intersections of those). Any other pattern — strided, fixed, dilated, Longformer,
BigBird, user tensors and predicates — gets a *bitmask*: for each PARTIAL block of the BlockMask, one bit per
(query, key) pair evaluated once from the element predicate and packed into int32 words; full blocks need
no bits and empty blocks are never visited. So every pattern runs through the same two kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....masks import PARTIAL, BlockMask
from ....masks.patterns import INF, Band, Document, Intersection, Named, Pattern, Union, _Prefix

#: band limits are clamped to this in the kernels (int32 arithmetic on positions stays exact)
BAND_INF = 1 << 30

#: predicate elements evaluated at once when building bitmask tiles
_BITS_CHUNK = 1 << 24


@dataclass(frozen=True)
class Terms:
    """The in-kernel form of a pattern: ``(lo <= q - k <= hi  or  k < prefix)  and  same document``."""

    lo: int = -INF
    hi: int = INF
    prefix: int = 0
    doc_ids: torch.Tensor | None = None

    @property
    def has_band(self) -> bool:
        return self.lo > -BAND_INF or self.hi < BAND_INF or self.prefix > 0

    @property
    def band(self) -> tuple[int, int]:
        return max(self.lo, -BAND_INF), min(self.hi, BAND_INF)


def kernel_terms(p: Pattern | None) -> Terms | None:
    """The kernel terms of ``p``, or None when the pattern needs a bitmask."""
    if p is None:
        return Terms()
    if isinstance(p, Named):
        return kernel_terms(p.inner)
    if isinstance(p, Band):
        return Terms(lo=p.lo, hi=p.hi)
    if isinstance(p, Document):
        ids = p.seq_ids if p.seq_ids.dim() == 2 else p.seq_ids.unsqueeze(0)
        return Terms(doc_ids=ids)
    if isinstance(p, Union):
        # prefix-LM: a band OR-ed with a run of leading key columns
        bands = [q for q in p.parts if isinstance(q, Band)]
        prefixes = [q for q in p.parts if isinstance(q, _Prefix)]
        if len(p.parts) == 2 and len(bands) == 1 and len(prefixes) == 1:
            return Terms(lo=bands[0].lo, hi=bands[0].hi, prefix=prefixes[0].length)
        return None
    if isinstance(p, Intersection):
        out = Terms()
        for part in p.parts:
            t = kernel_terms(part)
            if t is None:
                return None
            if t.doc_ids is not None and out.doc_ids is not None:
                return None
            if (t.prefix and (out.has_band or out.prefix)) or (out.prefix and t.has_band):
                # (band | prefix) & band is not of the kernel's form
                return None
            out = Terms(lo=max(out.lo, t.lo), hi=min(out.hi, t.hi), prefix=max(out.prefix, t.prefix),
                        doc_ids=t.doc_ids if t.doc_ids is not None else out.doc_ids)
        return out
    return None


def pure_band(p: Pattern | None) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``p`` is a band alone (full, causal, windows): no BlockMask is needed at all."""
    t = kernel_terms(p)
    if t is None or t.doc_ids is not None or t.prefix:
        return None
    return t.band


def bitmask_tiles(bm: BlockMask, q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None):
    """``(tile_of, bits)`` for the PARTIAL blocks of ``bm``: ``tile_of[b, h, qb, kb]`` (int32) numbers each
    partial block, ``bits[t, r, w]`` (int32) holds bit ``c % 32`` of word ``c // 32`` for the pair (row ``r``,
    column ``c``) of block ``t``. Cached on the BlockMask."""
    key = ("flash_bits", None if q_pos is None else q_pos.data_ptr(), None if kv_pos is None else kv_pos.data_ptr())
    if key in bm._cache:
        return bm._cache[key]
    dev = bm.kind.device
    bq, bk = bm.block_q, bm.block_kv
    words = bk // 32
    part = bm.kind == PARTIAL
    coords = part.nonzero()  # (T, 4): b, h, qb, kb
    tile_of = torch.zeros(bm.kind.shape, dtype=torch.int32, device=dev)
    tile_of[part] = torch.arange(coords.shape[0], dtype=torch.int32, device=dev)
    bits = torch.zeros(max(coords.shape[0], 1), bq, words, dtype=torch.int32, device=dev)
    r = torch.arange(bq, device=dev)
    c = torch.arange(bk, device=dev)
    weights = (1 << torch.arange(32, device=dev, dtype=torch.int64)).view(1, 1, 1, 32)
    step = max(1, _BITS_CHUNK // (bq * bk))
    for s in range(0, coords.shape[0], step):
        cb = coords[s:s + step]
        qi = cb[:, 2:3] * bq + r  # (t, bq) query indices
        ki = cb[:, 3:4] * bk + c  # (t, bk) key indices
        valid = (qi < bm.seq_q)[:, :, None] & (ki < bm.seq_kv)[:, None, :]
        qi, ki = qi.clamp(max=bm.seq_q - 1), ki.clamp(max=bm.seq_kv - 1)
        qp = qi + bm.q_offset if q_pos is None else q_pos.long()[qi]
        kp = ki if kv_pos is None else kv_pos.long()[ki]
        keep = bm.pattern.predicate(cb[:, 0].view(-1, 1, 1), cb[:, 1].view(-1, 1, 1), qp[:, :, None], kp[:, None, :])
        keep = torch.as_tensor(keep, device=dev).expand_as(valid) & valid
        packed = (keep.view(-1, bq, words, 32).to(torch.int64) * weights).sum(-1)
        # two's complement: bit 31 set makes a negative int32
        bits[s:s + step] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    bm._cache[key] = (tile_of, bits)
    return tile_of, bits

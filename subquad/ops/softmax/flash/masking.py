"""From a pattern (or a BlockMask) to what the flash kernels read: in-kernel terms, block lists, bitmask tiles.

``kernel_terms`` recognises the patterns whose element predicate the kernels evaluate themselves: a band,
OR-ed with leading key columns (prefix-LM), global keys and global queries (Longformer, BigBird) and a block
layout (BigBird's random blocks, block-sparse), optionally AND-ed with causal, AND-ed with documents; a
complemented band AND-ed with bands that leave it one side is a band too. Any other pattern — strided, fixed,
dilated, other complements, user tensors and predicates — gets a *bitmask*: for each PARTIAL
block of the BlockMask, one bit per (query, key) pair evaluated once from the element predicate and packed
into int32 words; full blocks need no bits and empty blocks are never visited. So every pattern runs
through the same two kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ....masks import PARTIAL, BlockMask
from ....masks.composition import Complement, Intersection, Union
from ....masks.patterns import INF, Band, BlockLayout, Document, Named, Pattern, Positions, _Prefix

#: band limits are clamped to this in the kernels (int32 arithmetic on positions stays exact)
BAND_INF = 1 << 30

#: predicate elements evaluated at once when building bitmask tiles
_BITS_CHUNK = 1 << 24

#: bits of ``Terms.flags``: the position is a global key / a global query
KEY_FLAG, QUERY_FLAG = 1, 2


@dataclass(frozen=True)
class Terms:
    """The in-kernel form of a pattern::

        (lo <= q - k <= hi  or  k < prefix  or  q < q_prefix  or  flags  or  layout[q // s, k // s])
            [and q >= k  when and_causal]  and  same document

    Global tokens that form a run ``0..G-1`` become ``prefix`` / ``q_prefix`` comparisons; scattered ones
    become ``flags`` (int8 per position, bits ``KEY_FLAG`` and ``QUERY_FLAG``). ``layout`` is a
    ``(Lb, Lh, q_cells, kv_cells)`` bool grid of cells of ``layout_block`` positions. A union without a band
    has the empty band ``lo > hi``.
    """

    lo: int = -INF
    hi: int = INF
    prefix: int = 0
    q_prefix: int = 0
    flags: torch.Tensor | None = None
    layout: torch.Tensor | None = None
    layout_block: int = 0
    and_causal: bool = False
    doc_ids: torch.Tensor | None = None

    @property
    def union(self) -> bool:
        """Some term is OR-ed with the band."""
        return self.prefix > 0 or self.q_prefix > 0 or self.flags is not None or self.layout is not None

    @property
    def band(self) -> tuple[int, int]:
        return min(max(self.lo, -BAND_INF), BAND_INF), min(max(self.hi, -BAND_INF), BAND_INF)


def _unwrap(p: Pattern) -> Pattern:
    while isinstance(p, Named):
        p = p.inner
    return p


def _run_and_rest(runs: list[int], sets: list[torch.Tensor]) -> tuple[int, torch.Tensor | None]:
    """A set of positions given as runs ``0..r-1`` and explicit positions: ``(G, None)`` when it is the run
    ``0..G-1``, else ``(G, rest)`` with the positions ``>= G`` that lie outside the leading run."""
    run = max(runs, default=0)
    if not sets:
        return run, None
    pos = torch.unique(torch.cat([s.flatten().long() for s in sets]))
    pos = pos[pos >= run]
    n = pos.numel()
    if n == 0:
        return run, None
    if int(pos[0]) == run and int(pos[-1]) == run + n - 1:
        return run + n, None
    return run, pos


def _union_terms(parts) -> Terms | None:
    """Terms of ``part | part | ...`` for a band, key / query position sets and one block layout."""
    band, layout = None, None
    kv_runs, kv_sets, q_sets = [], [], []
    for part in parts:
        part = _unwrap(part)
        if isinstance(part, Band) and band is None:
            band = part
        elif isinstance(part, _Prefix):
            kv_runs.append(part.length)
        elif isinstance(part, Positions):
            (kv_sets if part.axis == "kv" else q_sets).append(part.positions)
        elif isinstance(part, BlockLayout) and layout is None:
            layout = part
        else:
            return None
    lo, hi = (band.lo, band.hi) if band is not None else (BAND_INF, -BAND_INF)
    out = Terms(lo=lo, hi=hi)
    if layout is not None:
        out = replace(out, layout=layout.layout, layout_block=layout.block)
    kv_run, kv_rest = _run_and_rest(kv_runs, kv_sets)
    q_run, q_rest = _run_and_rest([], q_sets)
    if kv_rest is None and q_rest is None:
        return replace(out, prefix=kv_run, q_prefix=q_run)
    # scattered global tokens: one int8 flag per position, covering both sets
    dev = (kv_rest if kv_rest is not None else q_rest).device
    ends = [kv_run, q_run] + [int(r[-1]) + 1 for r in (kv_rest, q_rest) if r is not None]
    flags = torch.zeros(max(ends), dtype=torch.int8, device=dev)
    for run, rest, bit in ((kv_run, kv_rest, KEY_FLAG), (q_run, q_rest, QUERY_FLAG)):
        flags[:run] |= bit
        if rest is not None:
            flags[rest] |= bit
    return replace(out, flags=flags)


def kernel_terms(p: Pattern | None) -> Terms | None:
    """The kernel terms of ``p``, or None when the pattern needs a bitmask. Kept on the pattern: recognising
    global tokens reads their positions (``torch.unique``, a device sync), which a traced call (torch.compile)
    cannot do, so a model's pattern is recognised on its first eager call and reused after."""
    if p is None:
        return Terms()
    cache = p.memo("_flash_terms")
    if "terms" not in cache:
        cache["terms"] = _kernel_terms(p)
    return cache["terms"]


def _kernel_terms(p: Pattern) -> Terms | None:
    p = _unwrap(p)
    if isinstance(p, Band):
        return Terms(lo=p.lo, hi=p.hi)
    if isinstance(p, Document):
        ids = p.seq_ids if p.seq_ids.dim() == 2 else p.seq_ids.unsqueeze(0)
        return Terms(doc_ids=ids)
    if isinstance(p, (Union, Positions, BlockLayout, _Prefix)):
        flat = []
        for part in (p.parts if isinstance(p, Union) else (p,)):
            part = _unwrap(part)
            flat.extend(part.parts if isinstance(part, Union) else (part,))
        return _union_terms(flat)
    if isinstance(p, Intersection):
        lo, hi, doc, union, cut = -INF, INF, None, None, []
        for part in p.parts:
            band = _complemented_band(part)
            if band is not None:
                cut.append(band)
                continue
            t = _kernel_terms(part)
            if t is None:
                return None
            if t.doc_ids is not None:
                if doc is not None:
                    return None
                doc = t.doc_ids
            if t.union or t.and_causal:
                if union is not None:
                    return None
                union = t
            else:
                lo, hi = max(lo, t.lo), min(hi, t.hi)
        for band in cut:
            # [lo, hi] less [band.lo, band.hi] is one band where it leaves one side (``causal & ~window``: the
            # distant keys), else two, which the kernels' single band cannot hold
            if lo >= band.lo:
                lo = max(lo, band.hi + 1)
            elif hi <= band.hi:
                hi = min(hi, band.lo - 1)
            else:
                return None
        if union is None:
            return Terms(lo=lo, hi=hi, doc_ids=doc)
        if lo == 0 and hi >= BAND_INF:
            # (band | globals | layout) & causal
            union = replace(union, and_causal=True)
        elif lo > -BAND_INF or hi < BAND_INF:
            # (band | ...) & another band is not of the kernel's form
            return None
        return replace(union, doc_ids=doc)
    return None


def _complemented_band(p: Pattern) -> Band | None:
    """The band of ``~band`` (names unwrapped), else None: any other complement gets a bitmask."""
    p = _unwrap(p)
    if not isinstance(p, Complement):
        return None
    inner = _unwrap(p.inner)
    return inner if isinstance(inner, Band) else None


def pure_band(p: Pattern | None) -> tuple[int, int] | None:
    """``(lo, hi)`` when ``p`` is a band alone (full, causal, windows): no BlockMask is needed at all."""
    t = kernel_terms(p)
    if t is None or t.doc_ids is not None or t.union or t.and_causal:
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

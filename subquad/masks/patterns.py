"""Attention patterns: an element predicate plus an exact-or-safe block summary.

Every pattern answers two questions, always on *absolute* positions (queries are aligned to the end of
the keys, as in FlashAttention: query ``i`` of ``seq_q`` sits at position ``i + seq_kv - seq_q``):

* ``predicate(b, h, q, k)``: is key ``k`` visible to query ``q``? Broadcasting int64 tensors in, bool out.
* ``block_bounds(ctx, q0, q1, k0, k1)``: for rectangles of positions ``[q0, q1] x [k0, k1]`` (inclusive,
  shaped ``(nQB, 1)`` and ``(1, nKB)``), whether *any* pair is kept and whether *all* are. ``any`` may
  over-approximate and ``all`` may under-approximate (a block then becomes "partial" and is masked
  element by element), but never the other way round; the structured patterns below are exact.

Both are 4-D broadcastable to ``(batch, heads, nQB, nKB)``. Patterns compose with ``|`` and ``&``; the
block summary composes with them (OR: any|any, all|all; AND: any&any, all&all), which keeps the
over/under-approximation guarantees, and the few blocks where two parts overlap partly are then decided by
evaluating the predicate on them, so compositions of exact patterns stay exact. (Document ids are exact
when non-decreasing along the sequence, as packing makes them; user predicates are evaluated per block.)
``~pattern`` keeps the pairs the pattern drops; its summary swaps the two bounds (any = not all, all = not
any), which keeps them safe, and exact where the pattern's are. The compositions are in ``composition``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

INF = 1 << 62


@dataclass(frozen=True)
class BuildContext:
    """What a pattern may need to know about the call it is built for."""

    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    device: torch.device

    @property
    def q_offset(self) -> int:
        return self.seq_kv - self.seq_q


def _as4d(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


class Pattern:
    """Base class. Subclasses implement ``predicate`` and ``block_bounds``."""

    #: the pattern's mask differs across the batch / across heads (decides the BlockMask's leading dims)
    varies_with_batch = False
    varies_with_heads = False

    def predicate(self, b, h, q, k) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_bounds(self, ctx: BuildContext, q0, q1, k0, k1) -> tuple[torch.Tensor, torch.Tensor]:
        """Default: evaluate the predicate on every element of every block (O(N^2) work, chunked memory)."""
        return _bounds_by_evaluation(self, ctx, q0, q1, k0, k1)

    def prepare(self, ctx: BuildContext) -> "Pattern":
        """Return the pattern ready for this call (checks sizes, draws seeded random blocks, moves tensors)."""
        return self

    def memo(self, name: str) -> dict:
        """A dict kept on this pattern object under ``name``: the caches of what is derived from it per call
        signature (its BlockMasks, plans, FA4 routes), so that a model's repeated calls reuse them."""
        # getattr / setattr, not ``__dict__.setdefault``: torch 2.11's dynamo cannot trace the latter, and a
        # model compiled with fullgraph=True makes its patterns inside the traced forward
        cache = getattr(self, name, None)
        if cache is None:
            cache = {}
            setattr(self, name, cache)
        return cache

    # (the compositions subclass Pattern: imported on use, so that either module may be imported first)
    def __or__(self, other: "Pattern") -> "Pattern":
        from .composition import Union
        return Union(self, _coerce(other))

    def __and__(self, other: "Pattern") -> "Pattern":
        from .composition import Intersection
        return Intersection(self, _coerce(other))

    def __ror__(self, other):
        from .composition import Union
        return Union(_coerce(other), self)

    def __rand__(self, other):
        from .composition import Intersection
        return Intersection(_coerce(other), self)

    def __invert__(self) -> "Pattern":
        from .composition import Complement
        return Complement(self)

    # Convenience for users: build the block summary directly.
    def block_mask(self, seq_q: int, seq_kv: int | None = None, *, batch: int = 1, heads: int = 1,
                   block_q: int = 128, block_kv: int = 128, device=None):
        from .block_mask import BlockMask

        return BlockMask.build(self, batch=batch, heads=heads, seq_q=seq_q,
                               seq_kv=seq_q if seq_kv is None else seq_kv,
                               block_q=block_q, block_kv=block_kv, device=device)

    def to_dense(self, seq_q: int, seq_kv: int | None = None, *, batch: int = 1, heads: int = 1,
                 device=None) -> torch.Tensor:
        """The boolean mask ``(batch, heads, seq_q, seq_kv)`` (small N only: it is N^2)."""
        seq_kv = seq_q if seq_kv is None else seq_kv
        if seq_q > seq_kv:
            raise ValueError(f"seq_q: expected at most seq_kv={seq_kv} (queries are aligned to the end of the "
                             f"keys), got {seq_q}")
        ctx = BuildContext(batch, heads, seq_q, seq_kv, torch.device(device or "cpu"))
        pat = self.prepare(ctx)
        b = torch.arange(batch, device=ctx.device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=ctx.device).view(1, -1, 1, 1)
        q = torch.arange(seq_q, device=ctx.device).view(1, 1, -1, 1) + ctx.q_offset
        k = torch.arange(seq_kv, device=ctx.device).view(1, 1, 1, -1)
        return pat.predicate(b, h, q, k).expand(batch, heads, seq_q, seq_kv)

    def describe(self) -> str:
        return repr(self)


def _coerce(x) -> Pattern:
    if isinstance(x, Pattern):
        return x
    if isinstance(x, torch.Tensor):
        return Tensor(x)
    if callable(x):
        return Predicate(x)
    raise TypeError(f"cannot combine a Pattern with {type(x).__name__}")


def _bounds_by_evaluation(pattern: Pattern, ctx: BuildContext, q0, q1, k0, k1):
    """any/all of each block by evaluating the predicate, one query block at a time."""
    q_starts, q_ends = q0.flatten().tolist(), q1.flatten().tolist()
    k_start, k_end = int(k0.min()), int(k1.max())
    k = torch.arange(k_start, k_end + 1, device=ctx.device)
    b = torch.arange(ctx.batch, device=ctx.device).view(-1, 1, 1, 1)
    h = torch.arange(ctx.heads, device=ctx.device).view(1, -1, 1, 1)
    # Index of the key block each key belongs to, for a segmented any/all.
    kb_of = torch.bucketize(k, k1.flatten(), right=False)
    n_kb = k0.numel()
    anys, alls = [], []
    for qs, qe in zip(q_starts, q_ends):
        q = torch.arange(qs, qe + 1, device=ctx.device).view(1, 1, -1, 1)
        # a predicate of the query alone (or the key alone) broadcasts over the other: count every pair
        m = _as4d(pattern.predicate(b, h, q, k.view(1, 1, 1, -1))).expand(-1, -1, q.shape[2], k.numel())
        kept = m.sum(dim=2, dtype=torch.int32)  # (B?, H?, n_k)
        counts = torch.zeros(*kept.shape[:2], n_kb, dtype=torch.int32, device=ctx.device)
        counts.index_add_(2, kb_of, kept)
        widths = (k1 - k0 + 1).flatten() * (qe - qs + 1)
        anys.append(counts > 0)
        alls.append(counts == widths)
    return torch.stack(anys, dim=2), torch.stack(alls, dim=2)


# ----------------------------------------------------------------------------------------------------------
# Structured building blocks (exact block bounds)


class Band(Pattern):
    """Keep ``lo <= q - k <= hi``: causal is (0, inf), a causal window W is (0, W-1), full is (-inf, inf)."""

    def __init__(self, lo: int, hi: int, name: str | None = None):
        if lo > hi:
            raise ValueError(f"band: lo={lo} must be <= hi={hi}")
        self.lo, self.hi, self.name = int(lo), int(hi), name

    def predicate(self, b, h, q, k):
        d = q - k
        return (d >= self.lo) & (d <= self.hi)

    def block_bounds(self, ctx, q0, q1, k0, k1):
        # q - k spans [q0 - k1, q1 - k0] in the block. Written as comparisons of the (nQB, 1) and (1, nKB)
        # vectors so that the only grids are booleans (no int64 (nQB, nKB) intermediates at long N).
        any_ = (k1 >= q0 - self.hi) & (k0 <= q1 - self.lo)
        all_ = (k1 <= q0 - self.lo) & (k0 >= q1 - self.hi)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return self.name or f"band({self.lo}, {self.hi})"


def _count_below(x: torch.Tensor, period: int, residues: torch.Tensor) -> torch.Tensor:
    """How many integers in [0, x) have a residue (mod period) in ``residues``."""
    full, rem = torch.div(x, period, rounding_mode="floor"), torch.remainder(x, period)
    return full * residues.numel() + (residues.view(*([1] * x.dim()), -1) < rem.unsqueeze(-1)).sum(-1)


class PeriodicColumns(Pattern):
    """Keep keys whose position mod ``period`` is in ``residues`` (every query sees the same columns)."""

    def __init__(self, period: int, residues: Sequence[int], name: str | None = None):
        self.period = int(period)
        self.residues = sorted({int(r) % self.period for r in residues})
        self.name = name

    def predicate(self, b, h, q, k):
        res = torch.tensor(self.residues, device=k.device)
        kept = (torch.remainder(k, self.period).unsqueeze(-1) == res).any(-1)
        return kept & (q >= -INF)

    def block_bounds(self, ctx, q0, q1, k0, k1):
        res = torch.tensor(self.residues, device=k0.device, dtype=torch.long)
        count = _count_below(k1 + 1, self.period, res) - _count_below(k0, self.period, res)
        any_ = (count > 0) & (q1 >= q0)
        all_ = (count == k1 - k0 + 1) & (q1 >= q0)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return self.name or f"columns(k % {self.period} in {self.residues})"


class Positions(Pattern):
    """Keep every pair whose key (``axis="kv"``) or query (``axis="q"``) is in an explicit set of positions."""

    def __init__(self, positions, axis: str, name: str | None = None):
        pos = torch.as_tensor(positions, dtype=torch.long).flatten()
        if pos.numel() and int(pos.min()) < 0:
            raise ValueError(f"global_tokens: positions must be >= 0, got min {int(pos.min())}")
        self.positions = torch.unique(pos)
        # kept on the host: the check in ``prepare`` then reads no tensor, so a traced decoding step prepares
        # the pattern without a graph break
        self.last = int(self.positions.max()) if self.positions.numel() else -1
        self.axis = axis
        self.name = name

    def prepare(self, ctx):
        limit = ctx.seq_kv
        if self.last >= limit:
            raise ValueError(f"global_tokens: position {self.last} is outside a sequence of {limit} keys")
        if self.positions.device != ctx.device:
            out = Positions.__new__(Positions)
            out.positions, out.last, out.axis, out.name = self.positions.to(ctx.device), self.last, self.axis, \
                self.name
            return out
        return self

    def predicate(self, b, h, q, k):
        x = k if self.axis == "kv" else q
        kept = torch.isin(x, self.positions.to(x.device))
        return kept & (q >= -INF) & (k >= -INF)

    def _count(self, lo, hi):
        pos = self.positions.to(lo.device)
        return torch.searchsorted(pos, hi + 1) - torch.searchsorted(pos, lo)

    def block_bounds(self, ctx, q0, q1, k0, k1):
        if self.axis == "kv":
            count = self._count(k0.expand(1, -1), k1.expand(1, -1))
            any_, all_ = (count > 0) & (q1 >= q0), (count == k1 - k0 + 1) & (q1 >= q0)
        else:
            count = self._count(q0.expand(-1, 1), q1.expand(-1, 1))
            any_, all_ = (count > 0) & (k1 >= k0), (count == q1 - q0 + 1) & (k1 >= k0)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return self.name or f"{'columns' if self.axis == 'kv' else 'rows'}({self.positions.tolist()})"


class SameBlock(Pattern):
    """Keep pairs in the same aligned block of ``size`` positions (the fixed pattern's local part)."""

    def __init__(self, size: int):
        self.size = int(size)

    def predicate(self, b, h, q, k):
        return torch.div(q, self.size, rounding_mode="floor") == torch.div(k, self.size, rounding_mode="floor")

    def block_bounds(self, ctx, q0, q1, k0, k1):
        s = self.size
        qa, qb, ka, kb = q0 // s, q1 // s, k0 // s, k1 // s
        any_ = (qa <= kb) & (ka <= qb)
        all_ = (qa == qb) & (ka == kb) & (qa == ka)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return f"same_block({self.size})"


class Residue(Pattern):
    """Keep pairs with ``(q - k) % dilation == 0`` (a dilated window's comb)."""

    def __init__(self, dilation: int):
        self.dilation = int(dilation)

    def predicate(self, b, h, q, k):
        return torch.remainder(q - k, self.dilation) == 0

    def block_bounds(self, ctx, q0, q1, k0, k1):
        # q - k takes every value of [q0 - k1, q1 - k0] in the block: some pair is kept iff that range holds
        # a multiple of the dilation; all are kept iff the dilation is 1 or the range is one kept value.
        q0, q1, k0, k1 = (x.to(torch.int32) for x in (q0, q1, k0, k1))  # positions < 2^31; halves the grids
        dmin, dmax = q0 - k1, q1 - k0
        any_ = torch.div(dmax, self.dilation, rounding_mode="floor") * self.dilation >= dmin
        all_ = (any_ & (dmin == dmax)) | torch.full_like(any_, self.dilation == 1)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return f"residue({self.dilation})"


class Segments(Pattern):
    """Pairs within one segment of a row: packed documents (``Document``, ids given) or right padding (ids made
    at ``prepare``, from the length). What reads a pattern's structure before it is prepared (FA4's varlen
    route, the dispatch table's kinds) asks for this; what reads the ids asks for a prepared ``Document``."""

    varies_with_batch = True


class Document(Segments):
    """Keep pairs in the same packed sequence: ``seq_ids[b, q] == seq_ids[b, k]``."""

    varies_with_batch = True

    def __init__(self, seq_ids: torch.Tensor):
        seq_ids = torch.as_tensor(seq_ids)
        if seq_ids.dim() not in (1, 2) or seq_ids.dtype.is_floating_point:
            raise ValueError(f"seq_ids: expected an integer tensor of shape (seq,) or (batch, seq), got "
                             f"{tuple(seq_ids.shape)} {seq_ids.dtype}")
        self.seq_ids = seq_ids.to(torch.long, copy=True)
        self.varies_with_batch = seq_ids.dim() == 2

    def prepare(self, ctx):
        ids = self.seq_ids if self.seq_ids.dim() == 2 else self.seq_ids.unsqueeze(0)
        if ids.shape[-1] != ctx.seq_kv or ids.shape[0] not in (1, ctx.batch):
            raise ValueError(f"seq_ids: expected shape ({ctx.seq_kv},) or ({ctx.batch}, {ctx.seq_kv}) for "
                             f"{ctx.seq_kv} keys, got {tuple(self.seq_ids.shape)}")
        out = Document.__new__(Document)
        out.seq_ids = ids.to(ctx.device)
        out.varies_with_batch = ids.shape[0] > 1
        return out

    def _ids(self):
        return self.seq_ids if self.seq_ids.dim() == 2 else self.seq_ids.unsqueeze(0)

    def predicate(self, b, h, q, k):
        ids = self._ids().to(q.device)   # prepared on the GPU, evaluated on the CPU by describe()
        bb = b if ids.shape[0] > 1 else torch.zeros_like(b)
        return ids[bb, q] == ids[bb, k]

    def block_bounds(self, ctx, q0, q1, k0, k1):
        ids = self._ids().to(q0.device)  # (Bm, N)
        sorted_ = self.memo("_sorted")
        if "sorted" not in sorted_:
            sorted_["sorted"] = bool((ids[:, 1:] >= ids[:, :-1]).all())
        if sorted_["sorted"]:
            # packing (ids non-decreasing): a range's extreme ids are its ends', read at once for every block
            qlo, qhi = ids[:, q0.flatten()][:, :, None], ids[:, q1.flatten()][:, :, None]
            klo, khi = ids[:, None, k0.flatten()], ids[:, None, k1.flatten()]
            any_ = (qlo <= khi) & (klo <= qhi)
            all_ = (qlo == qhi) & (klo == khi) & (qlo == klo)
            return any_.unsqueeze(1), all_.unsqueeze(1)
        starts = torch.cat([q0.flatten(), k0.flatten()])
        ends = torch.cat([q1.flatten(), k1.flatten()])
        # Per-block min and max of the ids, via a segment reduction over the (possibly overlapping) ranges.
        lo = torch.stack([ids[:, s:e + 1].amin(-1) for s, e in zip(starts.tolist(), ends.tolist())], -1)
        hi = torch.stack([ids[:, s:e + 1].amax(-1) for s, e in zip(starts.tolist(), ends.tolist())], -1)
        nq = q0.numel()
        qlo, qhi = lo[:, :nq, None], hi[:, :nq, None]
        klo, khi = lo[:, None, nq:], hi[:, None, nq:]
        # Exact when ids are non-decreasing along the sequence (packing); conservative otherwise.
        any_ = (qlo <= khi) & (klo <= qhi)
        all_ = (qlo == qhi) & (klo == khi) & (qlo == klo)
        return any_.unsqueeze(1), all_.unsqueeze(1)

    def __repr__(self):
        return f"document({int(self._ids().max()) + 1 if self.seq_ids.numel() else 0} sequences)"


class BlockLayout(Pattern):
    """Keep pairs whose (query block, key block) cell of ``layout`` is True; ``block`` positions per cell."""

    def __init__(self, layout: torch.Tensor, block: int):
        layout = torch.as_tensor(layout)
        if layout.dtype != torch.bool or layout.dim() not in (2, 3, 4):
            raise ValueError(f"layout: expected a bool tensor of shape (q_blocks, kv_blocks), (heads, q_blocks, "
                             f"kv_blocks) or (batch, heads, q_blocks, kv_blocks), got {tuple(layout.shape)} "
                             f"{layout.dtype}")
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"block: expected a positive integer block size, got {block!r}")
        self.layout = _as4d(layout.clone())
        self.block = int(block)
        self.varies_with_batch = self.layout.shape[0] > 1
        self.varies_with_heads = self.layout.shape[1] > 1

    def prepare(self, ctx):
        nq, nk = math.ceil(ctx.seq_kv / self.block), math.ceil(ctx.seq_kv / self.block)
        lb, lh, lq, lk = self.layout.shape
        if lq < nq or lk < nk or lb not in (1, ctx.batch) or lh not in (1, ctx.heads):
            raise ValueError(f"layout: expected shape (..., >= {nq}, >= {nk}) with batch in (1, {ctx.batch}) and "
                             f"heads in (1, {ctx.heads}) for {ctx.seq_kv} positions in blocks of {self.block}, "
                             f"got {tuple(self.layout.shape)}")
        if self.layout.device == ctx.device:
            return self
        return BlockLayout(self.layout.to(ctx.device), self.block)

    def predicate(self, b, h, q, k):
        lay = self.layout.to(q.device)   # prepared on the GPU, evaluated on the CPU by describe()
        bb = b if lay.shape[0] > 1 else torch.zeros_like(b)
        hh = h if lay.shape[1] > 1 else torch.zeros_like(h)
        return lay[bb, hh, torch.div(q, self.block, rounding_mode="floor"), torch.div(k, self.block, rounding_mode="floor")]

    def block_bounds(self, ctx, q0, q1, k0, k1):
        s = self.block
        lay = self.layout.to(device=q0.device, dtype=torch.int32)  # prepared on the GPU, counted on the CPU
        # 2-D prefix sums: count of kept cells in any rectangle of cells in O(1).
        cs = torch.zeros(lay.shape[0], lay.shape[1], lay.shape[2] + 1, lay.shape[3] + 1, dtype=torch.int32,
                         device=lay.device)
        cs[:, :, 1:, 1:] = lay.cumsum(2).cumsum(3)
        qa, qb = (q0 // s).flatten(), (q1 // s).flatten() + 1
        ka, kb = (k0 // s).flatten(), (k1 // s).flatten() + 1
        count = (cs[:, :, qb][:, :, :, kb] - cs[:, :, qa][:, :, :, kb]
                 - cs[:, :, qb][:, :, :, ka] + cs[:, :, qa][:, :, :, ka])
        area = (qb - qa).view(-1, 1) * (kb - ka).view(1, -1)
        return count > 0, count == area

    def __repr__(self):
        return f"block_sparse({tuple(self.layout.shape[-2:])} cells of {self.block}, density {self.layout.float().mean():.3f})"


class Tensor(Pattern):
    """A user-given boolean mask ``(seq_q, seq_kv)``, ``(heads, ...)`` or ``(batch, heads, ...)``."""

    def __init__(self, mask: torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() not in (2, 3, 4):
            raise ValueError(f"mask: expected a bool tensor of shape (seq_q, seq_kv), (heads, seq_q, seq_kv) or "
                             f"(batch, heads, seq_q, seq_kv), got {tuple(mask.shape)} {mask.dtype}")
        self.mask = _as4d(mask)
        self.varies_with_batch = self.mask.shape[0] > 1
        self.varies_with_heads = self.mask.shape[1] > 1

    def prepare(self, ctx):
        mb, mh, mq, mk = self.mask.shape
        if mq != ctx.seq_q or mk != ctx.seq_kv or mb not in (1, ctx.batch) or mh not in (1, ctx.heads):
            raise ValueError(f"mask: expected shape (seq_q={ctx.seq_q}, seq_kv={ctx.seq_kv}) with batch in "
                             f"(1, {ctx.batch}) and heads in (1, {ctx.heads}), got {tuple(self.mask.shape)}")
        self._offset = ctx.q_offset
        if self.mask.device != ctx.device:
            out = Tensor(self.mask.to(ctx.device))
            out._offset = ctx.q_offset
            return out
        return self

    def predicate(self, b, h, q, k):
        m = self.mask.to(q.device)       # prepared on the GPU, evaluated on the CPU by describe()
        bb = b if m.shape[0] > 1 else torch.zeros_like(b)
        hh = h if m.shape[1] > 1 else torch.zeros_like(h)
        return m[bb, hh, q - getattr(self, "_offset", 0), k]

    def block_bounds(self, ctx, q0, q1, k0, k1):
        nq, nk = q0.numel(), k0.numel()
        bq, bk = int(q1.flatten()[0] - q0.flatten()[0] + 1), int(k1.flatten()[0] - k0.flatten()[0] + 1)
        m = self.mask.to(q0.device)
        pad_q, pad_k = nq * bq - m.shape[2], nk * bk - m.shape[3]
        kept = torch.nn.functional.pad(m.to(torch.int32), (0, pad_k, 0, pad_q))
        count = kept.view(m.shape[0], m.shape[1], nq, bq, nk, bk).sum((3, 5))
        area = (q1 - q0 + 1) * (k1 - k0 + 1)
        return count > 0, count == area

    def __repr__(self):
        return f"mask_tensor{tuple(self.mask.shape)}"


class Predicate(Pattern):
    """A user predicate ``fn(b, h, q, k) -> bool tensor`` on absolute positions (evaluated per block)."""

    def __init__(self, fn: Callable, name: str | None = None, varies_with_batch=True, varies_with_heads=True):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "predicate")
        self.varies_with_batch = varies_with_batch
        self.varies_with_heads = varies_with_heads

    def predicate(self, b, h, q, k):
        return torch.as_tensor(self.fn(b, h, q, k), dtype=torch.bool)

    def __repr__(self):
        return f"predicate({self.name})"


class Named(Pattern):
    """A pattern with a name built from the building blocks (so it prints as what the user asked for)."""

    def __init__(self, name: str, inner: Pattern, params: dict | None = None):
        self.name, self.inner, self.params = name, inner, dict(params or {})
        self.varies_with_batch = inner.varies_with_batch
        self.varies_with_heads = inner.varies_with_heads

    def prepare(self, ctx):
        return Named(self.name, self.inner.prepare(ctx), self.params)

    def predicate(self, b, h, q, k):
        return self.inner.predicate(b, h, q, k)

    def block_bounds(self, ctx, q0, q1, k0, k1):
        return self.inner.block_bounds(ctx, q0, q1, k0, k1)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of non-negative int64 values below 2^33."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


class RandomBlocks(Pattern):
    """BigBird's random part: each query block of ``block`` positions sees ``count`` random key blocks.

    ``causal``: among the blocks up to its own, ranked by a hash of (seed, query block, key block), so that a
    row's blocks do not depend on the sequence's length: a causal model's cached decode, whose pattern is
    built at each step's length, sees the blocks its whole-sequence forward saw (a draw of ``rand(blocks,
    blocks)`` changed every row with the number of blocks, and half its picks were later blocks, cut).
    Otherwise (an encoder's pattern, which sees the whole sequence at once) that seeded draw, the layout
    every benchmark so far has run."""

    def __init__(self, count: int, block: int, seed: int, causal: bool = False):
        self.count, self.block, self.seed, self.causal = int(count), int(block), int(seed), bool(causal)

    def prepare(self, ctx):
        n = math.ceil(ctx.seq_kv / self.block)
        qb, kb = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        if self.causal:
            rank = _mix32(_mix32(_mix32(torch.tensor(self.seed & 0xFFFFFFFF)) + qb) + kb)
            rank = rank.masked_fill(kb > qb, -1)
        else:
            rank = torch.rand(n, n, generator=torch.Generator().manual_seed(self.seed))
        picks = rank.topk(min(self.count, n), dim=-1).indices
        layout = torch.zeros(n, n, dtype=torch.bool).scatter_(1, picks, True)
        if self.causal:
            layout &= kb <= qb      # (a row with fewer earlier blocks than ``count`` picked later ones too)
        return BlockLayout(layout.to(ctx.device), self.block)

    def __repr__(self):
        return f"random_blocks({self.count} of {self.block}, seed={self.seed}{', causal' if self.causal else ''})"


class _Prefix(Pattern):
    """Keys before ``length`` (a contiguous run of columns)."""

    def __init__(self, length: int):
        self.length = length

    def predicate(self, b, h, q, k):
        return (k < self.length) & (q >= -INF)

    def block_bounds(self, ctx, q0, q1, k0, k1):
        any_ = (k0 < self.length) & (q1 >= q0)
        all_ = (k1 < self.length) & (q1 >= q0)
        return _as4d(any_), _as4d(all_)

    def __repr__(self):
        return f"prefix({self.length})"

"""The pattern planner: split a pattern into components that each run at dense-kernel speed.

A BlockMask serves patterns whose kept keys come in contiguous runs. Scattered columns (the Sparse
Transformer's strided and fixed patterns, global tokens) cost a whole key tile per kept column, and a
dilated window keeps one key in ``dilation`` of every tile it touches. The planner rewrites such a pattern
as a set of components, each an ordinary BlockMask over a (possibly gathered or re-indexed) sequence:

* ``local``: the contiguous parts (bands, same-block, block layouts) on the original sequence;
* ``blocks``: block layouts finer than the tiles (BigBird's random blocks) beside other local terms, less the
  pairs ``local`` keeps: run at their own block size while ``local`` keeps the large tiles;
* ``columns``: the scattered key columns, gathered into a compact K/V tensor with their original positions;
  its predicate removes the pairs that ``local`` already keeps, so no pair is counted twice. Global tokens
  within ``FOLD_COLUMN_TILES`` tiles (Longformer's and BigBird's first tokens) are not gathered: they stay in
  the local BlockMask as in-kernel terms, and so do their global rows when nothing else is gathered (then
  there is no plan);
* ``rows``: global queries that see every key, gathered and run on their own (split over the keys so
  they do not serialise one program); their result *replaces* those rows of the merged output. None where
  the other components already give those queries exactly their keys (causally, a global query at the start
  sees only keys inside the band);
* ``classes``: a dilated window re-indexed by residue class (``pos % dilation``): with the sequence
  viewed as ``(batch, seq / d, d * heads, dim)`` (free, no copy) every dilated window is a plain sliding
  window of ``window / d`` keys within its class;
* ``class``: the same for lengths not divisible by the dilation, one gathered component per class.

Components without gathered rows merge by their log-sum-exp; row components overwrite their rows. The
union is exact: ``Plan.coverage()`` counts, on small N, how many components keep each (query, key) pair
(exactly as the kernels visit them: full tiles entirely, partial tiles through the predicate) and the
tests compare it with the pattern's element mask.

``plan(pattern, seq_q, seq_kv)`` returns a ``Plan`` or ``None`` when the pattern has no scattered part or
all that is left is one local component (the BlockMask path is then already the plan). ``Plan.describe()`` says what was chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .block_mask import EMPTY, FULL, PARTIAL, BlockMask
from .composition import Complement, Intersection, Union
from .patterns import (INF, Band, BlockLayout, BuildContext, Named, Pattern, PeriodicColumns, Positions, Residue,
                       SameBlock)

#: global columns (rows) spread over at most this many key (query) tiles stay in the local BlockMask as
#: in-kernel terms: one more partial tile per query tile beats a second launch and a merge. On the H100 at
#: 2 x 16k, Longformer (512 + 16 global tokens) ran 1.17 ms forward that way against 3.65 planned and flex's
#: 1.23; BigBird 2.52 against 4.73 and 2.90 (2026-11-23-flash-patterns-inkernel / -patterns runs); the
#: planner's gathered tile of 16 columns alone took 0.19-0.38 ms of kernel (plan-profile run).
FOLD_COLUMN_TILES = 2
#: keys per chunk when global rows are split over the keys (each chunk is one program's worth of work)
ROW_CHUNK = 2048
#: block layouts finer than the tiles (BigBird's random blocks of 64 keys) beside other local terms run as a
#: ``blocks`` component of their own: in one BlockMask they bring the whole pattern down to their block size, or
#: leave most of their 128-tiles partial. On the H200 (2 x 16k, 2026-12-05-bigbird-random-blocks-h200.json) one
#: random block per 64-row block took BigBird's forward from 0.56 ms (Longformer's) to 1.19.
SPLIT_FINE_LAYOUTS = True


def _band(lo: int, hi: int) -> Band | None:
    lo, hi = max(lo, -INF), min(hi, INF)
    return Band(lo, hi) if lo <= hi else None


def _union(parts: list[Pattern]) -> Pattern | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Union(*parts)


def _and(a: Pattern | None, b: Pattern | None) -> Pattern | None:
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, Band) and isinstance(b, Band):
        return _band(max(a.lo, b.lo), min(a.hi, b.hi)) or Intersection(a, b)
    return Intersection(a, b)


def _text(p: Pattern | None) -> str:
    return "every pair" if p is None else repr(p).replace(str(INF), "inf")


def _is_full(band: Band) -> bool:
    return band.lo <= -INF and band.hi >= INF


def _band_str(band: Band) -> str:
    lo = "-inf" if band.lo <= -INF else str(band.lo)
    hi = "inf" if band.hi >= INF else str(band.hi)
    return f"{lo} <= q-k <= {hi}"


@dataclass
class Component:
    """One kernel launch's worth of a plan.

    ``pattern`` is the predicate applied to partial tiles, on the positions the component sees
    (``q_pos``/``kv_pos``; ``None``: the natural positions of its own sequence). ``grid_pattern``, when
    given, decides the tile kinds instead (it may be stricter than ``pattern`` where the tiles alone
    already enforce the difference). ``pattern=None`` means every pair (no BlockMask).
    """

    role: str
    pattern: Pattern | None
    seq_q: int
    seq_kv: int
    note: str = ""
    grid_pattern: Pattern | None = None
    q_index: torch.Tensor | None = None      # gathered query rows, indices into q (their output replaces them)
    kv_index: torch.Tensor | None = None     # gathered keys
    kv_slice: tuple[int, int] | None = None  # a contiguous key range (a view, no copy)
    kv_stride: tuple[int, int, int] | None = None  # kv_index as (first, width, period): _periodic_stride
    q_pos: torch.Tensor | None = None
    kv_pos: torch.Tensor | None = None
    split: int = 1                           # rows: key chunks run as extra batch entries, merged by LSE
    fold: int = 1                            # classes: residue classes folded into the head axis
    block: int | None = None                 # its own BlockMask block (blocks: the layout's), else the plan's
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def overrides_rows(self) -> bool:
        return self.q_index is not None

    @property
    def natural(self) -> bool:
        """On the sequence as it is (no gather, fold, split or positions) with tiles that follow its pattern."""
        return self.pattern is not None and (self.grid_pattern is None or self.grid_pattern is self.pattern) \
            and self.q_pos is None and self.kv_pos is None and self.fold == 1 and self.split == 1 \
            and self.q_index is None and self.kv_index is None and self.kv_slice is None

    def kernel_shape(self) -> tuple[int, int]:
        """(queries, keys) of one launch of this component (per batch entry and head)."""
        return self.seq_q, self.seq_kv // self.split

    def block_mask(self, ctx: BuildContext, block_q: int, block_kv: int, device) -> BlockMask | None:
        """The BlockMask of this component's kernel call (at its own ``block`` if it has one), built once per
        device and tile size."""
        if self.pattern is None:
            return None
        if self.block is not None:
            block_q = block_kv = self.block
        key = (block_q, block_kv, str(torch.device(device)), ctx.batch, ctx.heads)
        if key not in self._masks:
            self._masks[key] = _positional_block_mask(
                self.pattern, self.grid_pattern or self.pattern, ctx, self.seq_q, self.seq_kv // self.split,
                self.q_pos, self.kv_pos, block_q, block_kv, ctx.batch, ctx.heads * self.fold, device)
        return self._masks[key]


def _block_extent(pos: torch.Tensor | None, n: int, block: int, offset: int, device):
    """Per tile of ``block`` consecutive entries, the min and max position (natural positions if None)."""
    nb = math.ceil(n / block)
    if pos is None:
        lo = torch.arange(nb, device=device) * block + offset
        hi = torch.clamp(lo + block - 1, max=n - 1 + offset)
        return lo, hi
    pos = pos.to(device)
    pad = nb * block - n
    padded = torch.cat([pos, pos[-1:].expand(pad)]) if pad else pos
    tiles = padded.view(nb, block)
    return tiles.amin(1), tiles.amax(1)


def _safe_bounds(p: Pattern, ctx, q0, q1, k0, k1):
    """Block bounds composed by the plain rules (any: or/and of any; all: or/and of all), never evaluating
    the predicate over a tile's rectangle: a tile of gathered positions may span the whole sequence."""
    p = _unwrap(p)
    if isinstance(p, (Union, Intersection)):
        op = torch.logical_or if isinstance(p, Union) else torch.logical_and
        bounds = [_safe_bounds(t, ctx, q0, q1, k0, k1) for t in p.parts]
        any_, all_ = bounds[0]
        for a, l in bounds[1:]:
            any_, all_ = op(any_, a), op(all_, l)
        return any_, all_
    if isinstance(p, Complement):
        any_, all_ = _safe_bounds(p.inner, ctx, q0, q1, k0, k1)
        return ~all_, ~any_
    return p.block_bounds(ctx, q0, q1, k0, k1)


def _positional_block_mask(pattern, grid_pattern, ctx, seq_q, seq_kv, q_pos, kv_pos, block_q, block_kv,
                           batch, heads, device) -> BlockMask:
    """A BlockMask for queries/keys at arbitrary positions: each tile's rectangle of [min, max] positions
    goes through the pattern's block bounds, which over-approximates 'any' and under-approximates 'all'
    (the only safe directions) whatever lies between the gathered positions."""
    q_off = seq_kv - seq_q if q_pos is None else 0
    q0, q1 = _block_extent(q_pos, seq_q, block_q, q_off, device)
    k0, k1 = _block_extent(kv_pos, seq_kv, block_kv, 0, device)
    bounds = grid_pattern.block_bounds if q_pos is None and kv_pos is None else \
        (lambda *a: _safe_bounds(grid_pattern, *a))
    any_, all_ = bounds(ctx, q0.view(-1, 1), q1.view(-1, 1), k0.view(1, -1), k1.view(1, -1))
    kind = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    while kind.dim() < 4:
        kind = kind.unsqueeze(0)
    kind = kind[:1, :1].expand(1, 1, q0.numel(), k0.numel()).contiguous()
    return BlockMask(pattern, kind, seq_q, seq_kv, block_q, block_kv, batch, heads)


# ----------------------------------------------------------------------------------------------------------
# Reading a pattern: clip band & (union of local, column and row parts), or band & residue


@dataclass
class _Parts:
    clip: Band
    local: list
    columns: list
    rows: list
    dilation: int = 1


def _unwrap(p: Pattern) -> Pattern:
    while isinstance(p, Named):
        p = p.inner
    return p


def _terms(p: Pattern, kind: type) -> list[Pattern]:
    """The operands of nested ``kind`` (Union or Intersection) nodes, names unwrapped."""
    p = _unwrap(p)
    return [t for part in p.parts for t in _terms(part, kind)] if isinstance(p, kind) else [p]


def _read(pattern: Pattern) -> _Parts | None:
    """Normal form ``clip & (U1 | ... | Un)`` of the structured building blocks, or None. A complement is no
    building block, whatever it holds (``~strided``'s columns are the pairs it drops): a pattern with one runs
    as its BlockMask."""
    terms = _terms(pattern, Intersection)
    lo, hi, dilation, union = -INF, INF, 1, None
    for t in terms:
        if isinstance(t, Band):
            lo, hi = max(lo, t.lo), min(hi, t.hi)
        elif isinstance(t, Residue):
            dilation = math.lcm(dilation, t.dilation)
        elif union is None:
            union = t
        else:
            return None
    if lo > hi:
        return None
    parts = _Parts(Band(lo, hi), [], [], [], dilation)
    if union is None:
        return parts
    if dilation > 1:
        return None
    for p in _terms(union, Union):
        if isinstance(p, (Band, SameBlock, BlockLayout)):
            parts.local.append(p)
        elif isinstance(p, PeriodicColumns) or (isinstance(p, Positions) and p.axis == "kv"):
            parts.columns.append(p)
        elif isinstance(p, Positions) and p.axis == "q":
            parts.rows.append(p)
        else:
            return None
    return parts


def _column_positions(columns: list, seq_kv: int, device) -> torch.Tensor:
    sets = []
    for c in columns:
        if isinstance(c, PeriodicColumns):
            base = torch.arange(0, seq_kv, c.period, device=device).view(-1, 1)
            pos = (base + torch.tensor(c.residues, device=device).view(1, -1)).flatten()
            sets.append(pos[pos < seq_kv])
        else:
            sets.append(c.positions.to(device))
    return torch.unique(torch.cat(sets))


def _periodic_stride(columns: list, count: int) -> tuple[int, int, int] | None:
    """``(first, width, period)`` where the gathered keys are ``first + p * period + j`` (``j < width``) over whole
    periods: one set of periodic columns with consecutive residues (the strided and fixed patterns). Gathering
    them and adding their gradients back are then strided views of K and V: the index kernels took 0.08 ms of the
    fixed pattern's 2.7 ms fwd+bwd at 2 x 16k (H100), adding bf16 gradients by atomics."""
    if len(columns) != 1 or not isinstance(columns[0], PeriodicColumns):
        return None
    residues = columns[0].residues
    width = len(residues)
    if residues[-1] - residues[0] + 1 != width or count % width:
        return None
    return residues[0], width, columns[0].period


def _row_positions(rows: list, seq_q: int, seq_kv: int, device) -> torch.Tensor:
    pos = torch.unique(torch.cat([r.positions.to(device) for r in rows]))
    return pos[pos >= seq_kv - seq_q]


def _excluding_local(clip: Band, local: list, exact_positions: bool, seq_kv: int, col_pos: torch.Tensor):
    """Pattern (and substituted key positions) for gathered columns: kept by ``clip``, not by ``local``.

    Chosen so that the in-kernel predicate stays a band where it can: a band minus a band is one or two
    bands; clip minus same-block becomes a band on block ends (a column at k is moved to the last position
    of its block e, and q // b != k // b is q - e >= 1 or q - e <= -b); otherwise a generic complement.
    """
    if not local:
        return clip, None, _band_str(clip)
    if len(local) == 1 and isinstance(local[0], Band):
        b = local[0]
        parts = [_band(clip.lo, min(clip.hi, b.lo - 1)), _band(max(clip.lo, b.hi + 1), clip.hi)]
        pat = _union(parts)
        return pat, None, " or ".join(_band_str(p) for p in parts if p is not None) or "nothing"
    if (len(local) == 1 and isinstance(local[0], SameBlock) and not exact_positions
            and clip.hi >= INF and clip.lo in (0, -INF)):
        s = local[0].size
        ends = torch.div(col_pos, s, rounding_mode="floor") * s + (s - 1)
        pat = Band(1, INF) if clip.lo == 0 else Union(Band(1, INF), Band(-INF, -s))
        return pat, ends, f"q // {s} {'>' if clip.lo == 0 else '!='} k // {s} (band on block ends)"
    pat = Intersection(clip, Complement(_union(local)))
    return pat, None, f"{_band_str(clip)} and not local"


def _fine_layouts(local: list, block_q: int, block_kv: int) -> list:
    """The block layouts among the local terms whose blocks are finer than the tiles, when other local terms
    are there to split them from (``SPLIT_FINE_LAYOUTS``)."""
    fine = [p for p in local if isinstance(p, BlockLayout) and p.block < min(block_q, block_kv)]
    return fine if SPLIT_FINE_LAYOUTS and len(fine) < len(local) else []


def _tiles_spanned(pos: torch.Tensor, block: int) -> int:
    return int(torch.unique(torch.div(pos, block, rounding_mode="floor")).numel())


class Plan:
    """A pattern as components; see the module docstring. Built by ``plan(...)``."""

    def __init__(self, pattern: Pattern, prepared: Pattern, seq_q: int, seq_kv: int,
                 components: list[Component], notes: list[str], block_q: int = 128, block_kv: int = 128,
                 exact_positions: bool = False):
        self.pattern, self.prepared = pattern, prepared
        self.exact_positions = exact_positions
        self.block_q, self.block_kv = block_q, block_kv
        self.seq_q, self.seq_kv = seq_q, seq_kv
        self.components = components
        self.notes = notes

    @property
    def fold(self) -> int:
        return max(c.fold for c in self.components)

    @property
    def natural(self) -> bool:
        """Every component on the sequence as it is: the merged output is then differentiable as one pass of
        the whole pattern (the gradients depend on the pairs kept, O, LSE and dO only), with no merge to undo
        and no gradients to sum."""
        return all(c.natural for c in self.components)

    @property
    def local_and_columns(self) -> tuple[Component, Component] | None:
        """The local and columns components when one flash launch can run both as two key sources (the strided
        and fixed patterns): the local part on natural positions, the columns kept by a band on their positions,
        nothing else merged."""
        base = [c for c in self.components if not c.overrides_rows]
        if [c.role for c in base] != ["local", "columns"]:
            return None
        local, columns = base
        if local.q_pos is not None or local.kv_pos is not None or local.fold != 1 or local.pattern is None:
            return None
        if not isinstance(columns.pattern, Band) or columns.kv_pos is None or columns.q_pos is None:
            return None
        return local, columns

    def context(self, batch: int, heads: int, device) -> BuildContext:
        return BuildContext(batch, heads, self.seq_q, self.seq_kv, torch.device(device))

    # -- counting -------------------------------------------------------------------------------------
    def _component_mask(self, c: Component, bm: BlockMask | None, device, rows=None) -> torch.Tensor:
        """The pairs a component keeps, in its own coordinates (only ``rows`` of its queries if given),
        visited the way the kernels visit them: full tiles entirely, partial tiles through the predicate."""
        nq, nk = c.kernel_shape()
        rows = torch.arange(nq, device=device) if rows is None else rows.to(device)
        if bm is None:
            return torch.ones(rows.numel(), nk, dtype=torch.bool, device=device)
        kind = bm.kind[0, 0][torch.div(rows, bm.block_q, rounding_mode="floor")]
        kind = kind.repeat_interleave(bm.block_kv, 1)[:, :nk]
        qp = (rows + nk - nq) if c.q_pos is None else c.q_pos.to(device)[rows]
        kp = torch.arange(nk, device=device) if c.kv_pos is None else c.kv_pos.to(device)
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        pred = bm.pattern.predicate(zero, zero, qp.view(1, 1, -1, 1), kp.view(1, 1, 1, -1))
        pred = pred.reshape(pred.shape[-2:]).expand(rows.numel(), nk)
        return (kind == FULL) | ((kind == PARTIAL) & pred)

    def _keys_of(self, c: Component, device) -> torch.Tensor:
        """The key position of each of a (non-folded) component's key columns."""
        if c.kv_slice is not None:
            return torch.arange(*c.kv_slice, device=device)
        return c.kv_index.to(device) if c.kv_index is not None else torch.arange(self.seq_kv, device=device)

    def gives_rows_their_keys(self, rows: torch.Tensor) -> bool:
        """Whether the components give the query positions ``rows`` exactly the pattern's keys, each once:
        then a row component for them would redo work (causal Longformer: the band already holds every key a
        global query may see)."""
        device = rows.device
        ctx = self.context(1, 1, device)
        got = torch.zeros(rows.numel(), self.seq_kv, dtype=torch.int32, device=device)
        for c in self.components:
            if c.overrides_rows or c.fold > 1:
                return False
            bm = c.block_mask(ctx, self.block_q, self.block_kv, device)
            m = self._component_mask(c, bm, device, rows=rows - (self.seq_kv - self.seq_q))
            got.index_add_(1, self._keys_of(c, device), m.to(torch.int32))
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        want = self.prepared.predicate(zero, zero, rows.view(1, 1, -1, 1),
                                       torch.arange(self.seq_kv, device=device).view(1, 1, 1, -1))
        return torch.equal(got, want.expand(1, 1, rows.numel(), self.seq_kv)[0, 0].to(torch.int32))

    def coverage(self, device="cpu") -> torch.Tensor:
        """``(seq_q, seq_kv)`` int: how many components keep each pair, rows replaced by the row components
        that own them (small N only). An exact plan gives the pattern's element mask as 0/1."""
        if self.seq_q * self.seq_kv > 1 << 24:
            raise ValueError(f"coverage: {self.seq_q} x {self.seq_kv} is too large to materialise")
        ctx, block_q, block_kv = self.context(1, 1, device), self.block_q, self.block_kv
        total = torch.zeros(self.seq_q, self.seq_kv, dtype=torch.int32, device=device)
        rows = []
        for c in self.components:
            m = self._component_mask(c, c.block_mask(ctx, block_q, block_kv, device), device).to(torch.int32)
            if c.fold > 1:
                # class index i of class r is position i * d + r (queries: their last seq_q positions)
                d = c.fold
                full = torch.zeros(self.seq_q, self.seq_kv, dtype=torch.int32, device=device)
                for r in range(d):
                    full[r::d, r::d] += m
                total += full
                continue
            if c.split > 1:
                chunk = self.seq_kv // c.split if c.kv_slice is None else (c.kv_slice[1] - c.kv_slice[0]) // c.split
                m = m.repeat(1, c.split)[:, :chunk * c.split]
            part = torch.zeros(m.shape[0], self.seq_kv, dtype=torch.int32, device=device)
            part.index_add_(1, self._keys_of(c, device), m)
            if c.overrides_rows:
                rows.append((c.q_index.to(device), part))
            else:
                total += part
        for idx, part in rows:
            total[idx] = 0
        for idx, part in rows:
            total[idx] += part
        return total

    def kept_pairs(self) -> list[int]:
        """Kept pairs that each component contributes (one batch entry and head), counted tile by tile;
        rows that a row component replaces count for it alone."""
        out, block_q, block_kv = [], self.block_q, self.block_kv
        ctx = self.context(1, 1, "cpu")
        owned = [c.q_index.cpu() for c in self.components if c.overrides_rows]
        owned = torch.unique(torch.cat(owned)) if owned else None
        for c in self.components:
            bm = c.block_mask(ctx, block_q, block_kv, "cpu")
            lost = 0
            if owned is not None and not c.overrides_rows:
                lost = int(self._component_mask(c, bm, "cpu", owned).sum())
            nq, nk = c.kernel_shape()
            if bm is None:
                out.append(nq * nk * c.split - lost)
                continue
            bq, bk = bm.block_q, bm.block_kv        # (a component's own blocks, or the plan's)
            rows_n = torch.full((bm.num_q_blocks,), bq)
            rows_n[-1] = nq - bq * (bm.num_q_blocks - 1)
            cols_n = torch.full((bm.num_kv_blocks,), bk)
            cols_n[-1] = nk - bk * (bm.num_kv_blocks - 1)
            kind = bm.kind[0, 0]
            total = int(((kind == FULL) * rows_n.view(-1, 1) * cols_n.view(1, -1)).sum())
            for qb in torch.nonzero((kind == PARTIAL).any(1)).flatten().tolist():
                q0, q1 = qb * bq, min((qb + 1) * bq, nq)
                qp = (torch.arange(q0, q1) + nk - nq) if c.q_pos is None else c.q_pos[q0:q1].cpu()
                kbs = torch.nonzero(kind[qb] == PARTIAL).flatten()
                ki = (kbs.view(-1, 1) * bk + torch.arange(bk)).flatten()
                ki = ki[ki < nk]
                kp = ki if c.kv_pos is None else c.kv_pos.cpu()[ki]
                zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
                keep = bm.pattern.predicate(zero, zero, qp.view(1, 1, -1, 1), kp.view(1, 1, 1, -1))
                total += int(keep.expand(1, 1, qp.numel(), kp.numel()).sum())
            out.append(total * c.split * c.fold - lost)
        return out

    # -- printing -------------------------------------------------------------------------------------
    def describe(self) -> str:
        kept, block_q, block_kv = self.kept_pairs(), self.block_q, self.block_kv
        lines = [f"plan of {self.pattern!r} for {self.seq_q} queries x {self.seq_kv} keys "
                 f"(tiles {block_q}x{block_kv}): {len(self.components)} component(s), "
                 f"{sum(kept):,} kept pairs per (batch, head)"]
        ctx = self.context(1, 1, "cpu")
        for c, n in zip(self.components, kept):
            bm = c.block_mask(ctx, block_q, block_kv, "cpu")
            nq, nk = c.kernel_shape()
            size = f"{nq} q x {nk} k"
            if c.split > 1:
                size += f" x {c.split} key chunks"
            if c.fold > 1:
                size += f" in each of {c.fold} classes (heads x {c.fold})"
            if bm is None:
                tiles = "dense"
            else:
                full, part = int((bm.kind == FULL).sum()), int((bm.kind == PARTIAL).sum())
                visited = bm.block_density() * nq * nk * c.fold
                tiles = f"tiles full {full} partial {part}, {n / max(visited, 1):.0%} of visited pairs kept"
            lines.append(f"  {c.role:8s} {size}: {n:,} pairs; {tiles}; {c.note}")
        merge = [c.role for c in self.components if not c.overrides_rows]
        if len(merge) > 1:
            triton = ""
            if self.local_and_columns:
                triton = " (Triton, unless deterministic: one launch with two key sources, no merge)"
            elif self.natural:
                triton = " (Triton, eager: each launch goes on from the output and LSE so far, no merge)"
            lines.append(f"  merge: {' + '.join(merge)} by log-sum-exp{triton}")
        if len(self.components) > 1 and self.natural:
            lines.append("  backward (Triton): the whole pattern in one pass over the output and LSE")
        over = [c.role for c in self.components if c.overrides_rows]
        if over:
            lines.append(f"  rows: {', '.join(over)} replace their rows")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self):
        return f"Plan({self.pattern!r}: {', '.join(c.role for c in self.components)})"


def plan(pattern: Pattern, seq_q: int, seq_kv: int | None = None, *, block_q: int = 128, block_kv: int = 128,
         exact_positions: bool = False, device="cpu") -> Plan | None:
    """Plan ``pattern`` for ``seq_q`` queries against ``seq_kv`` keys (queries aligned to the end).

    Returns None when there is nothing to gain over the pattern's BlockMask (no scattered columns, global
    rows or dilation) or when the pattern is not built from the structured blocks the planner reads.
    ``exact_positions``: every component must see the true positions (ALiBi reads them), so no position
    substitution is used.
    """
    seq_kv = seq_q if seq_kv is None else seq_kv
    if not isinstance(pattern, Pattern) or seq_q > seq_kv or seq_q <= 0:
        return None
    if pattern.varies_with_batch or pattern.varies_with_heads:
        return None
    device = torch.device(device)
    ctx = BuildContext(1, 1, seq_q, seq_kv, device)
    prepared = pattern.prepare(ctx)
    parts = _read(prepared)
    if parts is None:
        return None
    clip, notes, comps = parts.clip, [], []
    if parts.dilation > 1:
        d = parts.dilation
        if seq_q % d == 0 and seq_kv % d == 0:
            band = Band(-INF if clip.lo <= -INF else -((-clip.lo) // d), INF if clip.hi >= INF else clip.hi // d)
            comps.append(Component("classes", band, seq_q // d, seq_kv // d, fold=d,
                                   note=f"sliding window {_band_str(band)} over class indices"))
        else:
            notes.append(f"lengths not divisible by the dilation {d}: one gathered component per class")
            q_all = torch.arange(seq_kv - seq_q, seq_kv, device=device)
            for r in range(min(d, seq_kv)):     # (a sequence shorter than the dilation has fewer classes)
                qi = q_all[q_all % d == r]
                if qi.numel() == 0:
                    continue
                ki = torch.arange(r, seq_kv, d, device=device)
                comps.append(Component("class", clip, qi.numel(), ki.numel(), q_index=qi - (seq_kv - seq_q),
                                       kv_index=ki,
                                       q_pos=qi, kv_pos=ki, note=f"residue {r}: {_band_str(clip)}"))
        return Plan(pattern, prepared, seq_q, seq_kv, comps, notes, block_q, block_kv, exact_positions)
    fine = _fine_layouts(parts.local, block_q, block_kv)
    if not parts.columns and not parts.rows and not fine:
        return None
    local = list(parts.local)
    columns = []
    if parts.columns:
        col_pos = _column_positions(parts.columns, seq_kv, device)
        only_explicit = all(isinstance(c, Positions) for c in parts.columns)
        if only_explicit and _tiles_spanned(col_pos, block_kv) <= FOLD_COLUMN_TILES:
            local += parts.columns
            notes.append(f"{col_pos.numel()} global columns span <= {FOLD_COLUMN_TILES} key tiles: kept in "
                         f"the local BlockMask")
        elif col_pos.numel():
            columns.append((col_pos, _periodic_stride(parts.columns, col_pos.numel())))
    rows = _row_positions(parts.rows, seq_q, seq_kv, device) if parts.rows else None
    if rows is not None and not columns and _tiles_spanned(rows - (seq_kv - seq_q), block_q) <= FOLD_COLUMN_TILES:
        # nothing gathered: one BlockMask with the global rows as in-kernel terms beats a second launch and a
        # merge; the kernels start the rows' query block first (heaviest first), so its walk over every key
        # tile overlaps the rest (H100, 1 x 64k Longformer forward: 1.52 ms folded, 1.63 split over the keys)
        local += parts.rows
        notes.append(f"{rows.numel()} global queries span <= {FOLD_COLUMN_TILES} query tiles: kept in the local "
                     f"BlockMask")
        rows = None
    # (the gathered columns below exclude every local pair, the fine layouts' too)
    rest = [p for p in local if not any(p is f for f in fine)]
    if rest:
        # SameBlock / layouts whose tiles are exact at the tile size: the tiles enforce them, and partial
        # tiles only need the clip band (a plain band in the kernel).
        local_pat = _and(_union(rest), clip if not _is_full(clip) else None)
        grid_only = (seq_kv - seq_q) % block_q == 0 and all(
            isinstance(p, SameBlock) and p.size % block_kv == 0 and p.size % block_q == 0 for p in rest)
        pattern_in_tiles = (clip if not _is_full(clip) else None) if grid_only else local_pat
        if grid_only and pattern_in_tiles is None:
            pattern_in_tiles = Band(-INF, INF)
        comps.append(Component("local", pattern_in_tiles, seq_q, seq_kv, grid_pattern=local_pat,
                               note=_text(local_pat) + (" (tiles enforce the blocks)" if grid_only else "")))
    if fine:
        blocks_pat = _and(_and(_union(fine), Complement(_union(rest))), clip if not _is_full(clip) else None)
        size = min(f.block for f in fine)
        # (the kernels take BlockMask blocks of multiples of 32; finer layouts take the plan's blocks)
        comps.append(Component("blocks", blocks_pat, seq_q, seq_kv, block=size if size % 32 == 0 else None,
                               note=f"block layout at {size} positions, less the local pairs"))
    for col_pos, kv_stride in columns:
        pat, kv_pos, text = _excluding_local(clip, local, exact_positions, seq_kv, col_pos)
        if pat is None:
            continue
        comps.append(Component("columns", pat, seq_q, col_pos.numel(), kv_index=col_pos, kv_stride=kv_stride,
                               kv_pos=col_pos if kv_pos is None else kv_pos,
                               q_pos=torch.arange(seq_kv - seq_q, seq_kv, device=device),
                               note=f"{col_pos.numel()} gathered keys; {text}"))
    if rows is not None:
        if rows.numel() and comps and Plan(pattern, prepared, seq_q, seq_kv, comps, [], block_q, block_kv,
                                           exact_positions).gives_rows_their_keys(rows):
            notes.append(f"{rows.numel()} global queries already see exactly their keys in the other components")
        elif rows.numel():
            lo = 0 if clip.hi >= INF else max(0, int(rows.min()) - clip.hi)
            hi = seq_kv if clip.lo <= -INF else min(seq_kv, int(rows.max()) - clip.lo + 1)
            width = hi - lo
            split = 1
            if _is_full(clip) and not exact_positions:
                split = max(1, width // ROW_CHUNK)
                while width % split:
                    split -= 1
            row_pat = None if _is_full(clip) else clip
            # keys in [lo, hi): positions lo + j; natural positions only when lo == 0 and nothing is split
            kv_pos = None if lo == 0 else torch.arange(lo, hi, device=device)
            comps.append(Component("rows", row_pat, rows.numel(), width, q_index=rows - (seq_kv - seq_q),
                                   kv_slice=(lo, hi),
                                   q_pos=rows, kv_pos=kv_pos, split=split,
                                   note=f"{rows.numel()} global queries see keys [{lo}, {hi})"
                                        + (f" in {split} chunks merged by LSE" if split > 1 else "")))
    if [c.role for c in comps] == ["local"]:
        return None     # the whole pattern in one BlockMask: the plain path runs exactly that
    return Plan(pattern, prepared, seq_q, seq_kv, comps, notes, block_q, block_kv, exact_positions)


__all__ = ["Plan", "Component", "plan"]

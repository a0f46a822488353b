"""Patterns composed with ``|``, ``&`` and ``~``: their predicates and their block bounds, exact where the parts'
are, with the blocks two parts share partly decided by evaluating the predicate."""

from __future__ import annotations

import torch

from .patterns import BuildContext, Pattern, _as4d


class Union(Pattern):
    def __init__(self, *parts: Pattern):
        flat = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Union) else [p])
        self.parts = tuple(flat)
        self.varies_with_batch = any(p.varies_with_batch for p in self.parts)
        self.varies_with_heads = any(p.varies_with_heads for p in self.parts)

    def prepare(self, ctx):
        return Union(*(p.prepare(ctx) for p in self.parts))

    def predicate(self, b, h, q, k):
        out = self.parts[0].predicate(b, h, q, k)
        for p in self.parts[1:]:
            out = out | p.predicate(b, h, q, k)
        return out

    def block_bounds(self, ctx, q0, q1, k0, k1):
        bounds = [p.block_bounds(ctx, q0, q1, k0, k1) for p in self.parts]
        any_ = _reduce(torch.logical_or, [a for a, _ in bounds])
        all_ = _reduce(torch.logical_or, [l for _, l in bounds])
        # A block that two parts each cover partly may be covered fully by the two together.
        touched = _reduce(torch.add, [a.to(torch.int8) for a, _ in bounds])
        return _refine(self, ctx, q0, q1, k0, k1, any_, all_, (touched >= 2) & ~all_)

    def __repr__(self):
        return " | ".join(_paren(p) for p in self.parts)


class Intersection(Pattern):
    def __init__(self, *parts: Pattern):
        flat = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Intersection) else [p])
        self.parts = tuple(flat)
        self.varies_with_batch = any(p.varies_with_batch for p in self.parts)
        self.varies_with_heads = any(p.varies_with_heads for p in self.parts)

    def prepare(self, ctx):
        return Intersection(*(p.prepare(ctx) for p in self.parts))

    def predicate(self, b, h, q, k):
        out = self.parts[0].predicate(b, h, q, k)
        for p in self.parts[1:]:
            out = out & p.predicate(b, h, q, k)
        return out

    def block_bounds(self, ctx, q0, q1, k0, k1):
        bounds = [p.block_bounds(ctx, q0, q1, k0, k1) for p in self.parts]
        any_ = _reduce(torch.logical_and, [a for a, _ in bounds])
        all_ = _reduce(torch.logical_and, [l for _, l in bounds])
        # Two parts that each keep some pairs of a block may keep disjoint ones: the block may be empty.
        partly = _reduce(torch.add, [(a & ~l).to(torch.int8) for a, l in bounds])
        return _refine(self, ctx, q0, q1, k0, k1, any_, all_, any_ & (partly >= 2))

    def __repr__(self):
        return " & ".join(_paren(p) for p in self.parts)


class Complement(Pattern):
    """The pairs that ``inner`` does not keep (``~inner``)."""

    def __init__(self, inner: Pattern):
        self.inner = inner
        self.varies_with_batch = inner.varies_with_batch
        self.varies_with_heads = inner.varies_with_heads

    def prepare(self, ctx):
        return Complement(self.inner.prepare(ctx))

    def predicate(self, b, h, q, k):
        # logical, not bitwise: a predicate that answers 0/1 integers would give -1/-2 (both kept) under ``~``
        return torch.logical_not(self.inner.predicate(b, h, q, k))

    def block_bounds(self, ctx, q0, q1, k0, k1):
        # a block the inner pattern keeps whole is empty here and one it drops whole is full; the inner's
        # over-approximated ``any`` becomes an under-approximated ``all`` and vice versa, so they stay safe
        any_, all_ = self.inner.block_bounds(ctx, q0, q1, k0, k1)
        return ~all_, ~any_

    def __invert__(self) -> Pattern:
        return self.inner

    def __repr__(self):
        return f"~{_paren(self.inner)}"


def _reduce(op, xs):
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


#: elements of the predicate evaluated at once when deciding ambiguous blocks
_REFINE_CHUNK = 1 << 24


def _refine(pattern: Pattern, ctx: BuildContext, q0, q1, k0, k1, any_, all_, ambiguous):
    """Decide the ``ambiguous`` blocks of a composition exactly, by evaluating its predicate on them.

    Exact parts composed with | and & give exact block bounds except where two parts overlap partly inside
    one block; structured patterns have O(N / block) such blocks (the edges of bands), so this stays linear.
    The predicate sees 5-D tensors ``(batch, heads, block, q, k)``: element-wise predicates broadcast.
    """
    amb = ambiguous.reshape(-1, *ambiguous.shape[-2:]).any(0)
    if not bool(amb.any()):
        return any_, all_
    qi, ki = amb.nonzero(as_tuple=True)
    qs, qe = q0.flatten()[qi], q1.flatten()[qi]
    ks, ke = k0.flatten()[ki], k1.flatten()[ki]
    bq, bk = int((qe - qs).max()) + 1, int((ke - ks).max()) + 1
    dev = ctx.device
    # Patterns that are the same for every sequence / head are evaluated once.
    nb = ctx.batch if pattern.varies_with_batch else 1
    nh = ctx.heads if pattern.varies_with_heads else 1
    b = torch.arange(nb, device=dev).view(-1, 1, 1, 1, 1)
    h = torch.arange(nh, device=dev).view(1, -1, 1, 1, 1)
    step = max(1, _REFINE_CHUNK // (bq * bk * nb * nh))
    counts = []
    for s in range(0, qi.numel(), step):
        sl = slice(s, s + step)
        qpos = qs[sl, None] + torch.arange(bq, device=dev)
        kpos = ks[sl, None] + torch.arange(bk, device=dev)
        valid = (qpos <= qe[sl, None])[:, :, None] & (kpos <= ke[sl, None])[:, None, :]
        # Positions past a short last block are clamped to a real position, then ignored.
        qpos, kpos = torch.minimum(qpos, qe[sl, None]), torch.minimum(kpos, ke[sl, None])
        m = pattern.predicate(b, h, qpos[None, None, :, :, None], kpos[None, None, :, None, :])
        counts.append((torch.as_tensor(m, device=dev) & valid).sum((-2, -1)))
    shapes = [c.shape[:2] for c in counts] + [any_.shape[:-2] if any_.dim() == 4 else (1, 1)]
    lead = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    count = torch.cat([c.expand(*lead, -1) for c in counts], -1)
    area = (qe - qs + 1) * (ke - ks + 1)
    any_ = _as4d(any_).expand(*lead, *amb.shape).clone()
    all_ = _as4d(all_).expand(*lead, *amb.shape).clone()
    any_[:, :, qi, ki] = count > 0
    all_[:, :, qi, ki] = count == area
    return any_, all_


def _paren(p: Pattern) -> str:
    return f"({p!r})" if isinstance(p, (Union, Intersection)) else repr(p)



"""Keeping Triton from computing a chained dot once per warpgroup.

Triton lays out a dot whose result reaches another dot with every warp on M (``warpsPerTileV3`` on Hopper,
the MMAv2 rule elsewhere), so that the second dot's operand stays in registers. Where M is shorter than 16 rows
a warp (an MMA tile is 16 rows a warp, 64 a warpgroup: a 64-row tile with 8 warps) the warpgroups then each
compute the whole first product: MLA's decode (64 heads a program), the flash forward's 64-row query tiles and
the dK/dV pass's 64-key tiles (BigBird's 64-blocks) all ran 1.4-1.5x the tensor work they needed.

The search is MLIR's forward slice of the first dot's result, and a forward slice stops at a branch's yield.
So the operand of the second dot (and anything else that reaches it from the first: the online softmax's
rescaled accumulator) is made inside a branch that a runtime scalar, always true, takes: the first dot then
gets its own layout (the warpgroups split its columns) and the operand reaches the second dot through shared
memory. The branch's other side only has to be something the compiler cannot fold into a select.
"""

from __future__ import annotations

import triton
import triton.language as tl


def chains_replicate(rows: int, num_warps: int) -> bool:
    """Whether a chained dot whose first product has ``rows`` rows runs once per warpgroup with ``num_warps``
    warps (fewer than 16 rows a warp)."""
    return rows < 16 * num_warps


@triton.jit
def unchained(x, live, DTYPE: tl.constexpr):
    """``x.to(DTYPE)``, made in a branch taken when ``live`` (a runtime scalar that is true)."""
    if live:
        y = x.to(DTYPE)
    else:
        y = (x * 0.0).to(DTYPE)
    return y


@triton.jit
def unchained_rescaled(p, acc, alpha, live, DTYPE: tl.constexpr):
    """An online softmax's step before its P.V product: ``p.to(DTYPE)`` and ``acc * alpha[:, None]``, both made
    in a branch taken when ``live`` (``alpha`` comes from the scores, so the accumulator must cross there too)."""
    if live:
        p_op = p.to(DTYPE)
        acc = acc * alpha[:, None]
    else:
        p_op = (p * 0.0).to(DTYPE)
    return p_op, acc

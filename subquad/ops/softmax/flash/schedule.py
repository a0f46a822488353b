"""How a flash pass's programs share out its work: a few very long BlockMask walks cut into pieces (``walk_pieces``),
the order of the walks (heads fastest or head by head, ``launch.MaskArgs.head_major``) and the end of a
head-by-head order (``tail_heads``). The kernels' side is ``tile.heavy_first``; each number below was measured
or simulated where it says."""

from __future__ import annotations

import torch


#: a key block's dK/dV walk longer than four times the median walk is cut into pieces of twice the median (at
#: least WALK_PIECE_MIN query blocks each), when it is also longer than PIECE_LOAD times the pass's mean work per
#: SM: only then does that one program outlast the pass. H200 (benchmarks/results/2026-12-04-longformer-walk-
#: pieces-stall-fixed-h200.json): at 1.18 (Longformer 1 x 64k) cutting took fwd+bwd from 6.50 to 5.81 ms; at
#: 0.6 (Longformer 2 x 16k, BigBird 1 x 64k) and 0.3 (BigBird 2 x 16k) it cost 1-5%
WALK_PIECE_MIN = 8
PIECE_LOAD = 1.0
#: a backward with dQ programs beside its dK/dV programs (no atomics, no fp32 dQ) runs both passes' walks in one
#: grid, about twice the dK/dV pass's work: its walks are whole unless one is longer than this times the dK/dV
#: pass's mean work per SM. Longformer 1 x 64k (1.18) had been cut and so atomic, whose fp32 dQ's zeroing and
#: conversion took 0.44 of its 5.75 ms fwd+bwd on the H100 (2026-12-06-plan-profile-longformer-h100.json);
#: at 2 x 16k (0.6) the dQ programs ran 1.06x faster than the atomic sums (2026-12-05-flash-h100.json). With
#: this rule 1 x 64k takes the dQ programs (its walks start heaviest first, the global columns' at 0.59 of the
#: mean work an SM then gets): fwd+bwd 5.76 -> 5.26 ms on the H100 (2026-12-06-dq-programs-two-source-ab-h100.json)
DQ_PROGRAMS_LOAD = 2.0
#: the forward's PIECE_LOAD: a query block's walk (the global rows of Longformer / BigBird, every key block)
#: is cut into pieces in the same launch when longer than this times the pass's mean work per SM. Offline
#: estimate, NOT MEASURED: at 1 x 64k those rows' walk (1,024 tiles at 64-blocks, 0.75 (Longformer) and 0.59
#: (BigBird) of the mean on 132 SMs; 0.38 / 0.30 at 2 x 16k) matches the whole forward's time if a masked global
#: tile costs ~1.2 / ~2.9 us, which would make it the pass's critical path (16k -> 64k growth 4.62x / 5.42x,
#: the other blocks' work grows 4x)
FWD_PIECE_LOAD = 0.5
#: the forward cuts such a walk into this many pieces at most (longer than the dK/dV pass's, 2x the median walk:
#: each piece's rows go to an fp32 buffer merged after the launch, 27 MB at 1 x 64k with 52 pieces a head)
FWD_MOST_PIECES = 8
#: a pass's BlockMask walks go heads fastest, heaviest first (``tile.heavy_first``), where some block walks more
#: than this many times the mean block's tiles (the query block of global rows, the key block of global columns),
#: so that those walks start first. Neighbouring programs then read different heads' keys: rows of like length lose
#: the L2 reuse of one head's blocks side by side. Block-sparse at density 0.1, 2 x 16k on the H100 (no heavy
#: block: the longest row ~2x the mean): 1.12 ms forward in the grid's order (2026-11-23), 1.39 ms heavy first
#: (2026-12-05), ~3.5 GB of K/V tiles read from memory at ~3 TB/s
HEAVY_WALK = 3.0
#: ... and also where head by head the longest walk, which the last head starts near the pass's end, would be more
#: than this share of the mean work an SM gets. Fixed's gathered summary columns (2 x 16k, 16 heads: 8 key blocks a
#: head walking 16-128 query blocks, 256 walks on 132 SMs; longest 0.92 of the mean work an SM) ran their dK/dV
#: pass 1.26-1.6x the ideal in a schedule simulation head by head, 1.03x heads fastest; the H100 measured its
#: fwd+bwd 3.10 ms heads fastest (57934e6) and 3.48 head by head (737cf30). Block-sparse 0.1 at 2 x 16k: 0.06
TAIL_SHARE = 0.25
#: the forward's head-by-head order ends on the last heads side by side (``tile.heavy_first``'s ``tail_heads``),
#: as many as hold about this many waves of its programs (two an SM, the BlockMask walks' tile). Simulated
#: (benchmarks/schedule_sim.py), block-sparse 2 x 16k (32 heads of 128 query blocks, 264 slots) ends 4.2% after
#: the ideal at density 0.1 head by head, 0.5% with the last 4 heads side by side (0.25: 2.0 -> 1.2%; 1 x 64k
#: and its 512 blocks a head: no change, one head). H100, two A/B runs of 3 and 4 rounds against the head-by-head
#: order (2026-12-07-tail-heads-ab-h100.json), forward: density 0.1 1.005x / 1.019x, 0.25 1.042x / 0.996x, 0.5
#: 1.028x; fwd+bwd 0.998-1.010x.
TAIL_WAVES = 2


def tail_heads(items: int, rows: int, sms: int) -> int:
    """The forward's ``tail_heads`` (``TAIL_WAVES``) for ``rows`` (batch, head) pairs of ``items`` query blocks."""
    return max(1, min(rows, round(TAIL_WAVES * 2 * sms / max(items, 1))))


def walk_pieces(full_num: torch.Tensor, part_num: torch.Tensor, programs: int, sms: int,
                load: float | None = None, most: int | None = None) -> tuple:
    """The dK/dV schedule when a few key blocks walk far more query blocks than the rest, else ``()`` (the
    forward's likewise, on the query blocks' lists; ``load``: ``PIECE_LOAD`` unless given; ``most``: pieces
    a walk is cut into at most).

    Global columns (Longformer's, BigBird's first tokens, attention sinks) make their key block walk every
    query block: at 1 x 64k, 512 of them in one program while the band's blocks walk ~6, so that one program
    outlasts the pass (Longformer fwd+bwd grew 4.6x from 16k to 64k per sequence, a window alone 4.0x). Such a
    walk is cut into pieces, programs of the same launch adding into a small fp32 buffer. ``programs``:
    the (batch, KV head) pairs that each walk every block; ``sms``: the GPU's. Returns
    ``(whole, pieces, piece_len, blocks, slot, n_pieces)``: ``whole`` (1, 1, n) int32, the other blocks heaviest
    first, and ``pieces`` (1, 1, m) int32, ``block + n_blocks * piece`` for the cut ones (the kernels'
    ``heavy_first`` items); ``blocks`` the cut blocks; ``slot`` (n_blocks,) int32, each block's place in the
    buffer or -1; ``n_pieces`` the most pieces of a cut block. Only for BlockMasks that are the same for every
    batch and head."""
    if full_num.shape[0] != 1 or full_num.shape[1] != 1:
        return ()
    work = (full_num[0, 0].long() + part_num[0, 0].long()).cpu()
    busy = work[work > 0]
    if busy.numel() == 0:
        return ()
    longest = int(work.max())
    piece = max(WALK_PIECE_MIN, 2 * int(busy.median()), -(-longest // most) if most else 0)
    if longest <= 2 * piece or longest * sms <= (PIECE_LOAD if load is None else load) * programs * int(work.sum()):
        return ()
    n = work.numel()
    counts = -(-work // piece)
    cut = torch.nonzero(counts > 1).flatten()
    rest = torch.nonzero(counts <= 1).flatten()
    whole = rest[torch.argsort(work[rest], descending=True, stable=True)]
    block = torch.repeat_interleave(cut, counts[cut])
    index = torch.arange(block.numel()) - torch.repeat_interleave(torch.cumsum(counts[cut], 0) - counts[cut],
                                                                  counts[cut])
    slot = torch.full((n,), -1, dtype=torch.int32)
    slot[cut] = torch.arange(cut.numel(), dtype=torch.int32)
    device = full_num.device
    items = (block + n * index).to(torch.int32).view(1, 1, -1)
    return (whole.to(torch.int32).view(1, 1, -1).to(device), items.to(device), piece, cut.to(device), slot.to(device),
            int(counts.max()))

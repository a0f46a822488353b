"""When a BlockMask forward pass ends under each order the kernels can take, simulated on a CPU: the programs'
places come from the kernels' own ``tile.heavy_first`` (run by Triton's interpreter), each program lasts its
query block's walk plus a fixed cost, and each starts on the first slot to free up (two programs an SM for the
BlockMask walks' tile). Printed: each order's end against the ideal (all the work spread evenly over the slots).

    python benchmarks/schedule_sim.py --density 0.1 --batch 2 --heads 16 --seqlen 16384 --slots 264

The flash suite's block-sparse layouts (one random layout of 128 x 128 cells, seed 0, for every head). The
numbers behind ``schedule.TAIL_WAVES``: the head-by-head order at density 0.1, 2 x 16k, ends 4.2% after the
ideal, and 0.5% with its last heads side by side.
"""

from __future__ import annotations

import argparse
import heapq
import os

os.environ["TRITON_INTERPRET"] = "1"       # (before Triton is imported) heavy_first runs on the CPU

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from subquad import masks  # noqa: E402
from subquad.bench.suites.flash import _layout  # noqa: E402
from subquad.ops.softmax.flash import _block_mask_args, schedule  # noqa: E402
from subquad.ops.softmax.flash.tile import heavy_first  # noqa: E402


@triton.jit
def _places(ORDER, OUT, n_items, n_bh, tail_heads, HEADS: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Each program's query block, at its place in the grid's linear order (one BlockMask for every head)."""
    tile, pid_bh, piece = heavy_first(ORDER, n_items, n_items, 1, 1, HEADS, 1, 1, tl.program_id(0),
                                      tl.num_programs(0), n_bh, 0, False, HEAD_MAJOR, tail_heads)
    linear = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + linear, tile)


def pass_end(walks: list, order: list, slots: int, cost: float) -> float:
    """When the last program ends, programs taken in ``order`` by the first free of ``slots``."""
    free = [0.0] * slots
    end = 0.0
    for block in order:
        start = heapq.heappop(free)
        end = max(end, start + walks[block] + cost)
        heapq.heappush(free, start + walks[block] + cost)
    return end


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--slots", type=int, default=264, help="programs running at once (SMs x programs an SM)")
    ap.add_argument("--cost", type=float, default=1.0, help="a program's fixed cost, in key blocks")
    args = ap.parse_args()
    n, rows = args.seqlen, args.batch * args.heads
    bm = masks.resolve(masks.block_sparse(_layout(n, args.density), 128), causal=False, batch=args.batch,
                       heads=args.heads, seq_q=n, seq_kv=n, device="cpu", block_q=128, block_kv=128)
    m = _block_mask_args(bm, None, None)
    walks = (m.lists[0][0, 0] + m.lists[2][0, 0]).tolist()
    n_items = len(walks)
    ideal = (sum(walks) + args.cost * n_items) * rows / args.slots
    tail = schedule.tail_heads(n_items, rows, args.slots // 2)
    for name, head_major, tail_heads in (("heads fastest", False, 1), ("head by head", True, 1),
                                         (f"head by head, last {tail} side by side", True, tail)):
        out = torch.empty(rows * n_items, dtype=torch.int32)
        _places[(n_items, rows)](m.order, out, n_items, rows, tail_heads, HEADS=args.heads, HEAD_MAJOR=head_major)
        end = pass_end(walks, out.tolist(), args.slots, args.cost)
        print(f"{name:40s} ends at {end / ideal:.4f} x the ideal")


if __name__ == "__main__":
    main()

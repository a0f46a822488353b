"""NSA's selection with its top-k kept in the kernel against keys ranked by ``torch.topk``, alternately in one
process (``subquad.ops.nsa.selection_kernel.KEEP_TOP_IN_KERNEL``): forward medians and the selections compared.

    PYTHONPATH=. python3 benchmarks/gpu/nsa_topk_ab.py     # $OUT/nsa_topk_ab.json

The dynamic suite's NSA shapes: 64 query heads over 4 KV heads of 128, bf16, compression 32 every 16, top 16
blocks of 64, window 512, at 2 x 16k and 1 x 64k.
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

import subquad as sq
from subquad.bench.harness import versions
from subquad.ops.nsa import selection_kernel


def main():
    rows = []
    for batch, n in ((2, 16384), (1, 65536)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, n, h, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
                   for h in (64, 4, 4))
        gates = torch.sigmoid(torch.randn(batch, n, 64, 3, generator=gen, device="cuda")).to(torch.bfloat16)
        times, picked = {False: [], True: []}, {}
        for _ in range(2):
            for keep in (False, True):
                selection_kernel.KEEP_TOP_IN_KERNEL = keep
                picked[keep] = sq.nsa(q, k, v, gates, return_indices=True)[1]
                times[keep].append(triton.testing.do_bench(lambda: sq.nsa(q, k, v, gates), warmup=50, rep=300))
        row = {"batch": batch, "seqlen": n, "torch_topk_ms": min(times[False]), "in_kernel_ms": min(times[True]),
               "rounds": {str(key): value for key, value in times.items()},
               "same_selection": bool(torch.equal(picked[False], picked[True])),
               "device": torch.cuda.get_device_name(), "versions": versions()}
        print(json.dumps({key: row[key] for key in ("batch", "seqlen", "torch_topk_ms", "in_kernel_ms",
                                                      "same_selection")}), flush=True)
        rows.append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "nsa_topk_ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""What global tokens cost on top of their band: Longformer's and BigBird's window alone against the whole
pattern, forward and fwd+bwd at 2 x 16k and 1 x 64k (16 heads, D 128, bf16, do_bench medians), in one process.

    PYTHONPATH=. python3 benchmarks/gpu/global_tokens_cost.py      # writes $OUT/global_tokens_cost.json

Issue 9 asks the time from 16k to 64k to grow at most 4.4x a sequence; the band alone sets the floor (3.97x in
fwd+bwd on the H200, 2026-12-04), the global tokens' extra (0.67 ms at 2 x 16k, 2.25 ms at 1 x 64k there) is
what grows faster. Run it before and after a change to the global tokens' schedule.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

import torch
import triton.testing

from subquad import attention, masks
from subquad.bench.harness import versions

GLOBAL = list(range(16))
CASES = {
    "window512": lambda: masks.longformer(512, []),
    "longformer512+16": lambda: masks.longformer(512, GLOBAL),
    "bigbird512+16+3x64": lambda: masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0),
}


def main():
    rows = []
    for batch, n in ((2, 16384), (1, 65536)):
        q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        for name, make in CASES.items():
            pattern = make()
            fwd = lambda: attention(q, k, v, mask=pattern, backend="triton")
            fwdbwd = lambda: torch.autograd.grad(fwd(), (q, k, v), grad)
            fwdbwd()
            torch.cuda.synchronize()
            rows.append({"case": name, "batch": batch, "seqlen": n,
                         "fwd_ms": round(triton.testing.do_bench(fwd, warmup=10, rep=50, return_mode="median"), 4),
                         "fwdbwd_ms": round(triton.testing.do_bench(fwdbwd, warmup=10, rep=50,
                                                                    return_mode="median"), 4)})
            print(rows[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "global_tokens_cost.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

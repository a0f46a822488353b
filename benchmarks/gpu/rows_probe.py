"""Global rows of Longformer / BigBird: folded into the BlockMask (one program per head walks every key tile
for the query tile that holds them) or run as the planner's row component (split over the keys, merged by
LSE), timed through ``subquad.attention`` at 2 x 16k and 1 x 64k, fwd and fwd+bwd (bf16, 16 heads, D 128).

Device run: ``PYTHONPATH=. python3 benchmarks/gpu/rows_probe.py``; writes ``$OUT/rows_probe.json``.
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

from subquad import attention, masks
from subquad.masks import plan as plan_mod

GLOBAL = list(range(16))
PATTERNS = {"longformer512+16": lambda: masks.longformer(512, GLOBAL),
            "bigbird512+16+3x64": lambda: masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0)}


def main():
    rows = []
    for name, make in PATTERNS.items():
        for batch, n in ((2, 16384), (1, 65536)):
            q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            d_out = torch.randn_like(q)
            for variant, limit in (("folded", 1 << 30), ("split", 0)):
                plan_mod.ROW_FOLD_MAX_KV = limit
                pattern = make()            # a new object: plans are cached per pattern
                for mode in ("fwd", "fwdbwd"):
                    if mode == "fwd":
                        def call():
                            with torch.no_grad():
                                attention(q, k, v, mask=pattern, backend="triton")
                    else:
                        def call():
                            attention(q, k, v, mask=pattern, backend="triton").backward(d_out)
                    call()
                    ms = triton.testing.do_bench(call, grad_to_none=[q, k, v], return_mode="median")
                    rows.append({"pattern": name, "batch": batch, "seqlen": n, "variant": variant, "mode": mode,
                                 "ms": ms, "device": torch.cuda.get_device_name()})
                    print(f"{name:20s} {batch}x{n:<6} {variant:7s} {mode:7s} {ms:8.3f} ms", flush=True)
                    with open(os.path.join(os.environ.get("OUT", "."), "rows_probe.json"), "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

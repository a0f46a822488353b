"""Where one ``subquad.attention`` fwd+bwd spends its GPU time, kernel by kernel (torch.profiler).

    PYTHONPATH=. python3 benchmarks/gpu/kernel_breakdown.py [--cases causal-1k,window4096-16k]
        # $OUT/kernel_breakdown.json

For each case (16 heads, D 128, bf16): a warm-up, then ten fwd+bwd calls under the profiler; per kernel name its
share of the device time and its time per call. The flash passes are the forward, the preprocess, the dK/dV
pass (with dQ's atomic sums) and the elementwise work around them (dQ's fp32 buffer zeroed, then cast).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os

import torch

from subquad import attention, masks
from subquad.bench.harness import versions
from subquad.bench.profiling import kernel_times

CASES = {
    "causal-1k": (32, 1024, lambda: masks.causal),
    "causal-16k": (2, 16384, lambda: masks.causal),
    "full-1k": (32, 1024, lambda: None),
    "window4096-16k": (1, 16384, lambda: masks.sliding_window(4096)),
    "longformer-16k": (2, 16384, lambda: masks.longformer(512, list(range(16)))),
}
CALLS = 10


def breakdown(name: str) -> dict:
    batch, n, make = CASES[name]
    mask = make()
    q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        return torch.autograd.grad(attention(q, k, v, mask=mask, backend="triton"), (q, k, v), grad)

    for _ in range(2):
        step()
    per_kernel = kernel_times(step, CALLS)
    total = sum(t.us for t in per_kernel.values())
    rows = [{"kernel": kname[:90], "us_per_call": round(t.us, 1), "share": round(t.us / total, 4)}
            for kname, t in per_kernel.items()]
    return {"case": name, "batch": batch, "seqlen": n, "device_us_per_call": round(total, 1),
            "kernels": rows}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    out = []
    for name in args.cases.split(","):
        out.append(breakdown(name))
        print(f"{name}: {out[-1]['device_us_per_call']} us of device time per fwd+bwd", flush=True)
        for r in out[-1]["kernels"][:8]:
            print(f"  {r['us_per_call']:9.1f} us  {100 * r['share']:5.1f}%  {r['kernel']}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "kernel_breakdown.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "command": "benchmarks/gpu/kernel_breakdown.py", "rows": out}, f,
                  indent=1)


if __name__ == "__main__":
    main()

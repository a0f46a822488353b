"""Where a block-sparse walk's time goes besides its key tiles: the flash suite's layouts at 2 x 16k (16 heads,
D 128, bf16) beside dense full, timed three ways.

    PYTHONPATH=. python3 benchmarks/gpu/block_sparse_cost.py [--passes fwd,fwdbwd]   # $OUT/block_sparse_cost.json

Per case and pass: ``do_bench``'s median (as the suite times it: the L2 flushed before each call), the kernels'
device time per call (torch.profiler, back to back), and the host time of a call (no synchronisation in the timed
loop). Issue 4 asks block-sparse time <= 1.1 rho x dense: each case is printed over dense full (device and
do_bench) and over rho, so that ``all`` gives the list walk's rate per block and the random layouts, against it,
a walk's fixed cost; the other layouts test that cost's causes: ``balanced`` (every query block lists the same number of blocks: no load imbalance),
``banded`` (the same count, contiguous key blocks: K/V reuse in L2), ``all`` (every block listed: the list
walk's rate against the band walk's).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

import torch
import triton.testing

from subquad import attention, masks
from subquad.bench.harness import versions
from subquad.bench.profiling import kernel_times
from subquad.bench.suites.flash import _layout

N, BATCH, HEADS, DIM, BLOCK = 16384, 2, 16, 128, 128


def _balanced(n_blocks: int, per_row: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.randperm(n_blocks, generator=g)[:per_row] for _ in range(n_blocks)])
    return torch.zeros(n_blocks, n_blocks, dtype=torch.bool).scatter_(1, cols, True)


def _banded(n_blocks: int, per_row: int) -> torch.Tensor:
    start = (torch.arange(n_blocks) * (n_blocks - per_row) // max(n_blocks - 1, 1))[:, None]
    cols = torch.arange(n_blocks)[None, :]
    return (cols >= start) & (cols < start + per_row)


def cases() -> dict:
    nb = N // BLOCK
    out = {"full": None}
    for rho in (0.1, 0.25, 0.5):
        out[f"random{rho}"] = _layout(N, rho)
    per_row = round(float(out["random0.1"].float().mean()) * nb)
    out[f"balanced{per_row}"] = _balanced(nb, per_row)
    out[f"banded{per_row}"] = _banded(nb, per_row)
    out["all"] = torch.ones(nb, nb, dtype=torch.bool)
    return out


def measure(layout, passes) -> dict:
    q, k, v = (torch.randn(BATCH, N, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    mask = None if layout is None else masks.block_sparse(layout, BLOCK)

    def fwd():
        return attention(q, k, v, mask=mask, backend="triton", plan=False)

    def fwdbwd():
        return torch.autograd.grad(fwd(), (q, k, v), grad)

    row = {"density": 1.0 if layout is None else round(float(layout.float().mean()), 5)}
    for name in passes:
        step = fwd if name == "fwd" else fwdbwd
        with torch.no_grad() if name == "fwd" else torch.enable_grad():
            step()
            torch.cuda.synchronize()
            bench = statistics.median(triton.testing.do_bench(step, warmup=25, rep=200, return_mode="all"))
            device = sum(t.us for t in kernel_times(step, 20).values()) / 1e3
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                step()
            host = (time.perf_counter() - start) / 20 * 1e3
            torch.cuda.synchronize()
        row[name] = {"do_bench_ms": round(bench, 4), "device_ms": round(device, 4), "host_ms": round(host, 4)}
        print(f"  {name}: do_bench {bench:.4f} ms, device {device:.4f} ms, host {host:.4f} ms", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--cases", default=None)
    args = parser.parse_args(argv)
    passes = args.passes.split(",")
    rows = {}
    for name, layout in cases().items():
        if args.cases and name not in args.cases.split(","):
            continue
        print(name, flush=True)
        rows[name] = measure(layout, passes)
    for p in passes:
        if "full" not in rows:
            break
        dense = rows["full"][p]["device_ms"]
        for name, r in rows.items():
            print(f"{p} {name}: device {r[p]['device_ms'] / dense:.4f} of dense at density {r['density']:.4f} "
                  f"({r[p]['device_ms'] / dense / r['density']:.3f} x rho); do_bench "
                  f"{r[p]['do_bench_ms'] / rows['full'][p]['do_bench_ms']:.4f}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "block_sparse_cost.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "command": "benchmarks/gpu/block_sparse_cost.py", "shape":
                   {"batch": BATCH, "seqlen": N, "heads": HEADS, "head_dim": DIM, "block": BLOCK}, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()

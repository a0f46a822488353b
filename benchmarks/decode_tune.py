"""Sweep the split-KV decode kernel's launch options on the GPU (GB/s of cache read, do_bench median).

Run on the device: ``PYTHONPATH=. python3 benchmarks/decode_tune.py``; prints one line per configuration
and the best per shape. The defaults in ``subquad/ops/decode/splitkv.py`` come from these sweeps.
``DECODE_TUNE_CONTEXTS=`` (empty) skips the GQA rows; ``DECODE_TUNE_MLA=0`` the MLA rows, ``=new`` all but the
latest MLA sweep's.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys

import torch
import triton.testing

from subquad.bench.harness import versions
from subquad.bench.peers import sdpa
from subquad.bench.suites.decode import _gqa_inputs, _mla_inputs
from subquad.ops.decode import decode


def gbps(fn, nbytes):
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return nbytes / (ms * 1e-3) / 1e9, ms


def main():
    dev = torch.device("cuda")
    rows = []
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy, _ = gbps(lambda: dst.copy_(src), 4.0 * src.numel())
    print(f"copy {copy:.0f} GB/s")
    del src, dst
    # fourth sweep (the merge folded into the kernel): split counts, tile lengths and pipeline depths at 32k
    # and 128k, where the target is SDPA-flash (an evict-first hint on the K/V loads was tried there too:
    # within 0.2% either way, so it went)
    # DECODE_TUNE_SPLITS=None,6,9 sweeps those split counts instead (None: the default's choice)
    splits = [None if x == "None" else int(x) for x in os.environ.get("DECODE_TUNE_SPLITS", "None,12").split(",")]
    configs = [dict(num_splits=sp, block_n=bn, num_stages=st) for sp in splits for bn in (64, 128)
               for st in (2, 3)]
    contexts = [int(x) for x in os.environ.get("DECODE_TUNE_CONTEXTS", "32768,131072").split(",") if x]
    for n in contexts:
        inp = _gqa_inputs(8, n, 32, 8, 128, torch.bfloat16)(dev)
        nbytes = 2.0 * 8 * n * 8 * 128 * 2
        for name in ("flash", "cudnn"):
            g, ms = gbps(lambda: sdpa(name, enable_gqa=True)(inp), nbytes)
            rows.append({"case": f"sdpa-{name}", "seqlen": n, "gbps": round(g, 1), "ms": round(ms, 4)})
            print(rows[-1], flush=True)
        cases = [(layout, c) for layout in ("static", "paged")
                 for c in (configs if layout == "static" else configs[:4])]
        for layout, opts in cases:
            fn = (lambda: decode(inp["q"], inp["k"], inp["v"], **opts)) if layout == "static" else \
                (lambda: decode(inp["q"], inp["paged"], **opts))
            try:
                g, ms = gbps(fn, nbytes)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row
                print(layout, n, opts, "error", str(exc)[:100])
                continue
            rows.append({"case": f"gqa-{layout}", "seqlen": n, **opts, "gbps": round(g, 1), "ms": round(ms, 4)})
            print(rows[-1], flush=True)
        del inp
    if os.environ.get("DECODE_TUNE_MLA", "1") == "0":
        return finish(rows, copy)
    inp = _mla_inputs(64, 16384, 128, 512, 64, torch.bfloat16)(dev)
    nbytes = 2.0 * 64 * 16384 * 576
    mla = [dict(block_m=32, block_n=bn, block_dv=512, num_warps=w, num_stages=st) for bn in (32, 64) for w in (4, 8)
           for st in (2, 3)]
    mla += [dict(block_m=64, block_n=64, block_dv=512, num_warps=8, num_stages=2),
            dict(block_m=64, block_n=32, block_dv=512, num_warps=8, num_stages=2),
            dict(block_m=16, block_n=64, block_dv=512, num_warps=4, num_stages=3)]
    # the H200 (session 15): one stage, three, and V's 512 columns split over two programs (each recomputes
    # the scores: 1.5x the flops, half the accumulator registers)
    mla += [dict(block_m=64, block_n=64, block_dv=512, num_warps=8, num_stages=st) for st in (1, 3)]
    mla += [dict(block_m=64, block_n=bn, block_dv=256, num_warps=w, num_stages=2) for bn in (32, 64) for w in (4, 8)]
    # session 18: the scores' tile split between the warpgroups (subquad.ops.chained), against the chained dots
    # that both warpgroups computed whole
    mla += [dict(block_m=64, block_n=bn, block_dv=512, num_warps=8, num_stages=st, split_score_tile=split)
            for split in (False, True) for bn, st in ((64, 2), (32, 2), (32, 3))]
    if os.environ.get("DECODE_TUNE_MLA") == "new":
        mla = mla[-6:]
    for opts in mla:
        try:
            g, ms = gbps(lambda: decode(inp["q"], inp["view"], **opts), nbytes)
        except Exception as exc:  # noqa: BLE001
            print("mla", opts, "error", str(exc)[:100])
            continue
        rows.append({"case": "mla", "seqlen": 16384, **opts, "gbps": round(g, 1), "ms": round(ms, 4)})
        print(rows[-1], flush=True)
    finish(rows, copy)


def finish(rows, copy):
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "decode_tune.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "copy_gbps": copy, "rows": rows}, f, indent=1)
    for case in sorted({r["case"] + str(r["seqlen"]) for r in rows}):
        best = max((r for r in rows if r["case"] + str(r["seqlen"]) == case), key=lambda r: r["gbps"])
        print("BEST", best, f"{100 * best['gbps'] / copy:.1f}% of copy", file=sys.stderr)


if __name__ == "__main__":
    main()

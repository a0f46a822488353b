"""Host (CPU) time of one forward call of the chunked linear ops, and where it goes, on a shape the GPU finishes
quickly (calls then wait for the host, not the GPU).

    PYTHONPATH=. python3 benchmarks/gpu/host_time.py [B T] [op,op,...]
Prints per op the host microseconds per call (no synchronisation inside the timed loop) and the cProfile lines
of 50 calls with the most own time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from subquad.bench.suites.linear import DIM, HEADS, _make_inputs, _ours


def main():
    batch, seqlen = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (1, 8192)
    ops = sys.argv[3].split(",") if len(sys.argv) > 3 else ("linear", "retention")
    for op in ops:
        x = _make_inputs(op, batch, seqlen, HEADS, DIM, torch.bfloat16, False)(torch.device("cuda"))
        fn = _ours(op, "triton")
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn(x)
        host = (time.perf_counter() - start) / 200
        torch.cuda.synchronize()
        print(f"{op}: host {host * 1e6:.1f} us per call", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            fn(x)
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()

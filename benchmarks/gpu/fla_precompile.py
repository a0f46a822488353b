"""Compile fla's autotuned kernels in parallel, several processes per op, then forget the timings taken meanwhile.

fla 0.6.0 autotunes each kernel on its first call, and its backward takes ~300 s an op on a fresh H200 machine
(benchmarks/NOTES.md, sessions 10-11): nearly all of it compiling one configuration after another on one CPU
core, while the device machine has 16. Here each op's forward and backward run once in each of ``parts``
processes, all at once, each process tuning every kernel over its share of the configurations (every
``parts``-th: Triton's ``Autotuner.prune_configs`` is wrapped in the children), so every configuration is
compiled once, somewhere, and its binary lands in Triton's cache (TRITON_CACHE_DIR, see tuning-cache.sh). The
timings those processes took on the shared GPU are deleted afterwards (they are keyed by the share anyway), so
fla's first call in the benchmark times every configuration again, alone, from compiled binaries (a fraction of
a second each): the peer is tuned as it would tune itself.

    source benchmarks/gpu/tuning-cache.sh
    PYTHONPATH=.:$HOME/site python3 benchmarks/gpu/fla_precompile.py [op,op,...] [BxT,BxT,...] [parts]

Ops as the linear suite names them (default: all), each in fla's chunk form and, where fla has one, its
fused_chunk form, at each shape (default 1x8192,4x8192: fla's tuning keys are the widths, but Triton compiles
an integer argument equal to 1, a batch of one, apart) and ``parts`` processes per op (default: the CPUs shared
among the ops, at most 8). fla refuses some gated backward kernels on Hopper
(Triton 3.4-3.7.0); the forward is then compiled alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

FORMS = (False, True)   # chunk, fused_chunk


def run_op(op: str, shapes: str, part: int, parts: int) -> None:
    """Child: fla's forms of one op, forward then backward, once each at each shape, every autotuned kernel
    tuned over the configurations ``part``, ``part + parts``, ..."""
    import torch
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def share(self, kwargs):
        configs = prune(self, kwargs)
        return configs[part::parts] or configs[:1]

    Autotuner.prune_configs = share

    from subquad.bench.suites.linear import DIM, HEADS, _make_inputs

    for shape in shapes.split(","):
        batch, seqlen = (int(x) for x in shape.split("x"))
        inputs = _make_inputs(op, batch, seqlen, HEADS, DIM, torch.bfloat16, True)(torch.device("cuda"))
        _compile(op, inputs)


def _compile(op, inputs) -> None:
    import torch

    from subquad.bench.suites.linear import _fla

    for fused in FORMS:
        fn = _fla(op, fused=fused)
        if fn is None:
            continue
        out = fn(inputs)
        try:
            out.backward(torch.ones_like(out))
        except RuntimeError as exc:      # a refused backward: the forward is compiled already
            print(f"{op} {'fused_chunk' if fused else 'chunk'}: backward refused: {str(exc)[:100]}", flush=True)
        torch.cuda.synchronize()


def main() -> None:
    from subquad.bench.suites.linear import OPS

    ops = sys.argv[1].split(",") if len(sys.argv) > 1 else list(OPS)
    shapes = sys.argv[2] if len(sys.argv) > 2 else "1x8192,4x8192"
    parts = int(sys.argv[3]) if len(sys.argv) > 3 else max(1, min(8, (os.cpu_count() or 1) // len(ops)))
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    cache.mkdir(parents=True, exist_ok=True)
    start = time.time()
    children = {(op, part): subprocess.Popen([sys.executable, __file__, "--child", op, shapes, str(part), str(parts)])
                for op in ops for part in range(parts)}
    for (op, part), child in children.items():
        print(f"{op} part {part}/{parts}: exit {child.wait()} after {time.time() - start:.0f} s", flush=True)
    # the parallel processes' autotuning timings, written since the start: taken on a shared GPU
    stale = [p for p in cache.rglob("*.autotune.json") if p.stat().st_mtime >= start - 1]
    for path in stale:
        path.unlink()
    print(f"fla_precompile: {len(stale)} autotuning results dropped, binaries kept, {time.time() - start:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_op(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

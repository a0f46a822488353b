"""Per-kernel GPU time of the chunked linear-attention ops, subquad against flash-linear-attention, on one shape.

Run on the device (fla from the carried wheels on PYTHONPATH):
    PYTHONPATH=.:$HOME/.cache/subquad-site python3 benchmarks/gpu/linear_profile.py [B T] [op,op,...] [fwd|fwdbwd]
Prints, per (op, implementation: ours as the shape picks it, in two passes and fused on whole sequences, in two
passes on the segments the shape picks (split-2pass), cut into segments for about N programs for each N of
LINEAR_PROFILE_SPLIT=N,N; fla's chunk and fused_chunk),
the call's time (do_bench median), the kernels' total and each kernel's average microseconds per call
(torch.profiler, after warm-up and autotuning), and writes linear_profile_BxT_MODE_OPS.json to $OUT after every row.
LINEAR_PROFILE_WARM=BxT first runs each op at that shape (the order of the benchmark suite, whose first shape
used to fix the autotuned tiles of every later one). LINEAR_PROFILE_PEER_OPS=op,op limits fla to those ops (fla
autotunes each kernel for tens of seconds on its first call); LINEAR_PROFILE_IMPLS=name,name keeps only those rows.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import sys

import torch
import triton
import triton.testing

from subquad.bench import profiling
from subquad.bench.suites.linear import DIM, HEADS, OPS, _fla, _make_inputs, _ours
from subquad.ops.linear import chunk

CALLS = 5


def kernel_times(fn, grad, leaves=()):
    """Kernel microseconds per call (names cut to 70 characters). The leaves' gradients are dropped before each
    call: accumulated into, they added an elementwise pass over q, k and v (~390 us at 4 x 8k) to every fwd+bwd
    figure."""
    d_out = torch.ones_like(fn())

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        if grad:
            out.backward(d_out)

    per = collections.Counter()
    for name, t in profiling.kernel_times(step, CALLS).items():
        per[name[:70]] += t.us
    return per


def _form(impl, fused_min=None, split_target=None):
    """The op with chunk's FUSED_MIN_PROGRAMS* set (0 forces the fused forward, 1 << 30 the two passes) and
    sequences cut into segments for about ``split_target`` programs (0: never cut); None keeps the default."""
    from subquad.ops.linear import chunk_split

    settings = {}
    if fused_min is not None:
        settings.update({(chunk, "FUSED_MIN_PROGRAMS"): fused_min, (chunk, "FUSED_MIN_PROGRAMS_DELTA"): fused_min})
    if split_target is not None:
        settings.update({(chunk_split, "SPLIT_BELOW_PROGRAMS"): 1 << 30 if split_target else 0,
                         (chunk_split, "SPLIT_TARGET_PROGRAMS"): max(split_target, 1)})

    def run(x):
        chosen = {key: getattr(*key) for key in settings}
        for (mod, name), value in settings.items():
            setattr(mod, name, value)
        try:
            return impl(x)
        finally:
            for (mod, name), value in chosen.items():
                setattr(mod, name, value)

    return run


def main():
    batch, seqlen = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4, 8192)
    ops = sys.argv[3].split(",") if len(sys.argv) > 3 else OPS
    mode = sys.argv[4] if len(sys.argv) > 4 else "fwd"
    grad = mode == "fwdbwd"
    result = {}
    warm = os.environ.get("LINEAR_PROFILE_WARM")
    for op in ops:
        inputs = _make_inputs(op, batch, seqlen, HEADS, DIM, torch.bfloat16, grad)(torch.device("cuda"))
        peer_ops = os.environ.get("LINEAR_PROFILE_PEER_OPS")
        ours = _ours(op, "triton")
        impls = [("subquad", ours), ("subquad-2pass", _form(ours, 1 << 30, 0)), ("subquad-fused", _form(ours, 0, 0)),
                 ("subquad-split-2pass", _form(ours, 1 << 30))]
        impls += [(f"subquad-split{n}", _form(ours, split_target=int(n)))
                  for n in os.environ.get("LINEAR_PROFILE_SPLIT", "").split(",") if n]
        if peer_ops is None or op in peer_ops.split(","):
            impls.append(("fla", _fla(op)))
            if _fla(op, fused=True) is not None:
                impls.append(("fla-fused", _fla(op, fused=True)))
        keep = os.environ.get("LINEAR_PROFILE_IMPLS")
        for name, impl in impls:
            if keep and name not in keep.split(","):
                continue
            try:
                if warm:
                    wb, wt = (int(x) for x in warm.split("x"))
                    kernel_times(lambda: impl(_make_inputs(op, wb, wt, HEADS, DIM, torch.bfloat16, grad)(
                        torch.device("cuda"))), grad)
                leaves = list(inputs.values()) if grad else []
                per = kernel_times(lambda: impl(inputs), grad, leaves)
                d_out = torch.ones_like(inputs["v"])
                call_us = 1e3 * triton.testing.do_bench(lambda: impl(inputs) if not grad else
                                                        impl(inputs).backward(d_out),
                                                        grad_to_none=leaves or None, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a peer that refuses the call is a line, not a crash
                print(f"{op} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            for t in inputs.values():
                t.grad = None
            total = sum(per.values())
            result[f"{op} {name}"] = {"call_us": call_us, "kernels_us": total, "kernels": dict(per.most_common())}
            print(f"{op:12s} {name:8s} call {call_us:8.1f} us, kernels {total:8.1f} us  " +
                  "  ".join(f"{k[:38]}={v:.0f}" for k, v in per.most_common(6)), flush=True)
            # after every row: a call that runs out of time keeps what it measured
            write(batch, seqlen, mode, ops, result)
    for name, chosen in autotuned().items():
        print(f"{name}: {chosen}")


def autotuned():
    """Each autotuned chunk kernel's chosen configurations, by key."""
    from subquad.ops.delta import wy
    from subquad.ops.linear import chunk_bwd, chunk_fwd, chunk_intra
    chosen = {}
    for mod in (chunk_fwd, chunk_bwd, chunk_intra, wy):
        for name, kernel in vars(mod).items():
            if isinstance(kernel, triton.runtime.Autotuner) and kernel.cache:
                chosen[f"{mod.__name__.split('.')[-1]}.{name}"] = {str(k): str(v) for k, v in kernel.cache.items()}
    return chosen


def write(batch, seqlen, mode, ops, result):
    name = f"linear_profile_{batch}x{seqlen}_{mode}_{'-'.join(ops)}.json"
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump({"batch": batch, "seqlen": seqlen, "mode": mode, "device": torch.cuda.get_device_name(),
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "triton": triton.__version__, "result": result, "autotuned": autotuned()}, f, indent=1)


if __name__ == "__main__":
    main()

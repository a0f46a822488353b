"""Where a planned pattern's time goes: each component of its plan timed on its own, then the merges, then the
whole ``subquad.attention`` call (fwd, bf16, 16 heads, D 128). On CUDA each line also gives the kernels' own
time per call (torch.profiler) beside do_bench's: where the two differ, the call is host-bound; the host time of
the whole call is then broken down by Python function (cProfile, the costliest by own time).

Device run: ``PYTHONPATH=. python3 benchmarks/gpu/plan_profile.py [N] [BATCH] [fwdbwd]`` (default 16384 x 1, fwd);
prints one line per component (its launch shape, kept pairs, ms and effective TFLOP/s) and writes
``$OUT/plan_profile.json``. ``fwdbwd`` profiles the whole call's forward and backward instead (its six costliest
kernels); ``PLAN_PROFILE_PATTERNS=name,name`` keeps those patterns.
On a machine without CUDA it runs the same steps on the reference engine at N = 1024 (a check of the script).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from subquad import attention, masks
from subquad.bench.profiling import kernel_times
from subquad.ops.softmax.lse_merge import merge_lse, merge_lse_fused
from subquad.ops.softmax.planned import _engine, _run, plan_for

GLOBAL = list(range(16))
PATTERNS = {
    "longformer512+16 causal": (masks.longformer(512, GLOBAL, causal=True), False),
    "longformer512+16": (masks.longformer(512, GLOBAL), False),
    "bigbird512+16+3x64 causal": (masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0, causal=True), False),
    "strided256": (masks.strided(256), True),
    "fixed128x8": (masks.fixed(128, 8), True),
    "bigbird512+16+3x64": (masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0), False),
}


def timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def kernels(fn, calls=20, top=3):
    """(kernel time per call in ms, the ``top`` costliest kernels: name, ms and launches per call) of ``fn`` on
    CUDA, from torch.profiler."""
    times = kernel_times(fn, calls)
    total = sum(t.us for t in times.values()) / 1e3
    return total, [(name[:60], round(t.us / 1e3, 4), round(t.launches)) for name, t in list(times.items())[:top]]


def host_functions(fn, calls=50, top=12):
    """Host microseconds per call of the costliest functions by own time (cProfile over ``calls`` calls)."""
    import cProfile
    import pstats

    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt / calls * 1e6, f"{path.split('/')[-1]}:{line}:{func}") for (path, line, func), (_, _, tt, _, _)
                   in stats.items()), reverse=True)[:top]
    return [(where, round(us, 1)) for us, where in rows]


def profile(name, pattern, causal, n, batch, device, backend):
    q, k, v = (torch.randn(batch, n, 16, 128, device=device, dtype=torch.bfloat16 if device.type == "cuda"
                           else torch.float32) for _ in range(3))
    scale = 128 ** -0.5
    plan = plan_for(pattern, causal, n, n, device, False)
    engine = _engine(backend, False)
    ms_of = timer(device)
    rows = []
    outputs = []
    components = [] if plan is None else zip(plan.components, plan.kept_pairs())   # None: the BlockMask path
    for c, pairs in components:
        call = lambda c=c: _run(c, plan, q, k, v, scale, None, None, engine, False)  # noqa: E731
        ms = ms_of(call)
        outputs.append((c, *_run(c, plan, q, k, v, scale, None, None, engine, False)))
        nq, nk = c.kernel_shape()
        rows.append({"pattern": name, "part": c.role, "queries": nq, "keys": nk, "split": c.split, "ms": ms,
                     "call": call, "tflops": 4 * 128 * pairs * 16 * batch / (ms * 1e-3) / 1e12})
    base = [(o, lse) for c, o, lse in outputs if not c.overrides_rows]
    if len(base) == 2:
        (o1, l1), (o2, l2) = base
        merge = (lambda: merge_lse_fused(o1, l1, o2, l2, q.dtype)) if backend == "triton" else \
            (lambda: merge_lse([o1, o2], [l1, l2], q.dtype))
        rows.append({"pattern": name, "part": "merge", "ms": ms_of(merge), "call": merge})
    whole = lambda: attention(q, k, v, causal=causal, mask=pattern, backend=backend)  # noqa: E731
    rows.append({"pattern": name, "part": "attention()", "ms": ms_of(whole), "call": whole})
    for r in rows:
        call = r.pop("call")
        r.update(batch=batch, seqlen=n, device=str(device))
        tflops = f"{r['tflops']:7.1f} TF" if "tflops" in r else ""
        if device.type == "cuda":
            r["kernel_ms"], r["kernels"] = kernels(call)
        own = f"kernels {r['kernel_ms']:7.3f} ms {r['kernels']}" if "kernel_ms" in r else ""
        print(f"{name:28s} {r['part']:12s} {r.get('queries', ''):>7} x {r.get('keys', ''):<7} {r['ms']:9.3f} ms "
              f"{tflops} {own}", flush=True)
    if device.type == "cuda":
        rows[-1]["host_us"] = host_functions(whole)
        print(f"{name:28s} host us per call by own time: {rows[-1]['host_us']}", flush=True)
    print(f"{name}: no plan, one BlockMask launch" if plan is None else plan.describe(), flush=True)
    return rows


def profile_fwdbwd(name, pattern, causal, n, batch, device, backend):
    """The whole call's forward and backward (gradients returned, never accumulated), by kernel."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, n, 16, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    d_out = torch.randn_like(q)

    def whole():
        return torch.autograd.grad(attention(q, k, v, causal=causal, mask=pattern, backend=backend), (q, k, v),
                                   d_out)

    row = {"pattern": name, "part": "attention() fwd+bwd", "ms": timer(device)(whole), "batch": batch, "seqlen": n,
           "device": str(device)}
    if device.type == "cuda":
        row["kernel_ms"], row["kernels"] = kernels(whole, top=6)
    print(f"{name:28s} fwd+bwd {row['ms']:9.3f} ms {row.get('kernel_ms', '')} {row.get('kernels', '')}", flush=True)
    return [row]


def main():
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else (16384 if cuda else 1024)
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    run = profile_fwdbwd if len(sys.argv) > 3 and sys.argv[3] == "fwdbwd" else profile
    wanted = os.environ.get("PLAN_PROFILE_PATTERNS")
    rows = []
    for name, (pattern, causal) in PATTERNS.items():
        if not wanted or name in wanted.split(","):
            rows += run(name, pattern, causal, n, batch, device, "triton" if cuda else "reference")
    import triton

    header = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "torch": torch.__version__,
              "triton": triton.__version__, "command": " ".join(["plan_profile.py", *sys.argv[1:]]),
              "patterns": wanted or "all"}
    with open(os.path.join(os.environ.get("OUT", "."), "plan_profile.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

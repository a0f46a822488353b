"""Dense 2 x 16k fwd+bwd (full and causal): FlexAttention's kernels against ours in one process, timed alternately
and per kernel (torch profiler), to tell which kernel a gap is in. Flex's generated Triton source stays in
inductor's cache for reading (and compiling for sm90 offline, as ``kernel_report.py`` does ours):

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONPATH=. python3 benchmarks/gpu/flex_vs_ours.py   # $OUT/flex_vs_ours.json
    grep -rl flex_attention_backward /tmp/ind --include=*.py

Run on the H100 on 2026-12-06 (``benchmarks/results/2026-12-06-flex-vs-ours-kernels-h100.json``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os

import torch
import triton
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from subquad import attention
from subquad.bench.harness import versions
from subquad.bench.profiling import kernel_times

torch._dynamo.config.cache_size_limit = 64


def kernels(fn, calls: int = 5) -> dict:
    """Milliseconds per call of each CUDA kernel of ``fn``, the six longest."""
    return {name[:80]: round(t.us / 1000, 3) for name, t in list(kernel_times(fn, calls).items())[:6]}


def main():
    rows = []
    for causal in (False, True):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 16, 16384, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(2, 16, 16384, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 16384, 16384) if causal else None
        flex = torch.compile(flex_attention, dynamic=False)
        qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        gs = grad.transpose(1, 2).contiguous()
        impls = {
            "flex": lambda: torch.autograd.grad(flex(q, k, v, block_mask=block_mask), (q, k, v), grad),
            "subquad-triton": lambda: torch.autograd.grad(attention(qs, ks, vs, causal=causal, backend="triton"),
                                                          (qs, ks, vs), gs),
        }
        times = {name: [] for name in impls}
        for _ in range(2):      # alternated: the clocks drift over a run
            for name, fn in impls.items():
                fn()
                torch.cuda.synchronize()
                times[name].append(round(triton.testing.do_bench(fn, warmup=20, rep=200), 3))
        for name, fn in impls.items():
            rows.append(dict(case="causal" if causal else "full", impl=name, fwdbwd_ms=times[name],
                             kernels=kernels(fn)))
            print(rows[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "flex_vs_ours.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""FlexAttention on the backends suite's patterns (16k, 16 heads, D 128, bf16): subquad's ``backend="flex"``
against the peer's compiled flex on its own ``create_block_mask`` and mask_mod, same inputs, one process, the
patterns in the suite's order (so that each compiled function meets every pattern, as in the suite: with
automatic dynamic shapes the second pattern made subquad's flag tensors symbolic).

Device run: ``PYTHONPATH=. python3 benchmarks/gpu/flex_probe.py``; ms, do_bench medians; ``$OUT/flex_probe.json``.
"""

from __future__ import annotations

import json
import os

import torch
import triton.testing

from subquad import attention
from subquad.bench import peers
from subquad.bench.suites import backends

N = 16384
CASES = ("longformer512+16", "bigbird512+16+3x64")


def timed(call, leaves):
    with torch.no_grad():
        call()
        fwd = triton.testing.do_bench(call, warmup=25, rep=100)

    def fwd_bwd():
        call().sum().backward()

    fwd_bwd()
    both = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, grad_to_none=leaves)
    return fwd, both


def main():
    rows = []
    spec = backends.cases_spec(N)
    q, k, v = (torch.randn(1, N, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    for name in CASES:
        pattern, causal, mask_mod, *_ = spec[name]
        peer = peers.flex(mask_mod)
        for impl, call in (("flex", lambda: peer(inputs)),
                           ("subquad-flex", lambda: attention(q, k, v, causal=causal, mask=pattern, backend="flex"))):
            fwd, both = timed(call, [q, k, v])
            rows.append({"case": name, "impl": impl, "fwd_ms": fwd, "fwdbwd_ms": both})
            print(f"{name:20s} {impl:14s} fwd {fwd:.3f} fwdbwd {both:.3f}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "flex_probe.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

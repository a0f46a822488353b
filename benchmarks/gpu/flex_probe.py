"""FlexAttention on BigBird (16k, 16 heads, D 128, bf16): subquad's ``backend="flex"`` against the peer's
compiled flex on its own ``create_block_mask`` and mask_mod, same inputs, one process.

Device run: ``PYTHONPATH=. python3 benchmarks/gpu/flex_probe.py``; ms, do_bench medians.
"""

from __future__ import annotations

import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from subquad import attention
from subquad.bench.suites import backends

N = 16384


def timed(name, call, leaves):
    call()
    torch.cuda.synchronize()
    fwd = triton.testing.do_bench(call, warmup=25, rep=100)

    def fwd_bwd():
        call().sum().backward()

    fwd_bwd()
    both = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, grad_to_none=leaves)
    print(f"{name:14s} fwd {fwd:.3f} fwdbwd {both:.3f}", flush=True)


def main():
    torch._dynamo.config.cache_size_limit = 1024
    compiled = torch.compile(flex_attention, dynamic=False)
    pattern, causal, mask_mod, *_ = backends.cases_spec(N)["bigbird512+16+3x64"]
    q, k, v = (torch.randn(1, N, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    peer = create_block_mask(mask_mod(N, "cuda"), None, None, N, N, device="cuda")
    timed("flex", lambda: compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=peer),
          [q, k, v])
    timed("subquad-flex", lambda: attention(q, k, v, causal=causal, mask=pattern, backend="flex"), [q, k, v])


if __name__ == "__main__":
    main()

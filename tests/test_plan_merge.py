"""The fused LSE merge (Triton; CPU under TRITON_INTERPRET=1) against the PyTorch merge, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from subquad.ops.grid import interpreting
from subquad.ops.softmax.lse_merge import merge_lse, merge_lse_fused

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("dv", [16, 24])
def test_fused_merge_matches_torch(dv):
    gen = torch.Generator().manual_seed(0)
    b, n, h = 2, 37, 3
    o1 = torch.randn(b, n, h, dv, generator=gen)
    o2 = torch.randn(b, h, n, dv, generator=gen).transpose(1, 2)  # strided like a kernel's (B, H, N, D) output
    l1 = torch.randn(b, h, n, generator=gen) * 3
    l2 = torch.randn(b, h, n, generator=gen) * 3
    l1[:, :, :5] = float("-inf")
    l2[:, :, 3:8] = float("-inf")  # rows 3, 4: no key in either part
    g_out, g_lse = torch.randn(b, n, h, dv, generator=gen), torch.randn(b, h, n, generator=gen)
    results = []
    for fn in (merge_lse_fused, lambda *a: merge_lse([a[0], a[2]], [a[1], a[3]], a[4])):
        leaves = [t.to(DEV).clone().requires_grad_(True) for t in (o1, l1, o2, l2)]
        out, lse = fn(*leaves, torch.float32)
        finite = torch.isfinite(lse)
        (out * g_out.to(DEV)).sum().add((lse.masked_fill(~finite, 0) * g_lse.to(DEV)).sum()).backward()
        results.append([out, lse] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(results[0][1][:, :, 3:5]).all()
    assert all(torch.isfinite(t).all() for t in results[0][2:])

"""Planned attention on the Triton flash kernels (CPU under TRITON_INTERPRET=1) against the same plan on the
reference: outputs, LSE and gradients, fp16."""

from __future__ import annotations

import os

import pytest
import torch

from subquad import masks
from subquad.masks.plan import plan
from subquad.ops.softmax.planned import planned_attention

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")

CASES = [
    ("strided", masks.strided(16), 96, 96),
    ("fixed", masks.fixed(32, 4), 96, 96),
    ("dilated", masks.dilated(40, 2), 128, 128),
    ("longformer-spread", masks.longformer(16, [0, 1, 50, 90]), 80, 96),
]


@pytest.mark.parametrize("name,pattern,nq,nk", CASES, ids=[c[0] for c in CASES])
def test_triton_plan_matches_reference_plan(name, pattern, nq, nk):
    pl = plan(pattern, nq, nk, block_q=32, block_kv=32, device=DEV)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, nq, 4, 16), (1, nk, 2, 16), (1, nk, 2, 16)]
    base = [torch.randn(s, generator=gen).to(DEV, torch.float16) for s in shapes]
    g_out = torch.randn(1, nq, 4, 16, generator=gen).to(DEV)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in base]
        out, lse = planned_attention(*leaves, pl, 0.25, backend=backend)
        (out.float() * g_out).sum().add(lse.sum()).backward()
        results.append([out.float(), lse] + [t.grad.float() for t in leaves])
    for what, got, want in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{what}: {m}")

"""Planned attention on the Triton flash kernels (CPU under TRITON_INTERPRET=1) against the same plan on the
reference: outputs, LSE and gradients, fp16."""

from __future__ import annotations

import os

import pytest
import torch

from subquad import masks
from subquad.masks.patterns import INF, Band
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


ONE_LAUNCH = [
    ("strided", masks.strided(16), 96, 96, None),
    ("strided-odd-length", masks.strided(24), 90, 90, 5.0),
    ("fixed", masks.fixed(32, 4), 96, 96, None),
    ("strided-first-rows-empty", masks.strided(16) & Band(5, INF), 100, 100, None),
]


@pytest.mark.parametrize("name,pattern,nq,nk,softcap", ONE_LAUNCH, ids=[c[0] for c in ONE_LAUNCH])
def test_forward_runs_band_and_columns_in_one_launch(name, pattern, nq, nk, softcap, monkeypatch):
    """Without gradients a band and its gathered columns are one flash launch (TWO_SOURCES), no merge; the
    result equals the reference plan, and queries that see no key give zeros and LSE -inf."""
    from subquad.ops.softmax.flash import launch

    pl = plan(pattern, nq, nk, block_q=32, block_kv=32, device=DEV)
    launches = []
    forward = launch.forward
    monkeypatch.setattr(launch, "forward", lambda *a, **kw: launches.append(kw.get("second")) or forward(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, h, 16, generator=gen).to(DEV, torch.float16)
               for n, h in ((nq, 4), (nk, 2), (nk, 2)))
    with torch.no_grad():
        out, lse = planned_attention(q, k, v, pl, 0.25, softcap=softcap, backend="triton")
        want, want_lse = planned_attention(q.float(), k.float(), v.float(), pl, 0.25, softcap=softcap,
                                           backend="reference")
    assert len(launches) == 1 and launches[0] is not None
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
    assert not torch.isnan(out).any()
    if name.endswith("empty"):
        assert torch.equal(out[:, :5].float(), torch.zeros_like(out[:, :5].float()))
        assert torch.isneginf(lse[:, :, :5]).all()

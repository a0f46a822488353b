"""Planned attention on the Triton flash kernels (CPU under TRITON_INTERPRET=1) against the same plan on the
reference: outputs, LSE and gradients, fp16."""

from __future__ import annotations

import pytest
import torch

from subquad import masks
from subquad.masks.patterns import INF, Band
from subquad.masks.plan import plan
from subquad.ops.grid import interpreting
from subquad.ops.softmax.planned import planned_attention

TRITON = interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")

CASES = [
    ("strided", masks.strided(16), 96, 96),
    ("fixed", masks.fixed(32, 4), 96, 96),
    ("dilated", masks.dilated(40, 2), 128, 128),
    ("longformer-spread", masks.longformer(16, [0, 1, 50, 90]), 80, 96),
    # random blocks finer than the tiles: local and blocks components (the band of each is the engine's own)
    ("bigbird-blocks", masks.bigbird(16, [0, 3], random_blocks=2, block=16, seed=1), 96, 96),
    ("bigbird-blocks-causal", masks.bigbird(24, [0], random_blocks=3, block=8, causal=True), 90, 90),
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
    ("fixed-odd-length", masks.fixed(32, 4), 90, 90, 5.0),
    ("strided-first-rows-empty", masks.strided(16) & Band(5, INF), 100, 100, None),
    # columns spanning several blocks, most of them full (unmasked in the forward); the second with a ragged
    # last column block
    ("fixed-full-column-blocks", masks.fixed(16, 8), 256, 256, None),
    ("strided-full-column-blocks", masks.strided(4), 250, 250, 5.0),
    ("fixed-full-column-blocks-ragged", masks.fixed(16, 6), 250, 250, None),
    # the last period's columns cut by the sequence's end: gathered by index, not as a strided view
    ("fixed-cut-period", masks.fixed(16, 6), 253, 253, None),
]


# (case, the columns' key tiles too few to fill the GPU unsplit or not, the local part's dQ by dQ programs or by
# atomics, as where its walks are cut into pieces, query heads per KV head)
ONE_LAUNCH_RUNS = ([(*case, walks, "programs", 2) for case in ONE_LAUNCH for walks in ("split", "whole")]
                   + [(*case, walks, "atomic", 2) for case in ONE_LAUNCH[:1] + ONE_LAUNCH[2:4] + ONE_LAUNCH[7:8]
                      for walks in ("split", "whole")]
                   + [(*case, "whole", "programs", 1) for case in ONE_LAUNCH[:4] + ONE_LAUNCH[7:]])


@pytest.mark.parametrize("name,pattern,nq,nk,softcap,column_walks,first_dq,group", ONE_LAUNCH_RUNS,
                         ids=["-".join((c[0], *c[5:7], f"g{c[7]}")) for c in ONE_LAUNCH_RUNS])
def test_band_and_columns_run_in_one_launch(name, pattern, nq, nk, softcap, column_walks, first_dq, group,
                                            monkeypatch):
    """A band and its gathered columns are one flash forward launch (TWO_SOURCES), no merge, and one backward
    on the merged LSE: the local part's dQ programs (the strided pattern's band; the fixed pattern's local
    blocks, which a query block's one key block would otherwise have had store dQ, ``DQ_STORE``) walk the
    columns too, and the columns' launch computes dK/dV alone, its walks split over programs or not. Without
    grouped heads the fixed pattern's dQ programs store its local blocks' dK/dV too (``DQ_DKDV``: no dK/dV
    programs in that launch). Where the local part adds dQ by atomics into fp32 sums, the columns' launch adds
    its own by atomics where its walks are split, else by dQ programs that start from those sums. Outputs, LSE
    and gradients equal the reference plan's, and queries that see no key give zeros and LSE -inf."""
    from subquad.ops.softmax.flash import launch

    # key tiles enough to fill the GPU unsplit (the fixed pattern's at 16k and 64k), or too few (strided's)
    monkeypatch.setattr(launch, "_query_splits", lambda *a: 2 if column_walks == "split" else 1)
    if first_dq == "atomic":
        # (only the columns' MaskArgs carry key positions)
        monkeypatch.setattr(launch, "_dq_by_programs", lambda m, q, k: m.kv_pos is not None)

    pl = plan(pattern, nq, nk, block_q=32, block_kv=32, device=DEV)
    columns = next(c for c in pl.components if c.role == "columns")
    # whole periods of columns are gathered and their gradients added back through strided views
    assert (columns.kv_stride is None) == name.endswith("cut-period")
    if "full" in name:
        from subquad.masks.patterns import BuildContext

        bm = columns.block_mask(BuildContext(1, 4, nq, nk, DEV), 32, 32, DEV)
        assert bm.full_kv[0].sum() > 0 and bm.partial_kv[0].sum() > 0
    launches, backwards = [], []
    forward, backward = launch.forward, launch.backward_two_sources
    monkeypatch.setattr(launch, "forward", lambda *a, **kw: launches.append((a[3].use_list, kw.get("second")))
                        or forward(*a, **kw))
    monkeypatch.setattr(launch, "backward_two_sources", lambda *a: backwards.append(1) or backward(*a))
    # per backward launch: (atomic dQ, dQ stored by dK/dV programs, no dQ at all, a second key set walked, dK/dV
    # stored by the dQ programs)
    calls, backward_launch = [], launch._backward_launch
    monkeypatch.setattr(launch, "_backward_launch", lambda *a, **kw: calls.append(
        (a[11], kw.get("dq_store", False), a[6] is None, kw.get("second") is not None, kw.get("dq_dkdv", False)))
        or backward_launch(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(1, n, h, 16, generator=gen).to(DEV, torch.float16)
            for n, h in ((nq, 4), (nk, 4 // group), (nk, 4 // group))]
    g_out = torch.randn(1, nq, 4, 16, generator=gen).to(DEV)
    results = []
    for backend, dtype in (("triton", torch.float16), ("reference", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in base]
        out, lse = planned_attention(*leaves, pl, 0.25, softcap=softcap, backend=backend)
        (out.float() * g_out).sum().add(torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
        results.append([out.float(), lse] + [t.grad.float() for t in leaves])
    assert len(launches) == 1 and launches[0][1] is not None and len(backwards) == 1
    if first_dq == "programs":
        dkdv = group == 1 and name.startswith("fixed")
        assert calls == [(False, False, False, True, dkdv), (False, False, True, False, False)]
    else:
        assert calls == [(True, False, False, False, False), (column_walks == "split", False, False, False, False)]
    # the strided pattern's local part is a plain band: the kernel's list-free band path (the fixed pattern's
    # blocks are enforced by the tiles: its BlockMask)
    assert launches[0][0] == name.startswith("fixed")
    for what, got, want in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{what}: {m}")
    out, lse = results[0][:2]
    assert not torch.isnan(torch.cat([r.flatten() for r in results[0]])).any()
    if name.endswith("empty"):
        assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5])) and torch.isneginf(lse[:, :, :5]).all()


@pytest.mark.parametrize("name,pattern,nq,nk", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_deterministic_plan_has_no_atomic_backward(name, pattern, nq, nk, monkeypatch):
    """``deterministic=True`` on a planned pattern: the band and its gathered columns run apart (the two-source
    launch's backward adds dQ by atomics), every backward launch takes the dQ programs, and outputs and
    gradients equal the reference's."""
    import subquad
    from subquad.ops.softmax.flash import launch

    atomic = []
    real = launch._backward_launch
    monkeypatch.setattr(launch, "_backward_launch", lambda *a, **kw: atomic.append(a[11]) or real(*a, **kw))
    monkeypatch.setattr(launch, "backward_two_sources", lambda *a: pytest.fail("the two-source backward ran"))
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(1, n, h, 16, generator=gen).to(DEV, torch.float16) for n, h in ((nq, 4), (nk, 2), (nk, 2))]
    g_out = torch.randn(1, nq, 4, 16, generator=gen).to(DEV)
    results = []
    for backend, dtype in (("triton", torch.float16), ("reference", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in base]
        out = subquad.attention(*leaves, mask=pattern, backend=backend, deterministic=True, plan=True)
        (out.float() * g_out).sum().backward()
        results.append([out.float()] + [t.grad.float() for t in leaves])
    assert atomic and not any(atomic)
    for what, got, want in zip(["out", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name,pattern,nq,nk", CASES[4:], ids=[c[0] for c in CASES[4:]])
def test_natural_plan_backward_is_one_launch(name, pattern, nq, nk, deterministic, monkeypatch):
    """BigBird's plan (its band and its random blocks, both on the sequence as it is) runs its forward as two
    launches, the second going on from the first one's output and LSE in place (no merge), and its backward as
    one launch of the whole pattern on that output and LSE; outputs, LSE and gradients (through the LSE too)
    equal the reference plan's, in fp16 with ALiBi and a softcap. Without grad, the same two forward launches."""
    from subquad.ops.softmax.flash import launch

    pl = plan(pattern, nq, nk, block_q=32, block_kv=32, device=DEV, exact_positions=True)
    assert pl.natural and len(pl.components) == 2
    assert "one pass over the output and LSE" in pl.describe() and "goes on from" in pl.describe()
    forwards, backwards = [], []
    forward, backward = launch.forward, launch.backward
    monkeypatch.setattr(launch, "forward",
                        lambda *a, **kw: forwards.append(kw.get("into") is not None) or forward(*a, **kw))
    monkeypatch.setattr(launch, "backward", lambda *a, **kw: backwards.append(a[-1]) or backward(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(1, n, h, 16, generator=gen).to(DEV, torch.float16) for n, h in ((nq, 4), (nk, 2), (nk, 2))]
    g_out = torch.randn(1, nq, 4, 16, generator=gen).to(DEV)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEV)
    results = []
    for backend, dtype in (("triton", torch.float16), ("reference", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in base]
        out, lse = planned_attention(*leaves, pl, 0.25, softcap=4.0, alibi_slopes=slopes, backend=backend,
                                     deterministic=deterministic)
        (out.float() * g_out).sum().add(lse.sum() * 0.5).backward()
        results.append([out.float(), lse] + [t.grad.float() for t in leaves])
    assert forwards == [False, True] and backwards == [deterministic]
    for what, got, want in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{what}: {m}")
    with torch.no_grad():
        out, lse = planned_attention(*base, pl, 0.25, softcap=4.0, alibi_slopes=slopes, backend="triton")
    assert forwards == [False, True] * 2
    torch.testing.assert_close(out.float(), results[1][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, results[1][1], atol=2e-2, rtol=2e-2)

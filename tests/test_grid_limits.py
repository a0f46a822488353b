"""The softmax kernels past CUDA's 65,535 programs on grid axes 1 and 2 (batch x heads: 4,096 sequences of 16
heads at short lengths): with the limit lowered to 3 (``conftest.small_grid_limit``) the flash forward and
backward, the LSE merge and the decode kernel launch in pieces with a program offset, and give what the one
launch gave (under the interpreter on CPU, natively on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

import subquad
from subquad import masks
from subquad.ops.grid import interpreting

# many small shapes: take each kernel's first Hopper configuration instead of autotuning every new key
os.environ.setdefault("SUBQUAD_FLASH_AUTOTUNE", "0")
TRITON = interpreting() or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shapes, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEV, dtype) for s in shapes]


def _attention_and_grads(q, k, v, backend, **kw):
    """``[out, dq, dk, dv]`` of ``subquad.attention`` (``return_lse``: ``lse`` after ``out``)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    result = subquad.attention(*leaves, backend=backend, **kw)
    outs = list(result) if isinstance(result, tuple) else [result]
    g = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(9)).to(DEV)
    return [o.detach() for o in outs] + list(torch.autograd.grad((outs[0].float() * g).sum(), leaves))


def _same(split, whole, exact: bool):
    """The split launches' results against the one launch's: equal, or (``exact`` False: dQ summed by atomics,
    whose order the split changes) equal but for the rounding of the sums."""
    for a, b in zip(split, whole):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


FLASH = [
    # the band path: one program per (query tile, batch x head), its dQ by dQ programs
    ("causal", dict(causal=True), True),
    # a BlockMask (global tokens): the heaviest-first schedule over the grid's rows, dQ by atomics (as where its
    # walks are cut into pieces) or by dQ programs (the default otherwise)
    ("longformer-atomic", dict(mask=masks.longformer(12, [0, 5]), plan=False), False),
    ("longformer", dict(mask=masks.longformer(12, [0, 5]), plan=False), True),
    # the deterministic backward: the dQ programs' heaviest-first schedule over query heads
    ("longformer-deterministic", dict(mask=masks.longformer(12, [0, 5]), plan=False, deterministic=True), True),
]


@pytest.mark.parametrize("name,kw,exact", FLASH, ids=[c[0] for c in FLASH])
def test_flash_launches_split_past_the_grid_limit(name, kw, exact, monkeypatch):
    """B 2 x 4 query heads (8 rows: launches of 3, 3, 2) over 2 KV heads (4 rows in the backward: 3, 1): the
    forward, the preprocess and the backward are split; outputs, LSE and gradients equal the one launch's and
    the reference's."""
    from conftest import small_grid_limit, split_kernels
    from subquad.ops.softmax.flash import launch

    if name.endswith("-atomic"):
        monkeypatch.setattr(launch, "_walks_whole", lambda m, q, k: False)
    q, k, v = _inputs([(2, 70, 4, 32), (2, 70, 2, 32), (2, 70, 2, 32)], seed=1)
    whole = _attention_and_grads(q, k, v, "triton", return_lse=True, **kw)
    launches = small_grid_limit(monkeypatch)
    split = _attention_and_grads(q, k, v, "triton", return_lse=True, **kw)
    assert split_kernels(launches) == {"flash_fwd_kernel", "flash_bwd_preprocess_kernel", "flash_bwd_kernel"}
    _same(split, whole, exact)
    ref = _attention_and_grads(q, k, v, "reference", **{n: kw[n] for n in ("causal", "mask") if n in kw})
    for what, got, want in zip(["out", "dq", "dk", "dv"], split[:1] + split[2:], ref):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{what}: {m}")


def test_planned_merge_launches_split_past_the_grid_limit(monkeypatch):
    """A planned pattern (strided: a band and gathered columns, run apart by the deterministic backward, then
    merged by LSE) at B 2 x 4 heads: the merge's forward and backward are split too, and give the one launch's
    outputs and gradients."""
    from conftest import small_grid_limit, split_kernels

    q, k, v = _inputs([(2, 64, 4, 16), (2, 64, 2, 16), (2, 64, 2, 16)], seed=2)
    kw = dict(mask=masks.strided(16), plan=True, deterministic=True)
    whole = _attention_and_grads(q, k, v, "triton", **kw)
    launches = small_grid_limit(monkeypatch)
    split = _attention_and_grads(q, k, v, "triton", **kw)
    assert {"_merge_fwd_kernel", "_merge_bwd_kernel"} <= split_kernels(launches)
    _same(split, whole, True)


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_decode_launches_split_past_the_grid_limit(layout, monkeypatch):
    """B 2 x 2 KV heads (4 programs on axis 2: launches of 3 and 1), 3 splits of the keys meeting at their
    arrival counters: direct and through the custom op (what a compiled decoding step calls), equal to the one
    launch's outputs and LSE, and the counters are back at zero."""
    from conftest import small_grid_limit, split_kernels

    from subquad.cache import PagedKVCache, StaticKVCache
    from subquad.ops.decode import decode
    from subquad.ops.decode.op import decode_traced
    from subquad.ops.decode.splitkv import _COUNTERS

    b, t, hq, hkv, d = 2, 2, 4, 2, 16
    q, k, v = _inputs([(b, t, hq, d), (b, 40, hkv, d), (b, 40, hkv, d)], seed=3, dtype=torch.float32)
    cache = (StaticKVCache(b, 64, hkv, d, torch.float32, DEV) if layout == "static"
             else PagedKVCache(2 * 6, 8, hkv, d, torch.float32, DEV, batch=b))
    view = cache.update(k, v)

    def run():
        return [*decode(q, view, backend="triton", return_lse=True, block_n=16, num_splits=3),
                *decode_traced(q, view, window=None, scale=d ** -0.5, softcap=None, alibi_slopes=None)]

    whole = run()
    launches = small_grid_limit(monkeypatch)
    split = run()
    assert split_kernels(launches) == {"_decode_kernel"}
    assert [pieces for _, _, pieces in launches] == [[3, 1], [3, 1]]
    _same(split, whole, True)
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())

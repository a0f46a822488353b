"""The flash passes with and without ``UNCHAIN`` (``subquad.ops.chained``): the branch only moves where the
second products' operands are made, so both ways give the reference's outputs and gradients. The interpreter's
small tiles take the branch and the GPU's 128-row tiles do not, so without this test CI would check one side only.
(That the branch keeps the warpgroups from computing a product twice is checked on compiled code, in
``test_sm90_compile.py``.)"""

from __future__ import annotations

import pytest
import torch

from subquad import masks
from test_flash import _check, _close, _qkv, pytestmark  # noqa: F401  (pytestmark: the same skip)


@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_passes_with_and_without_the_branch(monkeypatch, deterministic):
    """Forward, dK/dV and (deterministic) dQ passes on a BigBird-like pattern with global tokens, GQA and a
    ragged length: each way equals the reference, and the two ways equal each other."""
    from subquad.ops.softmax.flash import launch
    pattern = masks.bigbird(16, [0, 5], random_blocks=1, block=16, seed=3)
    runs = []
    for unchain in (True, False):
        monkeypatch.setattr(launch, "chains_replicate", lambda rows, warps, on=unchain: on)
        q, k, v = _qkv(1, 90, 90, 4, 2, 32, torch.bfloat16, seed=12)
        torch.manual_seed(0)        # _check's output gradient
        runs.append(_check(q, k, v, mask=pattern, deterministic=deterministic, plan=False))
    for a, b in zip((runs[0][0], *runs[0][2]), (runs[1][0], *runs[1][2])):
        _close("unchained", a, b, torch.bfloat16)

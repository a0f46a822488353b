"""Autotuned kernels launched through ``subquad.ops.autotuned.Autotuned``: the autotuner decides once per key,
later launches run the kernel directly with its choice (under the interpreter or on a GPU)."""

import os

import pytest
import torch
import triton
import triton.language as tl

from subquad.ops.autotuned import Autotuned

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1)], key=["N", "SCALE"])
@triton.jit
def _scaled_copy(x, y, n, N: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) * SCALE, mask=offs < n)


def test_a_key_is_tuned_once_then_launched_directly():
    kernel = Autotuned(_scaled_copy)
    tuned_calls = []
    run = kernel.tuner.run
    kernel.tuner.run = lambda *a, **kw: tuned_calls.append(1) or run(*a, **kw)
    x = torch.arange(40, dtype=torch.float32, device=DEV)
    for scale in (2, 2, 3):
        y = torch.empty_like(x)
        kernel[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40, N=40, SCALE=scale)
        torch.testing.assert_close(y, x * scale)
    assert len(tuned_calls) == 2 and len(kernel.chosen) == 2
    assert next(iter(kernel.chosen.values()))["BLOCK"] == 16

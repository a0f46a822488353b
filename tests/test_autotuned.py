"""Autotuned kernels launched through ``subquad.ops.autotuned.Autotuned``: the autotuner decides once per key,
later launches run the kernel directly with its choice (under the interpreter or on a GPU)."""

import pytest
import torch
import triton
import triton.language as tl

from subquad.ops.autotuned import Autotuned
from subquad.ops.grid import interpreting

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the launches are recorded under the interpreter")
def test_every_flash_tuning_key_is_an_argument_of_every_flash_launch(monkeypatch):
    """The GPU's flash launches go through an autotuner keyed by name on their arguments; the interpreter's
    launch the kernel directly. A key that some launches do not pass raised ``KeyError`` on the GPU only (a hash
    round count keyed for LSH's launches, missing from every other one). Recorded here: ordinary, sliding-window
    and LSH launches, forward and backward, each holding every key."""
    from triton.runtime.jit import KernelInterface

    import subquad as sq
    from subquad.ops.softmax.flash import tuning

    recorded = []
    monkeypatch.setattr(KernelInterface, "__getitem__",
                        lambda self, grid: (lambda *args, **kwargs: recorded.append((self.__name__, kwargs))))
    q, k, v = (torch.randn(1, 256, 2, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    for out in (sq.attention(q, k, v, causal=True, backend="triton"),
                sq.attention(q, k, v, window_size=(31, 0), backend="triton"),
                sq.lsh_attention(q, k, v, n_buckets=4, n_hashes=2, causal=True, seed=0, backend="triton")):
        out.float().sum().backward()
    keys = {"flash_fwd_kernel": tuning._KEY,
            "flash_bwd_kernel": tuning._KEY + ["DQ_ATOMIC", "SPLIT_ATOMIC", "DQ_PROGRAMS"]}
    seen = [(name, kwargs) for name, kwargs in recorded if name in keys]
    assert {name for name, _ in seen} == set(keys) and len(seen) >= 6
    for name, kwargs in seen:
        assert set(keys[name]) <= set(kwargs), (name, sorted(set(keys[name]) - set(kwargs)))

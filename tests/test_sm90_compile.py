"""The flash kernels compile for the H100 (sm90) with the installed Triton, on a machine without a GPU: a
stand-in driver names the target and ``JITFunction.warmup`` compiles without launching. The interpreter runs
the kernels' Python semantics; this runs Triton's real code generation down to a cubin (ptxas included) for the
variants the device runs, with Hopper's first tiles, so a kernel that the GPU backend rejects, or that no longer
fits in shared memory, fails here rather than in a device session. It runs in a child process: under
``TRITON_INTERPRET=1`` (the CI's setting) ``@triton.jit`` makes interpreted functions, which do not compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the device compiles its own kernels")

#: Hopper's shared memory per block (227 KB)
SHARED = 232448


def test_flash_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert done.stdout.count("compiled") == 5, done.stdout


class _Sm90:
    """A stand-in for Triton's CUDA driver: just enough for ``warmup`` to pick the target and compile."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _compile_all() -> None:
    from triton.runtime import driver

    from subquad import masks
    from subquad.ops.softmax.flash import _band_args, _block_mask_args, launch
    from subquad.ops.softmax.flash.backward import flash_bwd_dkdv_kernel
    from subquad.ops.softmax.flash.forward import flash_fwd_kernel

    # the first configurations of the Hopper lists (launch.FWD_CONFIGS_SM90, DKDV_CONFIGS_SM90)
    tiles = {flash_fwd_kernel: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
             flash_bwd_dkdv_kernel: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)}
    recorded = []

    class Record:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **meta: recorded.append((self.fn, args, meta))

    launch._kernel = lambda name, fn: Record(fn)
    launch.interpreting = lambda: False
    driver.set_active(_Sm90())

    def bf16(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16)

    b, n, h, d = 1, 1024, 4, 128
    q, k, v = bf16(b, n, h, d), bf16(b, n, h, d), bf16(b, n, h, d)
    longformer = masks.resolve(masks.longformer(256, range(16)), causal=False, batch=b, heads=h, seq_q=n, seq_kv=n,
                               device="cpu", block_q=128, block_kv=128)
    listed, band = _block_mask_args(longformer, None, None), _band_args(0, 1 << 30)
    columns = (bf16(b, 8, h, d), bf16(b, 8, h, d), torch.arange(8, dtype=torch.int32) * 128 + 127, 256, 1 << 30)
    launch.forward(q, k, v, band, 0.1, None, None)                                  # dense causal
    launch.forward(q, k, v, listed, 0.1, None, None)                                # BlockMask lists, heaviest first
    launch.forward(q, k, v, _band_args(0, 255), 0.1, None, None, second=columns)    # band + gathered columns
    lse, dq = torch.zeros(b, h, n), torch.zeros(b, n, h, d)
    launch._dkdv(q, k, v, q, lse, lse, dq, listed, 0.1, None, None, True)
    launch._dkdv(q, k, v, q, lse, lse, dq, band, 0.1, None, None, True)
    assert recorded[1][2]["ORDERED"] and recorded[2][2]["TWO_SOURCES"]
    for fn, args, meta in recorded:
        compiled = fn.warmup(*args, grid=(1,), **meta, **tiles[fn])
        name = fn.fn.__name__
        assert compiled is not None and compiled.asm.get("cubin"), f"{name}: no cubin"
        assert compiled.metadata.shared <= SHARED, f"{name}: {compiled.metadata.shared} bytes of shared memory"
        print("compiled", name, {x: meta[x] for x in ("USE_LIST", "ORDERED", "TWO_SOURCES") if x in meta},
              compiled.metadata.shared, flush=True)


if __name__ == "__main__":
    _compile_all()

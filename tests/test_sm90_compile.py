"""The Triton kernels compile for the H100 (sm90) with the installed Triton, on a machine without a GPU
(``subquad.bench.sm90``): every launch that a forward and backward would make is recorded instead of run, and
each kernel variant is compiled down to a cubin (ptxas included) with Hopper's first configuration that fits.
The interpreter runs the kernels' Python semantics; this runs Triton's real code generation, so a kernel that
the GPU backend rejects, or that no longer fits in shared memory, fails here rather than in a device session
(the dK/dV pass's TMA dQ, which the interpreter cannot run, is first in the configurations: compiled here).
It runs in a child process: under ``TRITON_INTERPRET=1`` (the CI's setting) ``@triton.jit``
makes interpreted functions, which do not compile."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the device compiles its own kernels")

#: kernel variants the child compiles (each printed on a ``compiled`` line)
EXPECTED = {"flash_fwd_kernel": 16, "flash_bwd_kernel": 19,
            "flash_bwd_preprocess_kernel": 4, "state_fwd": 16, "output_fwd": 4, "state_bwd": 15, "dv_bwd": 5,
            "dqk_bwd": 5, "chunk_cumsum": 2, "intra_fwd": 1, "intra_bwd": 1, "decay_grad": 2, "wy_fwd": 1,
            "wy_bwd": 1, "fused_fwd": 10, "_decode_kernel": 3, "_merge_fwd_kernel": 1, "_merge_bwd_kernel": 1,
            # NSA's (its compressed and window branches are two of the flash variants above)
            "_selection_kernel": 1, "_selected_fwd": 1, "_selected_bwd_dq": 1, "_selected_bwd_dkdv": 1,
            "_gate_mix_fwd": 1, "_gate_mix_bwd": 1}


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    compiled = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("compiled ")]
    assert {name: compiled.count(name) for name in set(compiled)} == EXPECTED, done.stdout


def _report(field: str, *args: str) -> dict:
    """``benchmarks/kernel_report.py ARGS``'s line ``field`` (``mma``, ``prologue``, ...) per kernel, as text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_report.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    found, kernel = {}, None
    for line in done.stdout.splitlines():
        if "(triton" in line:
            kernel = line.split()[0]
        elif line.strip().startswith(field + ":"):
            found[kernel] = line.split(":", 1)[1].strip()
    return found


def _tensor_instructions(*args: str) -> dict:
    """``benchmarks/kernel_report.py ARGS``'s tensor-core instruction counts, per kernel."""
    return {kernel: eval(mma) for kernel, mma in _report("mma", *args).items()}  # noqa: S307  (the report's dict)


def test_short_tiles_split_their_chained_dots_between_warpgroups():
    """64-row tiles with 8 warps (MLA's decode, 64-blocks' forward and dK/dV) compute each product once:
    the scores' dot is split between the warpgroups (n32 / n64 halves), not run whole by both (subquad.ops.chained).
    MLA, a 64 x 64 tile over 576 latent columns: 36 m64n32k16 a warpgroup for the scores (72 if computed twice),
    4 m64n256k16 for P.V; the forward 64 x 128 x 8 warps: 16 m64n64k16 in its one loop; the backward 64 x 64 x 8
    (a band: dK/dV programs beside dQ programs): S^T and dP^T 8 m64n32k16 each (32 if whole), dV and dK 4
    m64n64k16 each; the dQ programs' S and dP 8 m64n32k16 each, dQ 4 m64n64k16."""
    assert _tensor_instructions("mla")["_decode_kernel"] == {"m64n32k16": 36, "m64n256k16": 4}
    flash = _tensor_instructions("causal-1k", "--config", "fwd=64,128,8,3", "--config", "bwd=64,64,8,2")
    assert flash["flash_fwd_kernel"] == {"m64n64k16": 16}
    assert flash["flash_bwd_kernel"] == {"m64n32k16": 32, "m64n64k16": 12}


def _copies_before_a_wait(prologue: str) -> int:
    """How many ``cp.async`` a ``kernel_report`` prologue line (``ldg x20 sts x16 cp.async x8 commit ...``)
    issues before its first wait or barrier."""
    copies = 0
    for name, count in re.findall(r"(\S+)(?: x(\d+))?", prologue):
        if name in ("wait", "tma-wait", "bar"):
            break
        copies += int(count or 1) if name == "cp.async" else 0
    return copies


def test_list_walks_copy_their_first_keys_without_waiting():
    """BlockMask walks read each list entry an iteration ahead, the first beside Q's loads (``tile.list_ahead``):
    in the forward's and the backward's prologue the first K/V tile's copies (8 a thread at these tiles) leave
    before any wait or barrier. Read in the loop that used it, the entry went through shared memory a stage
    ahead (at 3 stages): its copy, a wait, a barrier and a shared load stood before the first K/V copies."""
    prologues = _report("prologue", "block-sparse-16k", "--config", "fwd=128,64,4,3", "--config", "bwd=64,64,4,3")
    for kernel in ("flash_fwd_kernel", "flash_bwd_kernel"):
        assert _copies_before_a_wait(prologues[kernel]) >= 8, prologues


def _run_ops() -> None:
    """A forward and backward of each kernel family, and decoding steps (GQA, MLA's latent layout), on zeros
    (the values are never computed)."""
    from subquad import decode, masks, nsa
    from subquad.ops.delta.chunk import chunk_delta_rule
    from subquad.ops.linear import chunk, chunk_split
    from subquad.ops.linear.chunk import chunk_gla
    from subquad.ops.softmax.dropout import new_rng
    from subquad.ops.softmax.flash import flash_attention, flash_attention_with_columns, launch, tuning
    from subquad.masks.plan import plan
    from subquad.ops.softmax.planned import _plain_band

    tuning._hopper = lambda: True
    launch.interpreting = tuning.interpreting = lambda: False
    # BlockMask walks with their atomic dQ (the default only where walks are cut into pieces); the dQ programs'
    # walk (the default elsewhere) is the deterministic call below
    launch._walks_whole = lambda m, q, k: False

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype, requires_grad=True)

    b, n, h, d = 1, 1024, 4, 128
    q, k, v = leaf(b, n, h, d), leaf(b, n, h, d), leaf(b, n, h, d)
    longformer = masks.longformer(256, range(16))
    for out, lse in (flash_attention(q, k, v, causal=True),              # the band path
                     flash_attention(q, k, v, mask=longformer),          # BlockMask lists, heaviest first
                     flash_attention(q, k, v, causal=True, deterministic=True),     # dQ programs in the same launch
                     flash_attention(q, k, v, mask=longformer, deterministic=True),    # and beside a BlockMask walk
                     # attention dropout: the band (dQ programs) and a BlockMask walk (atomic dQ, by TMA)
                     flash_attention(q, k, v, causal=True, dropout=(0.1, new_rng("cpu", 0.1))),
                     flash_attention(q, k, v, mask=longformer, dropout=(0.1, new_rng("cpu", 0.1)))):
        out.sum().backward()
    # the band walks' forward with each P.V product beside the next tile's softmax (``OVERLAP``, a tuning
    # configuration's: forced here, on GQA for a launch of its own)
    tuning.FWD_OVERLAP = True
    flash_attention(q, k[:, :, :2], v[:, :, :2], causal=True)
    tuning.FWD_OVERLAP = None
    # key tiles too few for an H100's 132 SMs: dK/dV walks split over programs (band path, BlockMask lists)
    launch.num_sms = lambda device: 132
    ql, ks = leaf(b, 4096, 1, d), leaf(b, 128, 1, d)
    for q_, k_, mask in ((ql, ks, None), (ql, ql, masks.block_sparse(torch.ones(32, 32, dtype=torch.bool), 128))):
        out, lse = flash_attention(q_, k_, k_, mask=mask)
        out.sum().backward()
    # global tokens whose blocks walk 32 blocks, the band's 3-4: both walks in pieces (the forward's in its launch)
    qp = leaf(b, 4096, h, d)
    out, lse = flash_attention(qp, qp, qp, mask=masks.longformer(256, range(16)))
    out.sum().backward()
    # a block-diagonal BlockMask: its dK/dV programs store dQ (DQ_STORE)
    out, lse = flash_attention(q, k, v, mask=masks.block_sparse(torch.eye(n // 128, dtype=torch.bool), 128))
    out.sum().backward()
    # a band (strided) or BlockMask (fixed) + gathered columns in one launch; the first's dQ programs walk both
    # key sets, the columns' backward computes dK/dV alone; the fixed pattern's dQ programs store its local
    # blocks' dK/dV too where heads are not grouped (DQ_DKDV), and beside dK/dV programs where they are
    kg, vg = leaf(b, n, h // 2, d), leaf(b, n, h // 2, d)
    for pattern, keys, values in ((masks.strided(256), k, v), (masks.fixed(128, 8), k, v),
                                  (masks.fixed(128, 8), kg, vg)):
        pl = plan(pattern, n)
        local, columns = pl.components
        ctx = pl.context(b, h, "cpu")
        first = ((local.pattern.lo, local.pattern.hi) if _plain_band(local)
                 else local.block_mask(ctx, 128, 128, "cpu"))
        out, lse = flash_attention_with_columns(
            q, keys, values, first, columns.kv_index, columns.block_mask(ctx, 128, 128, "cpu"), columns.q_pos,
            columns.kv_pos, (columns.pattern.lo, columns.pattern.hi), d ** -0.5)
        out.sum().backward()

    t = 256
    for form in ("two-pass", "fused", "split"):    # the forward in two passes, in one kernel, on segments
        chunk.FUSED_MIN_PROGRAMS = chunk.FUSED_MIN_PROGRAMS_DELTA = 1 << 30 if form == "two-pass" else 0
        chunk_split.SPLIT_MIN_CHUNKS = 2 if form == "split" else 1 << 30
        for g in (None, torch.zeros(1, 1, h).expand(b, t, h), torch.zeros(b, t, h, dtype=torch.float32),
                  torch.zeros(b, t, h, 64, dtype=torch.float32)):
            lq, lk, lv = leaf(b, t, h, 64), leaf(b, t, h, 64), leaf(b, t, h, 64)
            # (the constant per head without its gradient: the backward kernels' GATE 3)
            gl = g if g is None or g.stride(1) == 0 else g.requires_grad_()
            out, state = chunk_gla(lq, lk, lv, gl, 0.125, None, None, 64)
            out.sum().backward()
        lq, lk, lv, beta = leaf(b, t, h, 64), leaf(b, t, h, 64), leaf(b, t, h, 64), leaf(b, t, h)
        out, state = chunk_delta_rule(lq, lk, lv, beta, torch.zeros(b, t, h, requires_grad=True), 0.125, None,
                                      None, 64)
        out.sum().backward()

    # NSA: the selection (top-k in the kernel), the selected blocks' walks forward and backward, the gates' mix
    nq, nk = leaf(b, n, 16, d), leaf(b, n, 1, d)
    out = nsa(nq, nk, leaf(b, n, 1, d), leaf(b, n, 16, 3), block=64, top_k=16, window=512, backend="triton")
    out.sum().backward()

    cache = torch.zeros(2, 4096, 2, 128, dtype=torch.bfloat16)
    decode(torch.zeros(2, 1, 8, 128, dtype=torch.bfloat16), cache, cache, backend="triton")     # GQA
    latent = torch.zeros(2, 4096, 1, 576, dtype=torch.bfloat16)                               # MLA: [c_kv, k_rope]
    decode(torch.zeros(2, 1, 128, 576, dtype=torch.bfloat16), latent, latent[..., :512], backend="triton")

    # grids past CUDA's limit on axes 1 and 2 (the limit lowered: these 4 batch x heads split), whose variants
    # (SPLIT_GRID) add the program offset: the band and a heaviest-first BlockMask walk, the LSE merge, GQA decode
    from subquad.ops import grid
    from subquad.ops.softmax.lse_merge import merge_lse_fused

    grid.MAX_GRID_YZ = 2
    for mask in (None, longformer):
        out, lse = flash_attention(q, k, v, causal=mask is None, mask=mask)
        out.sum().backward()
    out, lse = merge_lse_fused(leaf(b, n, h, d), leaf(b, h, n, dtype=torch.float32), leaf(b, n, h, d),
                               leaf(b, h, n, dtype=torch.float32), torch.bfloat16)
    (out.sum() + lse.sum()).backward()
    decode(torch.zeros(2, 1, 8, 128, dtype=torch.bfloat16), cache, cache, backend="triton")


def _compile_all() -> None:
    from subquad.bench.sm90 import SHARED, recorded_variants

    for kernel, args, kwargs, configs in recorded_variants(_run_ops, pruned=True):
        name = kernel.fn.__name__
        # the first configuration whose tiles fit, as the untuned launch takes (the autotuner drops the others)
        for options in configs:
            compiled = kernel.warmup(*args, grid=(1,), **{**options, **kwargs})
            assert compiled is not None and compiled.asm.get("cubin"), f"{name}: no cubin"
            if compiled.metadata.shared <= SHARED:
                break
        assert compiled.metadata.shared <= SHARED, f"{name}: {compiled.metadata.shared} bytes of shared memory"
        print("compiled", name, compiled.metadata.shared, flush=True)


if __name__ == "__main__":
    _compile_all()

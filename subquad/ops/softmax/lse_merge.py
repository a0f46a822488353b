"""Merging two partial attention results over disjoint key sets by their log-sum-exp.

``out = a1 o1 + a2 o2`` with ``a_i = exp(lse_i - lse)``, ``lse = log(exp(lse1) + exp(lse2))``; a row that
neither part reaches gets 0 and -inf. One fused Triton pass forward (reads o1, o2 once, writes out) and
one backward, which returns ``do_i = a_i dout`` and ``dlse_i = a_i (o_i.dout - out.dout + dlse)`` (with
``out.dout = a1 o1.dout + a2 o2.dout`` recomputed in fp32 rather than read back rounded). The plain PyTorch
form (``merge_lse``) is the CPU path, merges any number of parts, and is what the kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..first_order import first_order
from ..grid import cdiv, launch_split, next_power_of_2


def merge_lse(outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype):
    """outs ``(B, N, H, Dv)``, lses ``(B, H, N)`` fp32 (-inf: the part saw no key) -> ``(out, lse)``."""
    if len(outs) == 1:
        return outs[0].to(dtype), lses[0]
    return merge_lse_stacked(torch.stack(outs, 1), torch.stack(lses, 1), dtype)


def merge_lse_stacked(outs: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype):
    """``merge_lse`` of parts stacked on dim 1: outs ``(B, S, N, H, Dv)``, lses ``(B, S, H, N)``; a fixed
    number of operations whatever S (the split rows of a plan: a Python loop over eight parts cost ~0.8 ms
    of host time per call).

    The running max is detached: the result does not depend on it, and its gradient would be NaN on
    empty rows.
    """
    m = lses.detach().amax(1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(lses - m.unsqueeze(1))
    total = weights.sum(1)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(safe))
    share = (weights / safe.unsqueeze(1)).transpose(2, 3).unsqueeze(-1)
    return (share * outs.float()).sum(1).to(dtype), lse


@triton.jit
def _weights(L1, L2, lse_off, row_ok):
    l1 = tl.load(L1 + lse_off, mask=row_ok, other=float("-inf"))
    l2 = tl.load(L2 + lse_off, mask=row_ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    total = w1 + w2
    safe = tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m + tl.log(safe))
    return w1 / safe, w2 / safe, lse


@triton.jit(do_not_specialize=["pid_offset"])
def _merge_fwd_kernel(O1, O2, L1, L2, OUT, LSE, N, H,
                      s1b, s1n, s1h, s2b, s2n, s2h, sob, son, soh, pid_offset,
                      DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT_GRID: tl.constexpr):
    """``pid_offset``, ``SPLIT_GRID``: a grid past CUDA's limit on its batch x head rows, the offset added in that
    grid's variant only (as ``flash.tile.grid_row``)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    if SPLIT_GRID:
        pid_bh += pid_offset
    b, h = pid_bh // H, pid_bh % H
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols[None, :] < DV)
    lse_off = pid_bh.to(tl.int64) * N + rows
    a1, a2, lse = _weights(L1, L2, lse_off, row_ok)
    r = rows.to(tl.int64)[:, None]
    o1 = tl.load(O1 + b.to(tl.int64) * s1b + h * s1h + r * s1n + cols[None, :], mask=ok, other=0.0)
    o2 = tl.load(O2 + b.to(tl.int64) * s2b + h * s2h + r * s2n + cols[None, :], mask=ok, other=0.0)
    out = a1[:, None] * o1.to(tl.float32) + a2[:, None] * o2.to(tl.float32)
    tl.store(OUT + b.to(tl.int64) * sob + h * soh + r * son + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + lse_off, lse, mask=row_ok)


@triton.jit(do_not_specialize=["pid_offset"])
def _merge_bwd_kernel(O1, O2, L1, L2, DOUT, DLSE, DO1, DO2, DL1, DL2, N, H,
                      s1b, s1n, s1h, s2b, s2n, s2h, sdb, sdn, sdh, pid_offset,
                      HAS_DLSE: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                      SPLIT_GRID: tl.constexpr):
    """``pid_offset``, ``SPLIT_GRID``: as ``_merge_fwd_kernel``'s."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    if SPLIT_GRID:
        pid_bh += pid_offset
    b, h = pid_bh // H, pid_bh % H
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols[None, :] < DV)
    lse_off = pid_bh.to(tl.int64) * N + rows
    a1, a2, _ = _weights(L1, L2, lse_off, row_ok)
    r = rows.to(tl.int64)[:, None]
    o1 = tl.load(O1 + b.to(tl.int64) * s1b + h * s1h + r * s1n + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + b.to(tl.int64) * s2b + h * s2h + r * s2n + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    d = tl.load(DOUT + b.to(tl.int64) * sdb + h * sdh + r * sdn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    p1 = tl.sum(o1 * d, 1)
    p2 = tl.sum(o2 * d, 1)
    base = a1 * p1 + a2 * p2
    if HAS_DLSE:
        base -= tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
    # d o_i are written contiguous (B, N, H, DV): the strides of DOUT's layout
    g_off = ((b.to(tl.int64) * N + r) * H + h) * DV + cols[None, :]
    tl.store(DO1 + g_off, (a1[:, None] * d).to(DO1.dtype.element_ty), mask=ok)
    tl.store(DO2 + g_off, (a2[:, None] * d).to(DO2.dtype.element_ty), mask=ok)
    tl.store(DL1 + lse_off, a1 * (p1 - base), mask=row_ok)
    tl.store(DL2 + lse_off, a2 * (p2 - base), mask=row_ok)


def _block_n(dv: int) -> int:
    return max(16, 8192 // next_power_of_2(dv))


class _Merge2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o1, l1, o2, l2, dtype):
        bsz, n, h, dv = o1.shape
        o1 = o1 if o1.stride(-1) == 1 else o1.contiguous()
        o2 = o2 if o2.stride(-1) == 1 else o2.contiguous()
        l1, l2 = l1.float().contiguous(), l2.float().contiguous()
        out = torch.empty(bsz, n, h, dv, device=o1.device, dtype=dtype)
        lse = torch.empty(bsz, h, n, device=o1.device, dtype=torch.float32)
        bn, bdv = _block_n(dv), next_power_of_2(dv)
        launch_split(
            _merge_fwd_kernel, lambda rows: (cdiv(n, bn), rows), bsz * h,
            o1, o2, l1, l2, out, lse, n, h, o1.stride(0), o1.stride(1), o1.stride(2),
            o2.stride(0), o2.stride(1), o2.stride(2), out.stride(0), out.stride(1), out.stride(2),
            DV=dv, BLOCK_N=bn, BLOCK_DV=bdv, flag="SPLIT_GRID")
        ctx.save_for_backward(o1, l1, o2, l2)
        return out, lse

    @staticmethod
    @first_order
    def backward(ctx, dout, dlse):
        o1, l1, o2, l2 = ctx.saved_tensors
        bsz, n, h, dv = o1.shape
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        do1 = torch.empty(bsz, n, h, dv, device=o1.device, dtype=o1.dtype)
        do2 = torch.empty(bsz, n, h, dv, device=o2.device, dtype=o2.dtype)
        dl1, dl2 = torch.empty_like(l1), torch.empty_like(l2)
        has_dlse = dlse is not None
        dlse = dlse.float().contiguous() if has_dlse else l1
        bn, bdv = _block_n(dv), next_power_of_2(dv)
        launch_split(
            _merge_bwd_kernel, lambda rows: (cdiv(n, bn), rows), bsz * h,
            o1, o2, l1, l2, dout, dlse, do1, do2, dl1, dl2, n, h, o1.stride(0), o1.stride(1), o1.stride(2),
            o2.stride(0), o2.stride(1), o2.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            HAS_DLSE=has_dlse, DV=dv, BLOCK_N=bn, BLOCK_DV=bdv, flag="SPLIT_GRID")
        return do1, dl1, do2, dl2, None


def merge_lse_fused(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor, dtype: torch.dtype):
    """Two parts, one Triton pass each way (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    return _Merge2.apply(o1, l1, o2, l2, dtype)


__all__ = ["merge_lse", "merge_lse_fused"]

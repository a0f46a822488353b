"""NSA's gated sum of its three branches, ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, in one pass.

In PyTorch the sum upcast each branch to fp32 and kept every product (at 2 x 16k tokens of 64 heads of 128, each
is 1 GB): ~8 passes over memory forward and more backward. Here a program reads one row of each branch and the
row's three gates, sums in fp32 and writes the output in the branches' dtype; the backward writes the three
branch gradients (``g_i * do``) and the gates' (``sum_d do * o_i``) from one read of ``do`` and the branches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grid import cdiv, next_power_of_2

#: rows (batch x token x head) a program takes
ROWS = 16


@triton.jit
def _rows(n_rows, DV: tl.constexpr, BLOCK_DV: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_DV)
    ok = (rows < n_rows)[:, None] & (cols < DV)[None, :]
    return rows, rows.to(tl.int64)[:, None] * DV + cols[None, :], ok


@triton.jit
def _gated(O, GATE, offs, ok, row_ok):
    """One branch's rows times their gate, in fp32."""
    gate = tl.load(GATE, mask=row_ok, other=0.0).to(tl.float32)
    return gate[:, None] * tl.load(O + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _gate_mix_fwd(O_CMP, O_SLC, O_WIN, GATES, OUT, n_rows, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  ROWS: tl.constexpr):
    rows, offs, ok = _rows(n_rows, DV, BLOCK_DV, ROWS)
    row_ok = rows < n_rows
    g = GATES + rows.to(tl.int64) * 3
    out = _gated(O_CMP, g, offs, ok, row_ok) + _gated(O_SLC, g + 1, offs, ok, row_ok)
    out += _gated(O_WIN, g + 2, offs, ok, row_ok)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _branch_grads(O, GATE, D_O, D_GATE, do, row_ok, offs, ok):
    """One branch: its gradient ``gate * do`` and its gate's ``sum_d do * o``."""
    gate = tl.load(GATE, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(D_O + offs, (gate[:, None] * do).to(D_O.dtype.element_ty), mask=ok)
    o = tl.load(O + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(D_GATE, tl.sum(do * o, 1).to(D_GATE.dtype.element_ty), mask=row_ok)


@triton.jit
def _gate_mix_bwd(O_CMP, O_SLC, O_WIN, GATES, D_OUT, D_CMP, D_SLC, D_WIN, D_GATES, n_rows, DV: tl.constexpr,
                  BLOCK_DV: tl.constexpr, ROWS: tl.constexpr):
    rows, offs, ok = _rows(n_rows, DV, BLOCK_DV, ROWS)
    row_ok = rows < n_rows
    do = tl.load(D_OUT + offs, mask=ok, other=0.0).to(tl.float32)
    g, dg = GATES + rows.to(tl.int64) * 3, D_GATES + rows.to(tl.int64) * 3
    _branch_grads(O_CMP, g, D_CMP, dg, do, row_ok, offs, ok)
    _branch_grads(O_SLC, g + 1, D_SLC, dg + 1, do, row_ok, offs, ok)
    _branch_grads(O_WIN, g + 2, D_WIN, dg + 2, do, row_ok, offs, ok)


def _launch(kernel, first: torch.Tensor, *tensors) -> None:
    n_rows = first.numel() // first.shape[-1]
    dv = first.shape[-1]
    kernel[(cdiv(n_rows, ROWS),)](first, *tensors, n_rows, DV=dv, BLOCK_DV=next_power_of_2(dv), ROWS=ROWS,
                                  num_warps=4)


class _GateMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, gates):
        out = torch.empty_like(o_slc)
        _launch(_gate_mix_fwd, o_cmp, o_slc, o_win, gates, out)
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        return out

    @staticmethod
    def backward(ctx, d_out):
        o_cmp, o_slc, o_win, gates = ctx.saved_tensors
        grads = [torch.empty_like(o) for o in (o_cmp, o_slc, o_win)]
        d_gates = torch.empty_like(gates)
        _launch(_gate_mix_bwd, o_cmp, o_slc, o_win, gates, d_out.contiguous(), *grads, d_gates)
        return (*grads, d_gates)


def gate_mix(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``gates[..., 0] * o_cmp + gates[..., 1] * o_slc + gates[..., 2] * o_win`` in fp32, in the branches' dtype:
    branches ``(B, N, H, D_v)`` of one dtype, ``gates`` ``(B, N, H, 3)``; differentiable in all four."""
    return _GateMix.apply(*(x.contiguous() for x in (o_cmp, o_slc, o_win, gates)))

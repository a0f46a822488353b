"""The flash kernels as ``torch.library`` custom ops with fake implementations and autograd, so that
``torch.compile`` traces a model calling ``subquad.attention`` without graph breaks.

``subquad::flash_fwd`` returns ``(out, lse)``; both are differentiable (the LSE gradient enters the
backward as ``delta = rowsum(dO * O) - dlse``), which the LSE merges of planned patterns rely on.
``subquad::flash_bwd`` returns ``(dq, dk, dv)``.

Eager calls take a plain ``torch.autograd.Function`` around the same two launches instead: the custom op's
dispatch (over 31 arguments then) cost 432 us of host time per call whose inputs need gradients on the CI
machine (84 us without), the Function 25 us -- more than a small attention call's kernels, and paid by every
layer of a model. ``run`` takes the custom op while tracing (``torch.compile``, export) or on tensor
subclasses (fake tensors), where its fake implementation is what is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...first_order import first_order
from . import launch
from .launch import MaskArgs


#: the tensors of a MaskArgs that depend on its BlockMask's block size, in the ops' argument order
_BLOCK_TENSORS = 12     # 4 lists, 4 transposed lists, 2 orders, tile_of, bits


def _block_tensors(m: MaskArgs | None) -> tuple:
    if m is None:
        return (None,) * _BLOCK_TENSORS
    lists = m.lists if m.lists is not None else (None,) * 4
    lists_t = m.lists_t if m.lists_t is not None else (None,) * 4
    return (*lists, *lists_t, m.order, m.order_t, m.tile_of, m.bits)


def _mask(use_list, block, doc_ids, q_pos, kv_pos, flags, layout, band_lo, band_hi, prefix, q_prefix, layout_block,
          and_causal, mbq, mbk) -> MaskArgs:
    fn, fi, pn, pi, tfn, tfi, tpn, tpi, order, order_t, tile_of, bits = block
    return MaskArgs(use_list=use_list, lists=(fn, fi, pn, pi) if use_list else None,
                    lists_t=(tfn, tfi, tpn, tpi) if use_list else None, tile_of=tile_of, bits=bits,
                    doc_ids=doc_ids, q_pos=q_pos, kv_pos=kv_pos, band_lo=band_lo, band_hi=band_hi, prefix=prefix,
                    mbq=mbq, mbk=mbk, q_prefix=q_prefix, flags=flags, layout=layout, layout_block=layout_block,
                    and_causal=and_causal, order=order, order_t=order_t, cut_walks=False)


@torch.library.custom_op("subquad::flash_fwd", mutates_args=())
def flash_fwd(q: Tensor, k: Tensor, v: Tensor,
              full_num: Optional[Tensor], full_idx: Optional[Tensor], part_num: Optional[Tensor],
              part_idx: Optional[Tensor], t_full_num: Optional[Tensor], t_full_idx: Optional[Tensor],
              t_part_num: Optional[Tensor], t_part_idx: Optional[Tensor], order: Optional[Tensor],
              order_t: Optional[Tensor], tile_of: Optional[Tensor], bits: Optional[Tensor],
              b_full_num: Optional[Tensor], b_full_idx: Optional[Tensor], b_part_num: Optional[Tensor],
              b_part_idx: Optional[Tensor], b_t_full_num: Optional[Tensor], b_t_full_idx: Optional[Tensor],
              b_t_part_num: Optional[Tensor], b_t_part_idx: Optional[Tensor], b_order: Optional[Tensor],
              b_order_t: Optional[Tensor], b_tile_of: Optional[Tensor], b_bits: Optional[Tensor],
              doc_ids: Optional[Tensor], q_pos: Optional[Tensor], kv_pos: Optional[Tensor],
              flags: Optional[Tensor], layout: Optional[Tensor], slopes: Optional[Tensor], rng: Optional[Tensor],
              scale: float, softcap: float, band_lo: int, band_hi: int, prefix: int, q_prefix: int,
              layout_block: int, and_causal: bool, mbq: int, mbk: int, b_mbq: int, b_mbk: int, use_list: bool,
              deterministic: bool, dropout_p: float) -> tuple[Tensor, Tensor]:
    """The forward under the BlockMask of ``full_num .. bits``; the ``b_`` tensors (the same pattern at
    ``b_mbq`` x ``b_mbk`` blocks, ``run``'s ``m_backward``; None and 0 without one) are kept for the backward."""
    block = (full_num, full_idx, part_num, part_idx, t_full_num, t_full_idx, t_part_num, t_part_idx, order,
             order_t, tile_of, bits)
    m = _mask(use_list, block, doc_ids, q_pos, kv_pos, flags, layout, band_lo, band_hi, prefix, q_prefix,
              layout_block, and_causal, mbq, mbk)
    return launch.forward(q, k, v, m, scale, softcap if softcap > 0 else None, slopes,
                          dropout=(dropout_p, rng) if dropout_p > 0 else None)


@flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, *args):
    bsz, seq_q, hq, _ = q.shape
    out = q.new_empty(bsz, seq_q, hq, v.shape[3])
    lse = q.new_empty(bsz, hq, seq_q, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("subquad::flash_bwd", mutates_args=())
def flash_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              full_num: Optional[Tensor], full_idx: Optional[Tensor], part_num: Optional[Tensor],
              part_idx: Optional[Tensor], t_full_num: Optional[Tensor], t_full_idx: Optional[Tensor],
              t_part_num: Optional[Tensor], t_part_idx: Optional[Tensor], order: Optional[Tensor],
              order_t: Optional[Tensor], tile_of: Optional[Tensor],
              bits: Optional[Tensor], doc_ids: Optional[Tensor], q_pos: Optional[Tensor], kv_pos: Optional[Tensor],
              flags: Optional[Tensor], layout: Optional[Tensor], slopes: Optional[Tensor], rng: Optional[Tensor],
              scale: float, softcap: float, band_lo: int, band_hi: int, prefix: int, q_prefix: int,
              layout_block: int, and_causal: bool, mbq: int, mbk: int, use_list: bool,
              deterministic: bool, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    block = (full_num, full_idx, part_num, part_idx, t_full_num, t_full_idx, t_part_num, t_part_idx, order,
             order_t, tile_of, bits)
    m = _mask(use_list, block, doc_ids, q_pos, kv_pos, flags, layout, band_lo, band_hi, prefix, q_prefix,
              layout_block, and_causal, mbq, mbk)
    return launch.backward(do, q, k, v, out, lse, dlse, m, scale, softcap if softcap > 0 else None, slopes,
                           deterministic, dropout=(dropout_p, rng) if dropout_p > 0 else None)


@flash_bwd.register_fake
def _flash_bwd_fake(do, dlse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_TENSOR_ARGS = 34  # q, k, v, 2 x 12 block tensors, doc_ids, q_pos, kv_pos, flags, layout, slopes, rng


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_N_TENSOR_ARGS], *output)
    ctx.scalars = inputs[_N_TENSOR_ARGS:]


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v = saved[:3]
    forward_block = saved[3:3 + _BLOCK_TENSORS]
    backward_block = saved[3 + _BLOCK_TENSORS:3 + 2 * _BLOCK_TENSORS]
    shared = saved[3 + 2 * _BLOCK_TENSORS:_N_TENSOR_ARGS]
    out, lse = saved[_N_TENSOR_ARGS:]
    (scale, softcap, band_lo, band_hi, prefix, q_prefix, layout_block, and_causal, mbq, mbk, b_mbq, b_mbk, use_list,
     deterministic, dropout_p) = ctx.scalars
    block = forward_block
    if b_mbq:       # the pattern at the backward's own block size (``run``'s ``m_backward``)
        block, mbq, mbk = backward_block, b_mbq, b_mbk
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flash_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, dlse, q, k, v, out, lse, *block,
                           *shared, scale, softcap, band_lo, band_hi, prefix, q_prefix, layout_block, and_causal,
                           mbq, mbk, use_list, deterministic, dropout_p)
    return (dq, dk, dv) + (None,) * (_N_TENSOR_ARGS - 3 + len(ctx.scalars))


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def _saved_backward(ctx, dout, dlse):
    """``(dq, dk, dv)`` of a Function that saved ``(q, k, v, out, lse)`` and set ``ctx.launch_args`` to ``(m,
    scale, softcap, slopes, deterministic, dropout)``."""
    q, k, v, out, lse = ctx.saved_tensors
    m, scale, softcap, slopes, deterministic, dropout = ctx.launch_args
    if dout is None:
        dout = torch.zeros_like(out)
    return launch.backward(dout, q, k, v, out, lse, dlse, m, scale, softcap, slopes, deterministic, dropout=dropout)


class _Flash(torch.autograd.Function):
    """The custom ops' forward and backward launches for eager calls (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, m: MaskArgs, scale: float, softcap, slopes, deterministic: bool,
                m_backward: MaskArgs | None, dropout):
        out, lse = launch.forward(q, k, v, m, scale, softcap, slopes, dropout=dropout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.launch_args = (m if m_backward is None else m_backward, scale, softcap, slopes, deterministic, dropout)
        return out, lse

    @staticmethod
    @first_order
    def backward(ctx, dout, dlse):
        return (*_saved_backward(ctx, dout, dlse), None, None, None, None, None, None, None)


def _periodic_keys(x: torch.Tensor, kv_stride: tuple[int, int, int], count: int) -> torch.Tensor:
    """The ``count`` keys ``first + p * period + j`` (``j < width``) of ``x`` (B, N, H, D) as a strided view
    (B, count // width, width, H, D), for ``kv_stride = (first, width, period)`` (``plan._periodic_stride``)."""
    first, width, period = kv_stride
    sb, sn, sh, sd = x.stride()
    return x.as_strided((x.shape[0], count // width, width, x.shape[2], x.shape[3]), (sb, period * sn, sn, sh, sd),
                        x.storage_offset() + first * sn)


class FlashWithColumns(torch.autograd.Function):
    """Two key sets in one forward launch (``launch.forward``'s ``second``): the keys of ``m``, and the columns
    ``kv_index`` gathered into a compact set at the positions of ``m2``, kept where ``band2`` holds; the backward
    runs each set's dK/dV pass on the merged LSE, into one dQ, and adds the columns' dK/dV into dK/dV at their
    positions in place (through autograd, the gather's backward was a zeroed copy of K and V and a sum: four
    full passes over K/V-sized memory). ``kv_stride``: ``kv_index`` as whole periods (``_periodic_keys``), which
    are gathered and added back through strided views instead of index kernels. Eager only: a plan's local part
    and its gathered columns."""

    @staticmethod
    def forward(ctx, q, k, v, kv_index, kv_stride, m: MaskArgs, m2: MaskArgs, band2, scale: float, softcap, slopes):
        n = kv_index.numel()
        if kv_stride is None:
            k2, v2 = k.index_select(1, kv_index), v.index_select(1, kv_index)
        else:
            k2, v2 = (_periodic_keys(t, kv_stride, n).reshape(t.shape[0], n, *t.shape[2:]) for t in (k, v))
        out, lse = launch.forward(q, k, v, m, scale, softcap, slopes, second=(k2, v2, m2, *band2))
        ctx.save_for_backward(q, k, v, k2, v2, kv_index, out, lse)
        ctx.launch_args = (m, m2, band2, scale, softcap, slopes, kv_stride)
        return out, lse

    @staticmethod
    @first_order
    def backward(ctx, dout, dlse):
        q, k, v, k2, v2, kv_index, out, lse = ctx.saved_tensors
        m, m2, band2, scale, softcap, slopes, kv_stride = ctx.launch_args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dk2, dv2 = launch.backward_two_sources(dout, q, k, v, m, k2, v2, m2, out, lse, dlse, scale,
                                                           softcap, slopes, band2)
        for grad, grad2 in ((dk, dk2), (dv, dv2)):
            if kv_stride is None:
                grad.index_add_(1, kv_index, grad2)
            else:
                rows = _periodic_keys(grad, kv_stride, kv_index.numel())
                rows.add_(grad2.reshape(rows.shape))
        return dq, dk, dv, None, None, None, None, None, None, None, None


class GivenForward(torch.autograd.Function):
    """An output and LSE that another route computed (a plan's components merged by LSE), differentiated by one
    backward launch over the whole pattern ``m``: the gradients depend only on the pairs kept, O, LSE and dO
    (through D = rowsum(dO * O)), not on how the forward was split."""

    @staticmethod
    def forward(ctx, q, k, v, forward, m: MaskArgs, scale: float, softcap, slopes, deterministic: bool):
        out, lse = forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.launch_args = (m, scale, softcap, slopes, deterministic, None)
        return out, lse

    @staticmethod
    @first_order
    def backward(ctx, dout, dlse):
        return (*_saved_backward(ctx, dout, dlse), None, None, None, None, None, None)


def run(q, k, v, m: MaskArgs, scale: float, softcap, slopes, deterministic: bool,
        m_backward: MaskArgs | None = None, dropout=None, into=None):
    """Call the forward with a MaskArgs bundle; returns ``(out, lse)``. ``m_backward``: the same pattern at
    another block size, for the backward (the custom op carries its tensors to its backward too).
    ``dropout``: ``(p, rng)`` (``subquad.ops.softmax.dropout.new_rng``) or None. LSH's hash rounds (``m.lsh``)
    take the Function in any case: the custom op does not carry them. ``into``: ``(out, lse)`` over other pairs
    of these rows, which the launch goes on from in place (``launch.forward``); not differentiable."""
    if dropout is not None and dropout[0] == 0:
        dropout = None
    if into is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("into: a forward that goes on from an earlier result in place is not differentiable; "
                             "call it under torch.no_grad() (or differentiate the whole pattern: "
                             "flash_attention_given_forward)")
        return launch.forward(q, k, v, m, float(scale), softcap or None, slopes, dropout=dropout, into=into)
    if m.lsh is not None or not torch.compiler.is_compiling() and type(q) is torch.Tensor:
        return _Flash.apply(q, k, v, m, float(scale), softcap or None, slopes, bool(deterministic), m_backward,
                            dropout)
    backward = m_backward is not None and m_backward is not m
    return flash_fwd(q, k, v, *_block_tensors(m), *_block_tensors(m_backward if backward else None), m.doc_ids,
                     m.q_pos, m.kv_pos, m.flags, m.layout, slopes, None if dropout is None else dropout[1],
                     float(scale), float(softcap or 0.0),
                     int(m.band_lo), int(m.band_hi), int(m.prefix), int(m.q_prefix), int(m.layout_block),
                     bool(m.and_causal), int(m.mbq), int(m.mbk), int(m_backward.mbq) if backward else 0,
                     int(m_backward.mbk) if backward else 0, bool(m.use_list), bool(deterministic),
                     0.0 if dropout is None else float(dropout[0]))

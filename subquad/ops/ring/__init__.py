"""Ring attention (context parallelism) for exact softmax attention over ``torch.distributed``.

Each rank of a process group holds one shard of one long sequence: its queries and its keys/values. The K/V
shards travel once around the ring while every rank attends its queries to each visiting shard (``passes``),
so no rank ever holds more than two K/V shards, and the result equals attention over the whole sequence.
``layout`` says which tokens each rank holds (zig-zag by default, which balances causal work) and which
blocks a causal mask keeps; ``comm`` moves the shards. The decayed linear family needs no ring: ``state_passing``
combines the shards' final states (``sharded_gla``, ``sharded_retention``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..._checks import check_backend, check_qkv, check_scale_softcap, softcap_or_none
from ..softmax import BACKENDS as ATTENTION_BACKENDS
from .checks import check_across_ranks, ring_of
from .layout import zigzag_shard, zigzag_unshard
from .passes import ring_backward, ring_forward
from .state_passing import sharded_gla, sharded_retention

#: every exact-attention backend that returns the LSE the shards are merged by (cuDNN's does not)
BACKENDS = tuple(b for b in ATTENTION_BACKENDS if b != "cudnn")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, zigzag, scale, softcap, backend):
        options = dict(causal=causal, zigzag=zigzag, scale=scale, softcap=softcap, backend=backend)
        out, lse = ring_forward(ring, q, k, v, **options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.options = ring, options
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(ctx.ring, q, k, v, out, lse, dout, dlse, **ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


def _check_local(q, k, v, causal, zigzag, scale, softcap, backend, return_lse) -> None:
    check_backend(backend, BACKENDS)
    check_qkv(q, k, v)
    for name, flag in (("causal", causal), ("zigzag", zigzag), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a bool, got {flag!r}")
    check_scale_softcap(scale, softcap)
    n = q.shape[1]
    if k.shape[1] != n:
        raise ValueError(f"k: expected this rank's shard of q's sequence, (batch, {n}, heads_kv, head_dim), got "
                         f"{tuple(k.shape)}")
    if causal and zigzag and n % 2:
        raise ValueError(f"q: expected an even shard length with causal=True and zigzag=True (two chunks of equal "
                         f"length, see zigzag_shard), got shape {tuple(q.shape)}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                   scale: float | None = None, softcap: float | None = None, zigzag: bool = True,
                   backend: str = "auto", return_lse: bool = False):
    """Exact attention over one sequence sharded across the ranks of ``group``, differentiable.

    Every rank calls it with its shard; the result is its rows of ``subquad.attention`` over the whole
    sequence. K/V shards pass around the ring by P2P, each transfer overlapping a block's attention.

    Args:
        q: ``(batch, seq_local, heads_q, head_dim)``, this rank's queries; k, v:
            ``(batch, seq_local, heads_kv, head_dim[_v])``, its keys and values, ``heads_q`` a multiple of
            ``heads_kv`` (GQA/MQA). Every rank's shards have the same shape.
        group: the process group whose ranks hold the shards (None: the default group).
        causal: causal masking on the positions in the whole sequence (which ``zigzag`` decides).
        scale: defaults to ``head_dim ** -0.5``.
        softcap: ``softcap * tanh(s / softcap)`` on the scaled scores (0 or None: none).
        zigzag: the shards' layout: True, rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r`` of
            ``2 * world`` equal chunks (``zigzag_shard``; balanced causal work; an even ``seq_local`` when
            causal); False, rank ``r`` holds the ``r``-th of ``world`` contiguous chunks. Without ``causal``
            it changes nothing.
        backend: as ``subquad.attention``'s, for every block (``"cudnn"`` returns no LSE to merge by).
        return_lse: also return the LSE over the whole sequence, ``(batch, heads_q, seq_local)`` fp32.

    Returns:
        out ``(batch, seq_local, heads_q, head_dim_v)`` (and lse). ``zigzag_unshard`` of every rank's output
        is the whole sequence's.
    """
    ring = ring_of(group)
    softcap = softcap_or_none(softcap)
    problem = None
    try:
        _check_local(q, k, v, causal, zigzag, scale, softcap, backend, return_lse)
    except ValueError as error:
        problem = error
    check_across_ranks(ring, problem, dict(causal=causal, scale=scale, softcap=softcap, zigzag=zigzag), q=q, k=k,
                       v=v)
    out, lse = _RingAttention.apply(q, k, v, ring, causal, zigzag, scale, softcap, backend)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "sharded_gla", "sharded_retention", "zigzag_shard", "zigzag_unshard", "BACKENDS"]

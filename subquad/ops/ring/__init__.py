"""Ring attention (context parallelism) for exact softmax attention over ``torch.distributed``.

Each rank of a process group holds one shard of one long sequence: its queries and its keys/values. The K/V
shards travel once around the ring while every rank attends its queries to each visiting shard (``passes``),
so no rank ever holds more than two K/V shards, and the result equals attention over the whole sequence.
``layout`` says which tokens each rank holds (zig-zag by default, which balances causal work) and which
blocks a causal mask keeps; ``comm`` moves the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..._checks import check_backend, check_qkv, check_scale_softcap, softcap_or_none
from ..softmax import BACKENDS as ATTENTION_BACKENDS
from .comm import Ring
from .layout import zigzag_shard, zigzag_unshard
from .passes import ring_backward, ring_forward

#: every exact-attention backend that returns the LSE the shards are merged by (cuDNN's does not)
BACKENDS = tuple(b for b in ATTENTION_BACKENDS if b != "cudnn")
#: the dtypes whose shards can meet on one ring, numbered for the ranks' comparison of their inputs
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


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


def _ring_of(group) -> Ring:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group first), got none")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("group: expected a process group that this rank belongs to")
    return Ring(group)


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


def _input_facts(problem, q, k, v) -> list[int]:
    """What the ranks compare before the ring runs: whether this rank's checks failed, the shapes and dtype."""
    shapes = [list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [0] * 4 for t in (q, k, v)]
    return [int(problem is not None), _DTYPE_CODES.get(getattr(q, "dtype", None), 0)] + sum(shapes, [])


def _check_across_ranks(ring: Ring, problem: ValueError | None, q, k, v) -> None:
    """Every rank raises when any rank's input is wrong (a rank that went on alone would wait forever), and
    the shards must be alike: equal lengths (the layout's chunks), heads, head_dims and dtype."""
    facts = torch.tensor(_input_facts(problem, q, k, v), dtype=torch.int64,
                         device=q.device if isinstance(q, torch.Tensor) else "cpu")
    gathered = [torch.empty_like(facts) for _ in range(ring.world)]
    dist.all_gather(gathered, facts, group=ring.group)
    if problem is not None:
        raise problem
    gathered = [g.tolist() for g in gathered]
    for rank, other in enumerate(gathered):
        if other[0]:
            raise ValueError(f"q, k, v: rank {rank} of the group was given input it rejects (its ValueError says "
                             f"why)")
    for rank, other in enumerate(gathered):
        for name, at in (("q", 2), ("k", 6), ("v", 10)):
            if other[at:at + 4] != gathered[ring.rank][at:at + 4]:
                raise ValueError(f"{name}: expected the same shape on every rank (equal shards of one sequence), "
                                 f"got {tuple(gathered[ring.rank][at:at + 4])} on rank {ring.rank} and "
                                 f"{tuple(other[at:at + 4])} on rank {rank}")
        if other[1] != gathered[ring.rank][1]:
            raise ValueError(f"q: expected one dtype on every rank, got {q.dtype} on rank {ring.rank} and another "
                             f"on rank {rank}")


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
    ring = _ring_of(group)
    softcap = softcap_or_none(softcap)
    problem = None
    try:
        _check_local(q, k, v, causal, zigzag, scale, softcap, backend, return_lse)
    except ValueError as error:
        problem = error
    _check_across_ranks(ring, problem, q, k, v)
    out, lse = _RingAttention.apply(q, k, v, ring, causal, zigzag, scale, softcap, backend)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "BACKENDS"]

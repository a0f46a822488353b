"""Context parallelism for the decayed linear family (linear attention, RetNet, GLA, Mamba-2 SSD) by state passing.

Rank ``r`` holds the ``r``-th contiguous shard of one sequence. The recurrence ``S_t = diag(exp(g_t)) S_{t-1} +
k_t^T v_t`` is affine in the state, so the state entering shard ``r`` is a combination of the earlier shards' own
final states ``S_j`` (each from a zero state), decayed through the shards between by their total decays ``D_i``
(the exp of their summed log decay, per head or per key dimension):

    S_in(r) = sum_{j < r} (prod_{j < i < r} D_i) * S_j

and the output is the local one from a zero state plus what the entering state adds, ``scale * (q_t *
exp(G_t)) S_in(r)`` with ``G_t`` the log decay from the shard's start through token ``t``. So each rank runs the
chunked engine once on its shard, the ranks all-gather their ``(S_j, log D_j)`` (one state each, whatever the
sequence length), and each combines what it needs. The gather is differentiable, so autograd carries the
gradients of the entering states back to the ranks whose shards made them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..linear import gla, retention_log_decay
from ..linear.checks import check_qkv_same_heads, check_scale, check_state, expand_log_decay
from .checks import check_across_ranks, ring_of
from .comm import Ring


class _AllGather(torch.autograd.Function):
    """Every rank's ``t``; the backward sums the ranks' gradients of the gathered tensors and keeps this rank's.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward scatters from each group rank named as
    a global rank, which fails in any group but the default group's first ranks (e.g. ranks 1 and 3 of four)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, ring: Ring):
        ctx.ring = ring
        gathered = [torch.empty_like(t) for _ in range(ring.world)]
        dist.all_gather(gathered, t.contiguous(), group=ring.group)
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads):
        summed = torch.stack(grads)
        dist.all_reduce(summed, group=ctx.ring.group)
        return summed[ctx.ring.rank], None


def _state_before(shard: int, states: tuple[torch.Tensor, ...], log_decays: tuple[torch.Tensor, ...]):
    """The state entering ``shard`` from the shards before it: ``sum_{j < shard} exp(sum_{j < i < shard}
    log_decays[i]) * states[j]`` (``shard`` = the number of shards: the state after the last)."""
    states, log_decays = torch.stack(states), torch.stack(log_decays)
    before = (torch.arange(len(states), device=states.device) < shard).view(-1, *[1] * (states.dim() - 1))
    passed = torch.where(before, log_decays, 0)
    # the decay from the end of shard j to the start of `shard` as a sum over the shards between (a suffix sum,
    # not a difference of prefix sums, which would cancel digits in fp32)
    through = passed.flip(0).cumsum(0).flip(0)
    through = torch.cat([through[1:], torch.zeros_like(through[:1])])
    # Every gathered state gets a weight, 0 for this shard and those after it: so each rank's output depends on the
    # whole gather, and every rank runs its backward, a collective (rank 0's output would otherwise not reach it).
    weights = torch.where(before, through.exp(), 0)
    return (weights * states).sum(0)


def _check_local(q, k, v, initial_state, output_state) -> None:
    check_qkv_same_heads(q, k, v)
    b, _, h, dk = q.shape
    check_state(initial_state, "initial_state", b, h, dk, v.shape[-1], q.device)
    if not isinstance(output_state, bool):
        raise ValueError(f"output_state: expected a bool, got {output_state!r}")


def _state_passing(group, q, k, v, log_decay_of: Callable[[], torch.Tensor | None], *, scale, initial_state,
                   output_state, chunk_size, backend):
    """``sharded_gla`` with its log decay made by ``log_decay_of`` inside the checks, so that a bad argument
    behind it raises on every rank too."""
    ring = ring_of(group)
    problem = log_decay = None
    try:
        _check_local(q, k, v, initial_state, output_state)
        log_decay = log_decay_of()
        # gla checks the rest (log_decay, scale, chunk_size, backend) as it runs
        out, own_state = gla(q, k, v, log_decay, scale=scale, output_state=True, chunk_size=chunk_size,
                             backend=backend)
    except ValueError as error:
        problem = error
    check_across_ranks(ring, problem, dict(scale=scale, output_state=output_state), q=q, k=k, v=v,
                       log_decay=log_decay, initial_state=initial_state)
    acc = own_state.dtype
    bsz, _, heads, _ = q.shape
    g = expand_log_decay(log_decay, q)
    # the log decay from the shard's start through each token, and through the whole shard, (B, H, 1 or K, 1)
    through = None if g is None else g.to(acc).cumsum(1)
    log_total = q.new_zeros(bsz, heads, 1, 1, dtype=acc) if through is None else through[:, -1].unsqueeze(-1)
    # the whole sequence's initial state enters at rank 0, which holds its first token
    first = initial_state.to(acc) if ring.rank == 0 and initial_state is not None else None
    if first is not None:
        own_state = own_state + log_total.exp() * first
    elif initial_state is not None and initial_state.requires_grad and torch.is_grad_enabled() \
            and not own_state.requires_grad:
        # this rank's copy enters nowhere, but its output must want a gradient when rank 0's does, so that it
        # joins the backward's collective (with q, k, v and the decay frozen it would not: rank 0 waited there)
        own_state = own_state + 0 * initial_state.to(acc)
    states, log_totals = _AllGather.apply(own_state, ring), _AllGather.apply(log_total, ring)
    entering = _state_before(ring.rank, states, log_totals)
    if first is not None:
        entering = entering + first
    q_decayed = q.to(acc) if through is None else q.to(acc) * through.exp()
    added = check_scale(scale, q.shape[-1]) * torch.einsum("bthk,bhkv->bthv", q_decayed, entering)
    out = (out.to(acc) + added).to(out.dtype)
    if not output_state:
        return out
    return out, _state_before(ring.world, states, log_totals)


def sharded_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                group=None, *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_state: bool = False, chunk_size: int = 64, backend: str = "auto"):
    """``subquad.gla`` over one sequence cut into contiguous shards across the ranks of ``group``, differentiable.

    Every rank calls it with its shard; rank ``r`` holds the ``r``-th of equal contiguous chunks of the sequence,
    and gets its rows of ``gla`` over the whole sequence. The cost is one local ``gla`` pass, one all-gather of a
    state ``(B, H, K, V)`` per rank (the states are combined on each rank: world x state memory), and one
    ``(T, K) x (K, V)`` product per head for what the entering state adds. The backward is a collective too:
    every rank must backpropagate through its output (or its final state), as in any context-parallel step.
    Plain causal linear attention without normalisation is ``sharded_gla(phi(q), phi(k), v)``; Mamba-2 SSD is
    ``sharded_gla(C, B, x * dt, dt * A, scale=1)`` (B, C repeated to the heads).

    Args:
        q, k: ``(batch, seq_local, heads, K)``; v: ``(batch, seq_local, heads, V)``, this rank's shard. Every
            rank's shards have the same shape and dtype.
        log_decay: as ``gla``'s: None, ``(heads,)``, or this rank's shard ``(batch, seq_local, heads)`` or
            ``(batch, seq_local, heads, K)``; the same form on every rank.
        group: the process group whose ranks hold the shards (None: the default group).
        initial_state: ``(batch, heads, K, V)``, the state before the whole sequence's first token: rank 0's is
            used (it holds that token) and gets the gradient; the other ranks pass one of the same shape, not read,
            or every rank passes None.
        output_state: also return the whole sequence's final state ``(batch, heads, K, V)`` fp32 (fp64 for fp64
            inputs), the same on every rank and differentiable on each (a loss that adds it on every rank counts
            it once per rank).
        scale, chunk_size, backend: as ``gla``'s, for the local pass.
    Returns:
        out ``(batch, seq_local, heads, V)`` (and the final state); ``torch.cat`` of every rank's out along dim 1 is
        the whole sequence's.
    """
    return _state_passing(group, q, k, v, lambda: log_decay, scale=scale, initial_state=initial_state,
                          output_state=output_state, chunk_size=chunk_size, backend=backend)


def sharded_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor | None = None,
                      group=None, *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                      output_state: bool = False, chunk_size: int = 64, backend: str = "auto"):
    """``subquad.retention`` over one sequence sharded across the ranks of ``group``: ``sharded_gla`` with the
    log decay ``log(gamma)`` per head (RetNet's decays when ``gamma`` is None)."""
    return _state_passing(group, q, k, v, lambda: retention_log_decay(q, gamma), scale=scale,
                          initial_state=initial_state, output_state=output_state, chunk_size=chunk_size,
                          backend=backend)


__all__ = ["sharded_gla", "sharded_retention"]

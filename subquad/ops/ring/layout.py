"""Which tokens of the sequence each rank holds, and which query rows see which keys at each ring step.

The sequence is cut into equal chunks. Contiguous: ``world`` chunks, rank ``r`` holds chunk ``r``. Zig-zag
(Megatron's and ring-flash-attn's causal balance): ``2 * world`` chunks, rank ``r`` holds chunks ``r`` and
``2 * world - 1 - r``, so that under a causal mask every rank has the same number of (query, key) pairs to
compute; contiguous shards give the last rank ``world`` times the work of the first.

A rank's chunks are in increasing order of position, so its local order is the original order restricted to
its tokens: causality between two shards is decided chunk by chunk on original positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def shard_chunks(rank: int, world: int, zigzag: bool) -> tuple[int, ...]:
    """The chunks (indices in the natural order) that ``rank`` holds, increasing."""
    return (rank, 2 * world - 1 - rank) if zigzag else (rank,)


def _is_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and -ndim <= dim < ndim


def _check_split(x: torch.Tensor, rank: int, world: int, dim: int) -> None:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world: expected a positive int, got {world!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an int in [0, {world}), got {rank!r}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not _is_dim(dim, x.dim()):
        raise ValueError(f"dim: expected a dimension of x, got {dim!r} for {tuple(x.shape)}")
    if x.shape[dim] % (2 * world):
        raise ValueError(f"x: expected a length along dim {dim} divisible by 2 * world = {2 * world} (zig-zag "
                         f"chunks of equal length), got shape {tuple(x.shape)}")


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """``rank``'s zig-zag shard of the whole sequence ``x``: its chunks ``rank`` and ``2 * world - 1 - rank`` of
    ``2 * world`` equal chunks along ``dim``, concatenated (the local q, k, v of ``ring_attention(zigzag=True)``)."""
    _check_split(x, rank, world, dim)
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[c] for c in shard_chunks(rank, world, True)], dim)


def zigzag_unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int = 1) -> torch.Tensor:
    """The whole sequence in its natural order from every rank's zig-zag shard, ``shards[r]`` from rank ``r``
    (e.g. from ``torch.distributed.all_gather``): the inverse of ``zigzag_shard``."""
    if not isinstance(shards, (list, tuple)) or not shards \
            or not all(isinstance(s, torch.Tensor) for s in shards):
        raise ValueError(f"shards: expected a non-empty list of tensors, one per rank, got {type(shards).__name__}")
    world = len(shards)
    shape = shards[0].shape
    if not _is_dim(dim, len(shape)):
        raise ValueError(f"dim: expected a dimension of the shards, got {dim!r} for {tuple(shape)}")
    if any(s.shape != shape for s in shards) or shape[dim] % 2:
        raise ValueError(f"shards: expected {world} tensors of one shape with an even length along dim {dim}, got "
                         f"shapes {[tuple(s.shape) for s in shards]}")
    halves = [s.chunk(2, dim) for s in shards]
    # chunk c < world is rank c's first half; chunk 2 * world - 1 - r is rank r's second half
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class BlockCall(NamedTuple):
    """One attention call of a ring step: local query rows ``[q_start, q_stop)`` against the visiting shard's
    first ``kv_stop`` keys, with a causal mask or none."""
    q_start: int
    q_stop: int
    kv_stop: int
    causal: bool


def block_calls(q_chunks: tuple[int, ...], kv_chunks: tuple[int, ...], shard_len: int,
                causal: bool) -> list[BlockCall]:
    """The calls that attend a shard holding ``q_chunks`` to a shard holding ``kv_chunks``, both
    ``shard_len`` tokens long (query rows that see no key of it get no call).

    A shard against itself is one causal call: its chunks are increasing, so local order is original order.
    Against another shard, a query chunk sees the key chunks before it in full and none after it; the key
    chunks being increasing, these are a prefix of the visiting shard. Neighbouring query chunks that see the
    same prefix share one call.
    """
    if not causal:
        return [BlockCall(0, shard_len, shard_len, False)]
    if q_chunks == kv_chunks:
        return [BlockCall(0, shard_len, shard_len, True)]
    chunk_len = shard_len // len(q_chunks)
    calls: list[BlockCall] = []
    for i, chunk in enumerate(q_chunks):
        seen = sum(c < chunk for c in kv_chunks) * chunk_len
        if not seen:
            continue
        if calls and calls[-1].q_stop == i * chunk_len and calls[-1].kv_stop == seen:
            calls[-1] = calls[-1]._replace(q_stop=(i + 1) * chunk_len)
        else:
            calls.append(BlockCall(i * chunk_len, (i + 1) * chunk_len, seen, False))
    return calls


__all__ = ["BlockCall", "block_calls", "shard_chunks", "zigzag_shard", "zigzag_unshard"]

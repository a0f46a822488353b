"""Angular LSH as Reformer hashes (Andoni et al. 2015; Kitaev et al. 2020): a vector's bucket in a round is the
argmax of ``[x R; -x R]`` for that round's random rotation ``R`` (``head_dim x n_buckets / 2``), so that vectors
at a small angle share a bucket with high probability. Each round then sorts the tokens by (bucket, position)
and cuts the sorted order into chunks; a query's keys are those of its chunk and of the chunk before.

Shared by the reference, the Triton path and the tests' oracle: the hashes are no part of what they compare.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def draw_rotations(heads: int, n_hashes: int, head_dim: int, n_buckets: int, device,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``(heads, n_hashes, head_dim, n_buckets // 2)`` fp32 standard normal rotations, one set per KV head and
    round (Hugging Face's Reformer draws one per head too), drawn on ``generator``'s device (PyTorch's default
    CPU generator when None: ``torch.manual_seed`` repeats them) and moved to ``device``, so that one seed
    hashes alike on every device. Drawn round by round: more rounds from one seed keep the first ones."""
    where = generator.device if generator is not None else "cpu"
    drawn = torch.randn(n_hashes, heads, head_dim, n_buckets // 2, generator=generator, device=where)
    return drawn.transpose(0, 1).to(device)


def buckets(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """``(B, H, n_hashes, N)`` int64 buckets of ``x`` ``(B, N, H, D)`` in fp32 (not differentiated): head ``h``
    uses the rotations of KV head ``h // (H / heads_kv)``. One bucket (``n_buckets == 1``) needs no rotation."""
    bsz, seq, heads, _ = x.shape
    n_hashes = rotations.shape[1]
    if n_buckets == 1:
        return torch.zeros(bsz, heads, n_hashes, seq, dtype=torch.long, device=x.device)
    per_head = rotations.repeat_interleave(heads // rotations.shape[0], dim=0)
    rotated = torch.einsum("bnhd,hrdk->bhrnk", x.detach().float(), per_head)
    return _argmax_with_negation(rotated)


def _argmax_with_negation(rotated: torch.Tensor) -> torch.Tensor:
    """``torch.cat([rotated, -rotated], -1).argmax(-1)`` without the concatenation: the largest entry if it is at
    least the negated smallest (the first half wins ties, as the first index does), else the smallest's index in
    the second half. Each reduction returns its first extreme index, as argmax does, so the buckets are the same
    to the last tie; the concatenated copy and its negation were 3x the rotations' size in writes and reads (at
    2 x 16k tokens, 16 heads, 4 rounds of 64 buckets: 1.6 GB less traffic per hashed tensor)."""
    top, top_index = rotated.max(-1)
    bottom, bottom_index = rotated.min(-1)
    return torch.where(top < -bottom, bottom_index + rotated.shape[-1], top_index)


class SortedRounds(NamedTuple):
    """Each round's sort of the tokens, per (batch, head, round): ``order[..., i]`` the position at sorted index
    ``i``, ``rank[..., p]`` the sorted index of position ``p`` (``(B, H, n_hashes, N)`` int64). Its chunk is
    ``rank // chunk``."""
    order: torch.Tensor
    rank: torch.Tensor


def sort_rounds(bucket: torch.Tensor) -> SortedRounds:
    """Tokens sorted by (bucket, position) in each round of ``bucket`` ``(B, H, n_hashes, N)``."""
    seq = bucket.shape[-1]
    position = torch.arange(seq, device=bucket.device)
    order = torch.argsort(bucket * seq + position, dim=-1)
    rank = torch.empty_like(order).scatter_(-1, order, position.expand_as(order))
    return SortedRounds(order, rank)


def length_normalized(k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Shared-QK keys: ``k / rms(k)`` (trax's ``length_normalized``), in ``k``'s dtype, differentiable. At the
    default scale ``head_dim ** -0.5`` a score is then Reformer's ``q . k / |k|``."""
    kf = k.float()
    return (kf * torch.rsqrt(kf.square().mean(-1, keepdim=True) + eps)).to(k.dtype)

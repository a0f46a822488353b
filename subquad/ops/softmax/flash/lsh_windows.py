"""What the flash kernels' ``LSH`` term reads of Reformer's hash rounds (built by ``subquad.ops.lsh.flash``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LshWindows:
    """Reformer's hash rounds as the kernels' ``LSH`` term reads them (``tile.keep_mask``, built by
    ``subquad.ops.lsh.flash``): the batch elements are (sequence, head, round) triples, the round fastest, each
    sorted by bucket its own way, of ``rounds``; ``q_chunk`` / ``k_chunk`` ``(batch, rounds - 1, seq)`` int32
    give, at each sorted index of the element's round, that token's chunk in each earlier round (queries' and
    keys' sorts; ``q_chunk`` holds -2 in the rows of rounds not before the element's, which then find no pair);
    ``chunk`` tokens a chunk; ``not_self`` drops the self pair (shared QK). Eager launches only: the custom op
    does not carry it."""

    q_chunk: torch.Tensor
    k_chunk: torch.Tensor
    rounds: int
    chunk: int
    not_self: bool

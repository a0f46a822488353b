"""Synthetic recall tasks: multi-query associative recall (MQAR, Arora et al., 2023) and needle in a haystack.

Both test what a fixed-size state must do and softmax attention does for free: store key -> value pairs and
retrieve one on request. Each function returns ``(ids, targets)``: ``targets`` is -100 except where the model
must recall (cross-entropy's ``ignore_index``).
"""

from __future__ import annotations

import torch

IGNORE = -100


def mqar(batch: int, num_pairs: int, seq_len: int, vocab_size: int, generator: torch.Generator | None = None):
    """Keys and values from disjoint halves of the vocabulary: ``k1 v1 k2 v2 ... | ... k_i ? ...``.

    The first ``2 * num_pairs`` tokens list the pairs; after them, each key appears once more at a random
    position of the remaining ``seq_len - 2 * num_pairs`` tokens (the rest are 0), and the target at that
    position is its value.
    """
    query_len = seq_len - 2 * num_pairs
    if num_pairs <= 0 or query_len < num_pairs or vocab_size < 2 * num_pairs + 2:
        raise ValueError(f"num_pairs: expected 0 < num_pairs <= (seq_len - 2 num_pairs) and vocab_size >= "
                         f"2 num_pairs + 2, got num_pairs={num_pairs}, seq_len={seq_len}, vocab_size={vocab_size}")
    half = vocab_size // 2
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:num_pairs] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    ids[:, 0:2 * num_pairs:2], ids[:, 1:2 * num_pairs:2] = keys, values
    targets = torch.full_like(ids, IGNORE)
    for b in range(batch):
        slots = torch.randperm(query_len, generator=generator)[:num_pairs] + 2 * num_pairs
        ids[b, slots] = keys[b]
        targets[b, slots] = values[b]
    return ids, targets


def needle(batch: int, seq_len: int, vocab_size: int, depth: float | None = None,
           generator: torch.Generator | None = None):
    """A random haystack with ``[marker, value]`` hidden at relative ``depth`` (random if None) among its first
    ``seq_len - 2`` tokens, one haystack token between it and the end; the last token is the marker again and its
    target is ``value``. Token 1 is the marker, 0 never appears."""
    if seq_len < 6 or vocab_size < 4:
        raise ValueError(f"seq_len, vocab_size: expected >= 6 and >= 4, got {seq_len}, {vocab_size}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth: expected a fraction in [0, 1] or None, got {depth!r}")
    ids = torch.randint(2, vocab_size, (batch, seq_len), generator=generator)
    values = torch.randint(2, vocab_size, (batch,), generator=generator)
    if depth is None:
        pos = torch.randint(0, seq_len - 3, (batch,), generator=generator)
    else:
        pos = torch.full((batch,), int(depth * (seq_len - 4)))
    rows = torch.arange(batch)
    ids[rows, pos], ids[rows, pos + 1] = 1, values
    ids[:, -1] = 1
    targets = torch.full_like(ids, IGNORE)
    targets[:, -1] = values
    return ids, targets

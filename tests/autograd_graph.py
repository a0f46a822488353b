"""What a backward pass will do, read from the autograd graph before running it."""

from __future__ import annotations

import torch


def slices_of_length(out: torch.Tensor, length: int) -> int:
    """How many backward nodes take a strict slice of a tensor ``length`` long along the sliced dim. Each such
    node fills a zero gradient as long as the whole tensor: one per block makes the backward O(N^2 / block)."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "SliceBackward0":
            size = node._saved_self_sym_sizes[node._saved_dim]
            start, end = node._saved_start or 0, min(node._saved_end, size)
            count += size == length and end - start < size
        stack.extend(fn for fn, _ in node.next_functions)
    return count

"""What a cache hands to attention after an update: the stored K/V, their layout, and per-sequence lengths.

A ``KVView`` is a description, not a copy: ``k``/``v`` are the cache's own storage. The decode kernel reads
the storage in place (ring slots, pages); ``dense()`` gathers a contiguous, position-ordered copy for code that
wants plain ``(batch, seq, heads, dim)`` tensors (prefill through ``subquad.attention``, the references).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("dense", "ring", "paged")


@dataclass
class KVView:
    """K/V to attend over, as stored.

    Attributes:
        k, v: storage. ``dense``: ``(B, S, H_kv, D)``, token ``j`` of sequence ``b`` at index ``j``.
            ``ring``: ``(B, slots, H_kv, D)``, absolute position ``p`` in slot ``p % slots``.
            ``paged``: pools ``(num_pages, page_size, H_kv, D)``, position ``p`` of sequence ``b`` in page
            ``block_table[b, p // page_size]`` at offset ``p % page_size``.
        seqlens: ``(B,)`` int32, tokens of each sequence so far, the new ones included. The ``T`` query
            tokens of a decode step sit at positions ``seqlens - T ... seqlens - 1``.
        layout: one of ``"dense" | "ring" | "paged"``.
        block_table: ``(B, max_pages)`` int32 for ``paged``.
        window: the sliding window the cache was built for (ring caches keep only what it needs), or None.
        max_seqlen: ``max(seqlens)`` known on the host (caches track it), to size the decode kernel's grid
            to the keys there are; None: the storage's length bounds it (never read back from the device).
        kept: ``(B,)`` int32, the tokens each sequence still has in storage where that is not
            ``kept_lengths``'s default (a ring after rejected draft tokens were rewound: their slots hold no
            older token any more), or None.
    """

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    layout: str = "dense"
    block_table: torch.Tensor | None = None
    window: int | None = None
    max_seqlen: int | None = None
    kept: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        """The most tokens a sequence can have in storage."""
        if self.layout == "paged":
            return self.block_table.shape[1] * self.k.shape[1]
        return self.k.shape[1]

    def kept_lengths(self) -> torch.Tensor:
        """Tokens each sequence still has in storage (``min(seqlens, slots)`` for a ring)."""
        if self.kept is not None:
            return self.kept
        if self.layout == "ring":
            return self.seqlens.clamp(max=self.k.shape[1])
        return self.seqlens

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather ``(k, v, lengths)``: ``k[b, j]`` is the ``j``-th kept token of sequence ``b`` in position
        order (absolute position ``seqlens[b] - lengths[b] + j``), valid for ``j < lengths[b]``; the rest
        of the padded length is zeros for the ring and paged layouts, and whatever the storage holds there for
        the dense one (free: a slice of it). Traced (``torch.compile``), the padded length is the storage's
        (the lengths are not read back)."""
        lengths = self.kept_lengths()
        if torch.compiler.is_compiling():
            n = self.capacity
        else:
            n = int(lengths.max()) if lengths.numel() else 0
        if self.layout == "dense":
            return self.k[:, :n], self.v[:, :n], lengths
        j = torch.arange(n, device=self.k.device).view(1, -1)
        valid = j < lengths.view(-1, 1).long()
        pos = (self.seqlens.view(-1, 1).long() - lengths.view(-1, 1).long() + j).clamp(min=0)
        if self.layout == "ring":
            rows = pos % self.k.shape[1]
            bidx = torch.arange(self.batch, device=self.k.device).view(-1, 1).expand_as(rows)
            k, v = self.k[bidx, rows], self.v[bidx, rows]
        else:
            page_size = self.k.shape[1]
            page = torch.gather(self.block_table.long(), 1, (pos // page_size).clamp(max=self.block_table.shape[1] - 1))
            k, v = self.k[page, pos % page_size], self.v[page, pos % page_size]
        zero = ~valid.view(*valid.shape, 1, 1)
        return k.masked_fill(zero, 0), v.masked_fill(zero, 0), lengths

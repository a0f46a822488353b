"""Paged KV cache (vLLM): one pool of fixed-size pages shared by all sequences, and a block table per sequence.

Sequences of very different lengths share memory without each reserving ``max_len``: a sequence holds
``ceil(len / page_size)`` pages, taken from a free list as it grows and given back by ``free``. Position ``p``
of sequence ``b`` lives in page ``block_table[b, p // page_size]`` at offset ``p % page_size``.
"""

from __future__ import annotations

import torch

from .base import KVCache, check_sizes, write_pages
from .view import KVView


class PagedKVCache(KVCache):
    """Pools ``(num_pages, page_size, heads_kv, head_dim)`` for K and V, a block table ``(batch, max_pages)``.

    Args:
        num_pages, page_size: the pool. ``batch`` sequences (slots of the block table) draw from it.
        max_pages_per_seq: block-table width (default ``num_pages``): the longest sequence is
            ``max_pages_per_seq * page_size`` tokens.
    """

    def __init__(self, num_pages: int, page_size: int, heads_kv: int, head_dim: int, dtype=torch.bfloat16,
                 device=None, batch: int = 1, max_pages_per_seq: int | None = None, head_dim_v: int | None = None):
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        check_sizes(num_pages=num_pages, page_size=page_size, heads_kv=heads_kv, head_dim=head_dim, batch=batch,
                    max_pages_per_seq=max_pages_per_seq, head_dim_v=head_dim_v)
        self.num_pages, self.page_size, self.heads_kv, self.head_dim = num_pages, page_size, heads_kv, head_dim
        self.batch, self.max_pages_per_seq = batch, max_pages_per_seq
        self.head_dim_v = head_dim_v
        self.k = torch.zeros(num_pages, page_size, heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_pages, page_size, heads_kv, self.head_dim_v, dtype=dtype, device=device)
        self.block_table = torch.zeros(batch, max_pages_per_seq, dtype=torch.int32, device=self.k.device)
        self._init_lengths(batch, self.k.device)
        self._pin_addresses()
        self._free = list(range(num_pages))
        self._pages: list[list[int]] = [[] for _ in range(batch)]

    def buffers(self):
        return [self.k, self.v, self.block_table]

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def free(self, seq: int) -> None:
        """Give sequence ``seq``'s pages back to the pool and set its length to 0 (continuous batching)."""
        if not isinstance(seq, int) or not 0 <= seq < self.batch:
            raise ValueError(f"seq: expected an int in [0, {self.batch}), got {seq!r}")
        self._free.extend(reversed(self._pages[seq]))
        self._pages[seq] = []
        lengths = list(self._lengths)
        lengths[seq] = 0
        self._set_lengths(lengths)

    def reset(self) -> None:
        for b in range(self.batch):
            self.free(b)

    def _grow(self, lengths: list[int], name: str = "k") -> None:
        """Give each sequence the pages ``lengths`` needs; all or nothing (a failed update changes nothing)."""
        need = [-(-n // self.page_size) for n in lengths]
        for seq, n in enumerate(need):
            if n > self.max_pages_per_seq:
                raise ValueError(f"{name}: sequence {seq} would need {n} pages, more than max_pages_per_seq="
                                 f"{self.max_pages_per_seq}")
        more = sum(max(0, n - len(p)) for n, p in zip(need, self._pages))
        if more > len(self._free):
            raise ValueError(f"{name}: the pool is out of pages ({self.num_pages} of {self.page_size} tokens; "
                             f"{len(self._free)} free, this update needs {more})")
        for seq, n in enumerate(need):
            first = len(self._pages[seq])
            while len(self._pages[seq]) < n:
                self._pages[seq].append(self._free.pop())
            if n > first:
                self.block_table[seq, first:n] = torch.tensor(self._pages[seq][first:n], dtype=torch.int32)

    def reserve(self, tokens) -> None:
        """Give each sequence the pages for ``tokens`` tokens (an int, or one per sequence) now, on the host:
        a traced update (a compiled decoding step) writes through the block table and cannot take pages."""
        lengths = [tokens] * self.batch if isinstance(tokens, int) else list(tokens)
        if len(lengths) != self.batch or not all(isinstance(n, int) and n >= 0 for n in lengths):
            raise ValueError(f"tokens: expected an int >= 0 or {self.batch} of them, got {tokens!r}")
        self._grow([max(n, m) for n, m in zip(lengths, self._lengths)], "tokens")

    def update(self, k: torch.Tensor, v: torch.Tensor, positions=None) -> KVView:
        """Write ``k``/``v`` ``(batch, T, heads_kv, head_dim)`` at positions ``positions ... positions+T-1``
        (default: append), taking pages from the pool as needed. Traced (``torch.compile``): the pages must
        have been reserved (``reserve``); unchecked."""
        if torch.compiler.is_compiling():
            self._check_shapes(k, v, self.k.device)
            rows = self._traced_rows(k.shape[1], positions)
            write_pages(self.k, self.block_table, rows, k.to(self.k.dtype))
            write_pages(self.v, self.block_table, rows, v.to(self.v.dtype))
            return self.view()
        starts = self._check_update(k, v, positions, self.k.device)
        t = k.shape[1]
        self._grow([s + t for s in starts])
        dev = self.k.device
        pos = torch.tensor(starts, device=dev).view(-1, 1) + torch.arange(t, device=dev)
        write_pages(self.k, self.block_table, pos, k.to(self.k.dtype))
        write_pages(self.v, self.block_table, pos, v.to(self.v.dtype))
        self._set_lengths([s + t for s in starts])
        return self.view()

    def view(self) -> KVView:
        traced = torch.compiler.is_compiling()
        return KVView(self.k, self.v, self.seqlens, "paged", block_table=self.block_table,
                      max_seqlen=None if traced else max(self._lengths))

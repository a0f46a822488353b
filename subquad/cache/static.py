"""Static KV cache: K/V preallocated for ``max_len`` tokens per sequence, each sequence with its own length."""

from __future__ import annotations

import torch

from .base import KVCache, check_sizes, write_rows
from .view import KVView


class StaticKVCache(KVCache):
    """``(batch, max_len, heads_kv, head_dim)`` K and V; ``update`` appends at each sequence's own length.

    Memory is O(batch * max_len) whatever is used. The view is the storage itself (dense layout): token ``j``
    of sequence ``b`` at index ``j``.
    """

    def __init__(self, batch: int, max_len: int, heads_kv: int, head_dim: int, dtype=torch.bfloat16,
                 device=None, head_dim_v: int | None = None):
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        check_sizes(batch=batch, max_len=max_len, heads_kv=heads_kv, head_dim=head_dim, head_dim_v=head_dim_v)
        self.batch, self.max_len, self.heads_kv, self.head_dim = batch, max_len, heads_kv, head_dim
        self.head_dim_v = head_dim_v
        self.k = torch.zeros(batch, max_len, heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, max_len, heads_kv, self.head_dim_v, dtype=dtype, device=device)
        self._init_lengths(batch, self.k.device)
        self._pin_addresses()

    def buffers(self):
        return [self.k, self.v]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions=None) -> KVView:
        """Write ``k``/``v`` ``(batch, T, heads_kv, head_dim)`` at positions ``positions ... positions+T-1``
        (default: append); return the view of everything stored. Traced (``torch.compile``), unchecked
        against ``max_len``: a write past it is an index error."""
        if torch.compiler.is_compiling():
            self._check_shapes(k, v, self.k.device)
            rows = self._traced_rows(k.shape[1], positions)
            write_rows(self.k, rows, 0, k.to(self.k.dtype))
            write_rows(self.v, rows, 0, v.to(self.v.dtype))
            return self.view()
        starts = self._check_update(k, v, positions, self.k.device)
        t = k.shape[1]
        if max(starts) + t > self.max_len:
            raise ValueError(f"k: {t} new tokens after {max(starts)} overflow max_len={self.max_len}")
        rows = self._start_rows(starts, t, self.k.device)
        write_rows(self.k, rows, starts[0], k.to(self.k.dtype))
        write_rows(self.v, rows, starts[0], v.to(self.v.dtype))
        self._set_lengths([s + t for s in starts])
        return self.view()

    def view(self) -> KVView:
        traced = torch.compiler.is_compiling()
        return KVView(self.k, self.v, self.seqlens, "dense", max_seqlen=None if traced else max(self._lengths))

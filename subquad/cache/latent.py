"""MLA latent cache (DeepSeek-V2): per token, the compressed ``c_kv`` (width ``kv_lora_rank``) and the decoupled
RoPE key (width ``rope_dim``, shared by all heads), instead of per-head K and V.

Both live in one row ``[c_kv, k_rope]`` of width ``kv_lora_rank + rope_dim``, so the absorbed decode form is
multi-query attention over a single "head": K is the whole row, V is its first ``kv_lora_rank`` columns (a
view of the same storage, read once by the decode kernel).
"""

from __future__ import annotations

import torch

from .base import KVCache, check_sizes, write_rows
from .view import KVView


class LatentKVCache(KVCache):
    """``(batch, max_len, 1, kv_lora_rank + rope_dim)`` storage; ``update(c_kv, k_rope)``."""

    heads_kv = 1

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype=torch.bfloat16,
                 device=None):
        check_sizes(batch=batch, max_len=max_len, kv_lora_rank=kv_lora_rank)
        if not isinstance(rope_dim, int) or rope_dim < 0:
            raise ValueError(f"rope_dim: expected a non-negative int, got {rope_dim!r}")
        self.batch, self.max_len, self.kv_lora_rank, self.rope_dim = batch, max_len, kv_lora_rank, rope_dim
        self.head_dim, self.head_dim_v = kv_lora_rank + rope_dim, kv_lora_rank
        self.latent = torch.zeros(batch, max_len, 1, self.head_dim, dtype=dtype, device=device)
        self._init_lengths(batch, self.latent.device)
        self._pin_addresses()

    def buffers(self):
        return [self.latent]

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor, positions=None) -> KVView:
        """``c_kv`` ``(batch, T, kv_lora_rank)``, ``k_rope`` ``(batch, T, rope_dim)`` (already rotated)."""
        b, r, dr = self.batch, self.kv_lora_rank, self.rope_dim
        for name, t, dim in (("c_kv", c_kv, r), ("k_rope", k_rope, dr)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b or t.shape[2] != dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({b}, new_tokens, {dim}), got {shape}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name}: expected a floating-point dtype (cast to the cache's), got {t.dtype}")
        if c_kv.shape[1] != k_rope.shape[1] or c_kv.shape[1] == 0:
            raise ValueError(f"c_kv, k_rope: expected the same non-zero number of new tokens, got "
                             f"{c_kv.shape[1]} and {k_rope.shape[1]}")
        row = torch.cat([c_kv, k_rope], dim=-1).to(self.latent.dtype).unsqueeze(2)
        t = c_kv.shape[1]
        if torch.compiler.is_compiling():
            # unchecked against max_len (as the static cache's traced update)
            write_rows(self.latent, self._traced_rows(t, positions), 0, row)
            return self.view()
        starts = self._start_positions(positions)
        if max(starts) + t > self.max_len:
            raise ValueError(f"c_kv: {t} new tokens after {max(starts)} overflow max_len={self.max_len}")
        write_rows(self.latent, self._start_rows(starts, t, self.latent.device), starts[0], row)
        self._set_lengths([s + t for s in starts])
        return self.view()

    def view(self) -> KVView:
        traced = torch.compiler.is_compiling()
        return KVView(self.latent, self.latent[..., :self.kv_lora_rank], self.seqlens, "dense",
                      max_seqlen=None if traced else max(self._lengths))

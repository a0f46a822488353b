"""Reformer's LSH self-attention layer (Kitaev et al. 2020) as a token mixer: one shared query-key projection,
``subquad.lsh_attention`` with ``shared_qk=True`` over it.

Cached decoding: the cache (a ``StaticKVCache``) keeps every token's shared query-key vector (RoPE applied) and
value, and a call with a cache returns, for its new tokens, what the layer's forward over every token so far
gives at their positions: each step re-hashes and re-sorts the whole prefix, as Hugging Face's Reformer re-sorts
its cached buckets per step, and runs the LSH pass over it (O(length x chunk x n_hashes) per step, where exact
attention's step reads each key once). That is not the forward over the whole sequence at those positions: which
keys share a query's chunk depends on every token sorted with them, later ones included (Reformer's causal
masking keeps later keys out, not their effect on the chunks). Sequences up to one chunk long (the default chunk
is at least 64 tokens) are exact attention, and there the two agree.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_backend
from ..cache import StaticKVCache
from ..ops.lsh import BACKENDS, check_options, lsh_attention
from .attention import cache_positions, check_heads, check_kv_cache, rows_by_length
from .positions import RotaryEmbedding

POSITIONS = ("rope", "none")


class LSHAttention(nn.Module):
    """Reformer's LSH attention: shared QK (the keys are the length-normalised queries; a token attends to
    itself only when it has no other key), ``n_hashes`` rounds of angular LSH into ``n_buckets`` buckets, chunks
    of ``chunk_size`` tokens of each round's sorted order (a query sees its chunk and the one before).

    Args:
        d_model, heads, head_dim: as ``Attention`` (``head_dim`` defaults to ``d_model / heads``).
        n_buckets, n_hashes, chunk_size: ``subquad.lsh_attention``'s.
        causal: a decoder (default); False for an encoder (no cache then).
        position: ``"rope"`` (default) or ``"none"``.
        seed: the hash rotations' seed, the same at every call (a deterministic layer); None draws new ones from
            PyTorch's generator at every call, as trax and Hugging Face do in training (a cached step then
            hashes its prefix anew).
        backend: passed to ``subquad.lsh_attention``.
    """

    def __init__(self, d_model: int, heads: int, head_dim: int | None = None, *, n_buckets: int = 64,
                 n_hashes: int = 4, chunk_size: int | None = None, causal: bool = True, position: str = "rope",
                 seed: int | None = 0, bias: bool = False, backend: str = "auto"):
        super().__init__()
        _, self.head_dim = check_heads(d_model, heads, None, head_dim)
        if position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
        self.d_model, self.heads, self.causal, self.position, self.backend = d_model, heads, causal, position, backend
        self.n_buckets, self.n_hashes, self.chunk_size, self.seed = n_buckets, n_hashes, chunk_size, seed
        check_options(n_buckets, n_hashes, chunk_size, causal, True, seed, None, False)
        check_backend(backend, BACKENDS)
        self.qk_proj = nn.Linear(d_model, heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, d_model, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim) if position == "rope" else None

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, max_step: int = 1) -> StaticKVCache:
        """A ``StaticKVCache`` of the shared query-key vectors and the values (steps of any length: ``max_step``,
        the mixers' common argument, sizes rings only)."""
        if not self.causal:
            raise ValueError("cache: a non-causal (encoder) LSH attention layer has no generation cache")
        w = self.qk_proj.weight
        return StaticKVCache(batch, max_len, self.heads, self.head_dim, dtype=dtype or w.dtype,
                             device=device or w.device)

    def _attend(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return lsh_attention(qk, qk, v, n_buckets=self.n_buckets, n_hashes=self.n_hashes, chunk_size=self.chunk_size,
                             causal=self.causal, shared_qk=True, seed=self.seed, backend=self.backend)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        qk = self.qk_proj(x).view(bsz, seq_len, self.heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seq_len, self.heads, self.head_dim)
        if cache is not None:
            if not self.causal:
                raise ValueError("cache: a non-causal (encoder) LSH attention layer takes no cache")
            check_kv_cache(cache, self, None, self.heads, self.head_dim, self.head_dim, bsz)
            positions = cache_positions(cache, seq_len, x.device)
        else:
            positions = torch.arange(seq_len, device=x.device)
        if self.rope is not None:
            qk = self.rope(qk, positions)
        if cache is None:
            o = self._attend(qk, v)
        else:
            stored_qk, stored_v, lengths = cache.update(qk, v).dense()
            o = qk.new_empty(bsz, seq_len, self.heads, self.head_dim)
            for n, rows in rows_by_length(lengths):
                o[rows] = self._attend(stored_qk[rows, :n].to(qk.dtype), stored_v[rows, :n].to(v.dtype))[:, -seq_len:]
        return self.o_proj(o.reshape(bsz, seq_len, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, n_buckets={self.n_buckets}, n_hashes={self.n_hashes}, "
                f"chunk_size={self.chunk_size}, causal={self.causal}, position={self.position}, seed={self.seed}")

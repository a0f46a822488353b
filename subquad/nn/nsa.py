"""Native Sparse Attention as a token mixer (Yuan et al., 2025): ``subquad.nsa`` with NSA's learnable parts.

* q / k / v projections (GQA through ``kv_heads``), RoPE on q and k;
* the gate MLP: a linear map of the token to three weights per query head, through a sigmoid (NSA's gates for the
  compressed, selected and window branches);
* the compression: per branch of keys and values, a ``BlockCompression`` (each block plus a learned intra-block
  position embedding, through a two-layer MLP, on top of the block's mean);
* the output projection.

Cached decoding (``new_cache``): an ``NSACache`` keeps every token's K/V and the compressed K/V of the blocks
completed so far; each step appends the new tokens, compresses the blocks they complete, and attends with the
new queries aligned to the end of the stored keys (the window over the cache's tail, the selection over every
block stored): the same outputs as the whole sequence at once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import StaticKVCache
from ..cache.base import check_sizes as check_cache_sizes
from ..ops.nsa import check_sizes, nsa
from ..ops.nsa.compression import num_blocks
from .attention import cache_positions, check_heads, rows_by_length
from .positions import RotaryEmbedding

POSITIONS = ("rope", "none")


class BlockCompression(nn.Module):
    """NSA's learnable compression of keys (or values): ``(B, N, H, D) -> (B, M, H, D)``, one vector per complete
    block of ``block`` tokens taken every ``stride`` tokens. Each block, with a learned position embedding added
    to its ``block`` rows, is flattened through ``Linear -> SiLU -> Linear``; the result is added to the block's
    mean, so an untrained layer starts near mean pooling."""

    def __init__(self, head_dim: int, block: int, stride: int, hidden: int | None = None):
        super().__init__()
        self.block, self.stride = block, stride
        hidden = head_dim if hidden is None else hidden
        self.position = nn.Parameter(torch.randn(block, head_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(block * head_dim, hidden), nn.SiLU(), nn.Linear(hidden, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, h, d = x.shape
        if n < self.block:
            return x.new_zeros(bsz, 0, h, d)
        windows = x.unfold(1, self.block, self.stride).transpose(-1, -2)     # (B, M, H, block, D)
        return windows.mean(-2) + self.mlp((windows + self.position).flatten(-2))


class NSACache(StaticKVCache):
    """A ``StaticKVCache`` plus the compressed K/V ``(batch, max_blocks, heads_kv, head_dim)`` of the blocks
    completed so far (``compressed[b]`` of them for sequence ``b``), which ``NSA`` appends as blocks complete."""

    def __init__(self, batch: int, max_len: int, heads_kv: int, head_dim: int, compress_block: int,
                 compress_stride: int, dtype=torch.bfloat16, device=None):
        # (before the compressed buffers are made from them; the base class's init checks the rest)
        check_cache_sizes(batch=batch, max_len=max_len)
        blocks = num_blocks(max_len, compress_block, compress_stride)
        # (before the base class's init, which pins every buffer's address)
        self.k_cmp = torch.zeros(batch, blocks, heads_kv, head_dim, dtype=dtype, device=device)
        self.v_cmp = torch.zeros_like(self.k_cmp)
        self.compress_block, self.compress_stride = compress_block, compress_stride
        self.compressed = [0] * batch
        super().__init__(batch, max_len, heads_kv, head_dim, dtype=dtype, device=device)

    def buffers(self):
        return [self.k, self.v, self.k_cmp, self.v_cmp]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions=None):
        """``StaticKVCache.update``; a write at earlier positions (rejected drafts rewound) also drops the compressed
        blocks that held a rewritten position, so that ``NSA`` compresses them again from the new keys."""
        view = super().update(k, v, positions)
        if not torch.compiler.is_compiling():
            for b, end in enumerate(self._lengths):
                self.compressed[b] = min(self.compressed[b],
                                         num_blocks(end - k.shape[1], self.compress_block, self.compress_stride))
        return view

    def reset(self) -> None:
        super().reset()
        self.compressed = [0] * self.batch


class NSA(nn.Module):
    """Native Sparse Attention (causal).

    Args:
        d_model: model width.
        heads: query heads; ``kv_heads`` key/value heads (a divisor of ``heads``; NSA shares each token's block
            selection across a GQA group); ``head_dim`` defaults to ``d_model / heads``.
        block, compress_block, compress_stride, top_k, window: ``subquad.nsa``'s (NSA's l', l, d, n, w).
        compress_hidden: width of the compression MLP's hidden layer (default ``head_dim``).
        position: ``"rope"`` (default) or ``"none"``; ``rope_base``: RoPE's base.
        backend: passed to ``subquad.nsa``.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 block: int = 64, compress_block: int = 32, compress_stride: int = 16, top_k: int = 16,
                 window: int = 512, compress_hidden: int | None = None, position: str = "rope",
                 rope_base: float = 10000.0, bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.kv_heads, self.head_dim = check_heads(d_model, heads, kv_heads, head_dim)
        check_sizes(block, compress_block, compress_stride, top_k, window)
        if position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
        self.d_model, self.heads, self.position, self.backend = d_model, heads, position, backend
        self.sizes = dict(block=block, compress_block=compress_block, compress_stride=compress_stride, top_k=top_k,
                          window=window)
        self.q_proj = nn.Linear(d_model, heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.gate_proj = nn.Linear(d_model, 3 * heads)
        self.k_compress = BlockCompression(self.head_dim, compress_block, compress_stride, compress_hidden)
        self.v_compress = BlockCompression(self.head_dim, compress_block, compress_stride, compress_hidden)
        self.o_proj = nn.Linear(heads * self.head_dim, d_model, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if position == "rope" else None

    def compress(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed keys and values of ``(B, N, H_kv, D)`` K/V: ``subquad.nsa``'s ``compress``."""
        return self.k_compress(k), self.v_compress(v)

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, max_step: int = 1) -> NSACache:
        """An ``NSACache`` of ``max_len`` tokens (steps of any length: ``max_step``, the mixers' common argument,
        sizes rings only)."""
        w = self.q_proj.weight
        return NSACache(batch, max_len, self.kv_heads, self.head_dim, self.sizes["compress_block"],
                        self.sizes["compress_stride"], dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, x: torch.Tensor, cache: NSACache | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.heads, self.head_dim)
        k, v = self.kv_proj(x).view(bsz, seq_len, 2, self.kv_heads, self.head_dim).unbind(2)
        gates = torch.sigmoid(self.gate_proj(x)).view(bsz, seq_len, self.heads, 3)
        if cache is not None:
            self._check_cache(cache, bsz)
            positions = cache_positions(cache, seq_len, x.device)
        else:
            positions = torch.arange(seq_len, device=x.device)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is None:
            o = nsa(q, k, v, gates, compress=self.compress, backend=self.backend, **self.sizes)
        else:
            o = self._attend_cached(q, k, v, gates, cache)
        return self.o_proj(o.reshape(bsz, seq_len, self.heads * self.head_dim))

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, NSACache):
            raise ValueError(f"cache: expected an NSACache for this NSA layer (use layer.new_cache()), got "
                             f"{type(cache).__name__}")
        blocks = (cache.compress_block, cache.compress_stride)
        if (cache.batch, cache.heads_kv, cache.head_dim) != (batch, self.kv_heads, self.head_dim) \
                or blocks != (self.sizes["compress_block"], self.sizes["compress_stride"]):
            raise ValueError(f"cache: expected batch {batch}, heads_kv {self.kv_heads}, head_dim {self.head_dim}, "
                             f"compression blocks {self.sizes['compress_block']} every "
                             f"{self.sizes['compress_stride']}; got {cache.batch}, {cache.heads_kv}, "
                             f"{cache.head_dim}, {blocks[0]} every {blocks[1]}")

    def _attend_cached(self, q, k, v, gates, cache: NSACache) -> torch.Tensor:
        """The new queries over everything stored, per group of sequences of one length."""
        seq_len = q.shape[1]
        keys, values, lengths = cache.update(k, v).dense()
        out = q.new_empty(*q.shape[:3], self.head_dim)
        for n, rows in rows_by_length(lengths):
            m = self._compress_completed(cache, rows, n, n - seq_len)
            out[rows] = nsa(q[rows], keys[rows, :n].to(q.dtype), values[rows, :n].to(q.dtype), gates[rows],
                            compress=(cache.k_cmp[rows, :m].to(q.dtype), cache.v_cmp[rows, :m].to(q.dtype)),
                            backend=self.backend, **self.sizes)
        return out

    def _compress_completed(self, cache: NSACache, rows: torch.Tensor, length: int, start: int) -> int:
        """Compress the blocks that the sequences ``rows`` (``length`` tokens, new ones from ``start``) have
        completed since their last step; returns how many blocks they have now."""
        block, stride = self.sizes["compress_block"], self.sizes["compress_stride"]
        members = rows.tolist()
        # blocks that held a rewritten position are compressed again
        have = min(min(cache.compressed[b] for b in members), num_blocks(start, block, stride))
        want = num_blocks(length, block, stride)
        if want > have:
            lo, hi = have * stride, (want - 1) * stride + block
            dtype = self.q_proj.weight.dtype
            k_new, v_new = self.compress(cache.k[rows, lo:hi].to(dtype), cache.v[rows, lo:hi].to(dtype))
            cache.k_cmp[rows, have:want] = k_new.to(cache.k_cmp.dtype)
            cache.v_cmp[rows, have:want] = v_new.to(cache.v_cmp.dtype)
        for b in members:
            cache.compressed[b] = want
        return want

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{name}={value}" for name, value in self.sizes.items())
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, {sizes}, " \
               f"position={self.position}"

"""Differential attention (Ye et al., 2024, "Differential Transformer").

Each head computes two softmax maps from two halves of its query/key and subtracts them, cancelling the
attention "noise" both maps share:

    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V
    lambda      = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 l)

(``l`` the 0-based layer index), then a per-head RMSNorm and a ``(1 - lambda_init)`` scale. Since the
difference is linear in the maps, ``(A1 - lambda A2) V = A1 V - lambda A2 V``: two calls of
``subquad.attention`` (flash kernels, any mask, GQA) give it exactly, with V of width ``2d`` shared by both.

The KV cache stores ``[k1, k2]`` side by side as one key of width ``2d`` (and V of width ``2d``), so nothing is
stored twice; each map reads its half of the key through a strided view.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import KVView, RollingKVCache, StaticKVCache
from ..ops.softmax import attention
from ..ops.softmax.dropout import check_dropout_p
from .. import masks
from .attention import attend_cached, cache_positions, check_heads, check_kv_cache
from .norm import RMSNorm
from .positions import RotaryEmbedding


def lambda_init_for(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffAttention(nn.Module):
    """Args:
        d_model, heads, kv_heads: as ``Attention``; each head has two maps of ``head_dim = d_model / heads / 2``
            channels and a value of ``2 * head_dim``.
        layer_idx: depth of the layer (sets ``lambda_init``).
        window: sliding window (a rolling cache when decoding), as ``Attention``.
        rope_base: RoPE on both query/key halves.
        dropout: attention dropout on each of the two maps while training, without a cache (``subquad.attention``'s
            ``dropout_p``).
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None, *, layer_idx: int = 0,
                 window: int | None = None, rope_base: float = 10000.0, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(heads, int) or heads <= 0 or d_model % (2 * heads):
            raise ValueError(f"d_model: expected a multiple of 2 * heads (two maps per head), got d_model={d_model}, "
                             f"heads={heads}")
        self.kv_heads, _ = check_heads(d_model, heads, kv_heads, d_model // heads)
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ValueError(f"window: expected a positive int or None, got {window!r}")
        self.d_model, self.heads, self.window, self.backend = d_model, heads, window, backend
        # the probability as given, as nn.Dropout keeps it (each call uses it as a multiple of 1/256)
        check_dropout_p(dropout, backend)
        self.dropout = float(dropout)
        self.head_dim = d_model // heads // 2
        d = self.head_dim
        self.q_proj = nn.Linear(d_model, heads * 2 * d, bias=False)
        self.k_proj = nn.Linear(d_model, self.kv_heads * 2 * d, bias=False)
        self.v_proj = nn.Linear(d_model, self.kv_heads * 2 * d, bias=False)
        self.o_proj = nn.Linear(heads * 2 * d, d_model, bias=False)
        self.lambda_init = lambda_init_for(layer_idx)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(d) * 0.1) for _ in range(4))
        self.head_norm = RMSNorm(2 * d, eps=1e-5)
        self.rope = RotaryEmbedding(d, rope_base)

    def lambda_(self) -> torch.Tensor:
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum())
                - torch.exp((self.lambda_q2 * self.lambda_k2).sum()) + self.lambda_init)

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, max_step: int = 1):
        """As ``Attention.new_cache``: a ring for steps of up to ``max_step`` tokens with a window."""
        w = self.q_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        if self.window is not None:
            return RollingKVCache(batch, self.window, self.kv_heads, 2 * self.head_dim, dtype=dtype, device=device,
                                  max_step=max_step)
        return StaticKVCache(batch, max_len, self.kv_heads, 2 * self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(bsz, seq_len, self.heads, 2, d)
        k = self.k_proj(x).view(bsz, seq_len, self.kv_heads, 2, d)
        v = self.v_proj(x).view(bsz, seq_len, self.kv_heads, 2 * d)
        if cache is not None:
            check_kv_cache(cache, self, self.window, self.kv_heads, 2 * d, 2 * d, bsz)
            positions = cache_positions(cache, seq_len, x.device)
        else:
            positions = torch.arange(seq_len, device=x.device)
        # both halves rotate with the same positions: fold the pair axis into heads for RoPE
        q = self.rope(q.flatten(2, 3), positions).view(bsz, seq_len, self.heads, 2, d)
        k = self.rope(k.flatten(2, 3), positions).view(bsz, seq_len, self.kv_heads, 2, d)
        if cache is None:
            mask = masks.sliding_window(self.window) if self.window is not None else None
            p = self.dropout if self.training else 0.0
            o1, o2 = (attention(q[..., i, :], k[..., i, :], v, causal=True, mask=mask, backend=self.backend,
                                dropout_p=p) for i in range(2))
        else:
            view = cache.update(k.flatten(3), v)
            o1, o2 = (attend_cached(q[..., i, :], self._half(view, i), window=self.window, pattern=None,
                                    scale=d ** -0.5, softcap=None, alibi=None, backend=self.backend)
                      for i in range(2))
        o = o1 - self.lambda_().to(o1.dtype) * o2
        o = self.head_norm(o) * (1 - self.lambda_init)
        return self.o_proj(o.reshape(bsz, seq_len, self.heads * 2 * d))

    def _half(self, view: KVView, i: int) -> KVView:
        d = self.head_dim
        return KVView(view.k[..., i * d:(i + 1) * d], view.v, view.seqlens, view.layout, view.block_table,
                      view.window, view.max_seqlen)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim} x 2, "
                f"lambda_init={self.lambda_init:.3f}" + (f", window={self.window}" if self.window else ""))

"""Multi-head latent attention (DeepSeek-V2): low-rank K/V compression with a decoupled RoPE key.

Per token the layer caches only ``c_kv`` (width ``kv_lora_rank``, e.g. 512) and one RoPE key shared by all
heads (``rope_dim``, e.g. 64): ``LatentKVCache``. Two ways to compute the same attention:

* training / prefill form: decompress per-head keys ``k = [W_UK c_kv, k_rope]`` and values ``v = W_UV c_kv``
  and run ``subquad.attention`` (the flash kernel on the GPU);
* absorbed decode form: fold ``W_UK`` into the query (``q_lat = q_nope W_UK``, width ``kv_lora_rank``),
  attend over the latent rows ``[c_kv, k_rope]`` directly (multi-query attention over one "head" with
  K = the row, V = its first ``kv_lora_rank`` columns: ``subquad.decode``'s latent layout), then apply
  ``W_UV`` to the result. Since ``(q W_UK) c = q (W_UK c)``, both give the same scores and outputs.

RoPE: a private rotary of the decoupled key's width (GPT-NeoX half rotation, the rotation
``subquad.nn.positions.RotaryEmbedding`` computes; no YaRN scaling nor its softmax-scale correction).
DeepSeek's own code rotates interleaved pairs ``(2i, 2i + 1)``: the same attention up to a fixed permutation of
the rope channels, so a model trained here is unaffected, but DeepSeek checkpoints need the rope rows of ``wq``
and ``wkv_a`` permuted (evens, then odds) before loading.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import LatentKVCache
from ..ops.decode import MAX_NEW_TOKENS, decode
from ..ops.softmax import attention
from ..ops.softmax.dropout import check_dropout_p
from .attention import rows_by_length


def _rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x`` ``(B, T, ..., D)`` (D even) by ``positions`` ``(B, T)``: pairs (i, i + D/2), angle
    ``pos * base^(-2i/D)``. Computed in fp32."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[..., None] * inv  # (B, T, D/2)
    ang = ang.view(*ang.shape[:2], *([1] * (x.dim() - 3)), d // 2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class MLA(nn.Module):
    """Token mixer: ``forward(x, cache=None) -> y`` with ``x`` ``(batch, seq, d_model)``.

    Args:
        d_model, n_heads: model width and query heads.
        kv_lora_rank: width of the cached latent ``c_kv`` (DeepSeek-V2: 512).
        q_lora_rank: width of the query's low-rank bottleneck (DeepSeek-V2: 1536); None: a full projection.
        qk_nope_dim, rope_dim, v_dim: per-head widths of the content part of q/k, of the decoupled RoPE
            part (shared key), and of v (DeepSeek-V2: 128, 64, 128).

    Without a cache the whole sequence is attended causally in the decompressed form. With a cache
    (``new_cache``), the new tokens' ``c_kv`` and rotated ``k_rope`` are appended; steps of up to 16 tokens
    use the absorbed form over the latent cache, longer ones (prefill) the decompressed form over it.
    ``dropout``: attention dropout while training, on the uncached form (``subquad.attention``'s ``dropout_p``).
    ``backend`` (attribute) is passed to ``subquad.attention`` / ``subquad.decode``.
    """

    def __init__(self, d_model: int, n_heads: int, kv_lora_rank: int = 512, q_lora_rank: int | None = None,
                 qk_nope_dim: int = 128, rope_dim: int = 64, v_dim: int = 128, rope_base: float = 10000.0,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("kv_lora_rank", kv_lora_rank),
                          ("qk_nope_dim", qk_nope_dim), ("v_dim", v_dim)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if not isinstance(rope_dim, int) or rope_dim <= 0 or rope_dim % 2:
            raise ValueError(f"rope_dim: expected a positive even int, got {rope_dim!r}")
        self.d_model, self.n_heads, self.kv_lora_rank = d_model, n_heads, kv_lora_rank
        self.qk_nope_dim, self.rope_dim, self.v_dim = qk_nope_dim, rope_dim, v_dim
        self.rope_base, self.backend = rope_base, backend
        # the probability as given, as nn.Dropout keeps it (each call uses it as a multiple of 1/256)
        check_dropout_p(dropout, backend)
        self.dropout = float(dropout)
        self.scale = (qk_nope_dim + rope_dim) ** -0.5
        q_width = n_heads * (qk_nope_dim + rope_dim)
        if q_lora_rank is None:
            self.wq = nn.Linear(d_model, q_width, bias=False)
        else:
            self.wq = nn.Sequential(nn.Linear(d_model, q_lora_rank, bias=False), nn.RMSNorm(q_lora_rank),
                                    nn.Linear(q_lora_rank, q_width, bias=False))
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_dim + v_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_dim, d_model, bias=False)

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, max_step: int = 1) -> LatentKVCache:
        """A ``LatentKVCache`` of ``max_len`` tokens (steps of any length: ``max_step``, the mixers' common
        argument, sizes rings only)."""
        p = self.wkv_a.weight
        return LatentKVCache(batch, max_len, self.kv_lora_rank, self.rope_dim, dtype=dtype or p.dtype,
                             device=device or p.device)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` ``(H, nope, R)`` and ``W_UV`` ``(H, v_dim, R)``, views of ``wkv_b``'s weight."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.qk_nope_dim], w[:, self.qk_nope_dim:]

    def forward(self, x: torch.Tensor, cache: LatentKVCache | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (batch, seq, {self.d_model}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        bsz, t, _ = x.shape
        h, nope, dr, r = self.n_heads, self.qk_nope_dim, self.rope_dim, self.kv_lora_rank
        if cache is not None and (not isinstance(cache, LatentKVCache) or cache.batch != bsz
                                  or cache.kv_lora_rank != r or cache.rope_dim != dr):
            raise ValueError(f"cache: expected a LatentKVCache for batch {bsz}, kv_lora_rank {r}, rope_dim {dr} "
                             f"(from new_cache), got {type(cache).__name__}")
        start = torch.zeros(bsz, 1, dtype=torch.long, device=x.device) if cache is None else \
            cache.seqlens.long().view(-1, 1)
        positions = start + torch.arange(t, device=x.device)

        q = self.wq(x).view(bsz, t, h, nope + dr)
        q_nope, q_rope = q[..., :nope], _rotary(q[..., nope:], positions, self.rope_base)
        kv = self.wkv_a(x)
        c_kv = self.kv_norm(kv[..., :r])
        k_rope = _rotary(kv[..., r:], positions, self.rope_base)

        if cache is None:
            o = self._decompressed(q_nope, q_rope, c_kv, k_rope, self.dropout if self.training else 0.0)
        else:
            view = cache.update(c_kv, k_rope)
            if t <= MAX_NEW_TOKENS:
                o = self._absorbed(q_nope, q_rope, view)
            else:
                # rows of different lengths (one rewound through cache.update(positions=...)) attend over their
                # own keys, their queries aligned to their own end, not to the longest row's
                lat, _, lengths = view.dense()
                # (a cache of another dtype than the model's, e.g. bf16 under an fp32 model: wkv_b needs its own)
                lat = lat.to(c_kv.dtype)
                o = q_nope.new_empty(bsz, t, h, self.v_dim)
                for n, idx in rows_by_length(lengths):
                    o[idx] = self._decompressed(q_nope[idx], q_rope[idx], lat[idx, :n, 0, :r], lat[idx, :n, 0, r:])
        return self.wo(o.reshape(bsz, t, h * self.v_dim))

    def _decompressed(self, q_nope, q_rope, c_kv, k_rope, dropout_p: float = 0.0) -> torch.Tensor:
        """Per-head K/V from the latent, then exact causal attention (queries aligned to the end)."""
        bsz, n = c_kv.shape[:2]
        h, nope = self.n_heads, self.qk_nope_dim
        kv = self.wkv_b(c_kv).view(bsz, n, h, nope + self.v_dim)
        k = torch.cat([kv[..., :nope], k_rope.unsqueeze(2).expand(bsz, n, h, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attention(q, k, kv[..., nope:], causal=True, scale=self.scale, backend=self.backend,
                         dropout_p=dropout_p)

    def _absorbed(self, q_nope, q_rope, view) -> torch.Tensor:
        """W_UK folded into the query, attention over the latent rows, W_UV applied to the result."""
        w_uk, w_uv = self._up_weights()
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        q_abs = torch.cat([q_lat, q_rope], dim=-1).to(view.k.dtype)
        o_lat = decode(q_abs, view, scale=self.scale, backend=self.backend)
        return torch.einsum("bthr,hvr->bthv", o_lat.to(w_uv.dtype), w_uv)


__all__ = ["MLA"]

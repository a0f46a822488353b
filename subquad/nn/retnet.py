"""RetNet's multi-scale retention (Sun et al., 2023) as a token mixer.

Per head a fixed decay ``gamma_h = 1 - 2^(-5 - h)``, h = 0..heads-1: ``o_t = sum_j gamma^(t-j)
(q_t . k_j) v_j`` with q, k rotated by position (xPos without its length extrapolation term is RoPE), then a
per-head normalisation (RetNet's GroupNorm, here RMSNorm), a swish output gate and the output projection.
The recurrent form keeps one ``(d_k, d_v)`` state per head: O(1) per decoded token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import gla_step, retention, retnet_gammas
from .attention import check_heads
from .norm import RMSNorm
from .positions import RotaryEmbedding
from .state import RecurrentState, check_recurrent_cache


class RetNet(nn.Module):
    """Args:
        d_model, heads: width and heads (``d_k = d_model / heads``).
        expand_v: value width per head over ``d_k`` (RetNet uses 2).
    """

    def __init__(self, d_model: int, heads: int, *, expand_v: int = 2, rope_base: float = 10000.0,
                 backend: str = "auto"):
        super().__init__()
        _, self.head_dim = check_heads(d_model, heads, None, None)
        self.d_model, self.heads, self.backend = d_model, heads, backend
        self.value_dim = expand_v * self.head_dim
        self.qk_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.vg_proj = nn.Linear(d_model, 2 * heads * self.value_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.value_dim, d_model, bias=False)
        self.head_norm = RMSNorm(self.value_dim)
        self.rope = RotaryEmbedding(self.head_dim, rope_base)

    def new_cache(self, batch: int, max_len: int, **_) -> RecurrentState:
        return RecurrentState(batch, type(self).__name__)

    def forward(self, x: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        cache = check_recurrent_cache(cache, self, bsz)
        q, k = self.qk_proj(x).view(bsz, seq_len, 2, self.heads, self.head_dim).unbind(2)
        v, g = self.vg_proj(x).view(bsz, seq_len, 2, self.heads, self.value_dim).unbind(2)
        start = cache.position if cache is not None else 0
        positions = torch.arange(start, start + seq_len, device=x.device)
        q, k = self.rope(q, positions), self.rope(k, positions)
        # made here in fp32, not kept as a buffer: model.to(bfloat16) would round the slow heads' 1 - 2^-12 to 1
        # (no decay at all) in the chunked form, while the step form decayed
        gamma = retnet_gammas(self.heads, x.device)
        if cache is None:
            o = retention(q, k, v, gamma, backend=self.backend)
        elif seq_len == 1:
            o, cache.state = gla_step(q, k, v, cache.state, gamma.log(), backend=self.backend)
        else:
            o, cache.state = retention(q, k, v, gamma, initial_state=cache.state, output_state=True,
                                       backend=self.backend)
        if cache is not None:
            cache.position += seq_len
        o = self.head_norm(o) * F.silu(g)
        return self.o_proj(o.reshape(bsz, seq_len, -1))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, d_k={self.head_dim}, d_v={self.value_dim}"

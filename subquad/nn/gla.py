"""Gated linear attention (Yang et al., 2024) as a token mixer.

``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` with a data-dependent decay per key channel
``alpha_t = sigmoid(W2 W1 x_t)^(1/16)`` (a low-rank gate; ``log alpha = logsigmoid(.) / 16`` keeps decays near
1), then a per-head RMSNorm, a swish output gate and the output projection. Keys are half as wide as values
(``expand_k = 0.5``), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import gla, gla_step
from .attention import check_heads
from .norm import RMSNorm
from .state import RecurrentState, check_recurrent_cache


class GLA(nn.Module):
    """Args:
        d_model, heads: width and heads.
        expand_k, expand_v: key / value widths over ``d_model`` (0.5 and 1).
        gate_rank: rank of the decay gate's projection (16).
        gate_normalizer: divides ``logsigmoid`` (16): larger keeps decays closer to 1 (longer memory).
    """

    def __init__(self, d_model: int, heads: int, *, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_rank: int = 16, gate_normalizer: float = 16.0, backend: str = "auto"):
        super().__init__()
        self.key_dim, self.value_dim = int(d_model * expand_k), int(d_model * expand_v)
        check_heads(self.key_dim, heads, None, None)
        check_heads(self.value_dim, heads, None, None)
        if not gate_normalizer > 0:
            raise ValueError(f"gate_normalizer: expected a positive number, got {gate_normalizer!r}")
        self.d_model, self.heads, self.gate_normalizer, self.backend = d_model, heads, gate_normalizer, backend
        self.dk, self.dv = self.key_dim // heads, self.value_dim // heads
        self.qk_proj = nn.Linear(d_model, 2 * self.key_dim, bias=False)
        self.vg_proj = nn.Linear(d_model, 2 * self.value_dim, bias=False)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.key_dim, bias=True)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.head_norm = RMSNorm(self.dv)

    def new_cache(self, batch: int, max_len: int, **_) -> RecurrentState:
        return RecurrentState(batch, type(self).__name__)

    def forward(self, x: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        cache = check_recurrent_cache(cache, self, bsz)
        q, k = self.qk_proj(x).view(bsz, seq_len, 2, self.heads, self.dk).unbind(2)
        v, g = self.vg_proj(x).view(bsz, seq_len, 2, self.heads, self.dv).unbind(2)
        log_decay = F.logsigmoid(self.gate_up(self.gate_down(x)).to(torch.promote_types(x.dtype, torch.float32))) / self.gate_normalizer
        log_decay = log_decay.view(bsz, seq_len, self.heads, self.dk)
        if cache is None:
            o = gla(q, k, v, log_decay, backend=self.backend)
        elif seq_len == 1:
            o, cache.state = gla_step(q, k, v, cache.state, log_decay, backend=self.backend)
        else:
            o, cache.state = gla(q, k, v, log_decay, initial_state=cache.state, output_state=True,
                                 backend=self.backend)
        if cache is not None:
            cache.position += seq_len
        o = self.head_norm(o) * F.silu(g)
        return self.o_proj(o.reshape(bsz, seq_len, self.value_dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, d_k={self.dk}, d_v={self.dv}, gate_normalizer={self.gate_normalizer}"

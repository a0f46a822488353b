"""DeltaNet (Schlag et al., 2021; Yang et al., 2024) and Gated DeltaNet (Yang et al., 2025) as token mixers.

The delta rule writes ``v_t`` under key ``k_t`` by first erasing what the state recalls for it:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = q_t S_t

with L2-normalised q, k (after a short causal convolution and SiLU), ``beta_t = sigmoid(W_b x_t)``, and for
Gated DeltaNet a Mamba-2-style decay ``log a_t = -exp(A_log) softplus(W_a x_t + dt_bias)`` plus a swish output
gate. Outputs get a per-head RMSNorm. O(1) state per decoded token.

Keys and values have the same width here (``d_model / heads`` per head, fla's ``DeltaNet`` default); fla's and
the paper's Gated DeltaNet widen the values (``expand_v = 2``), which this layer does not offer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.delta import delta_rule, delta_rule_step
from .attention import check_heads
from .norm import RMSNorm
from .short_conv import ShortConv
from .state import RecurrentState, check_recurrent_cache


class DeltaNet(nn.Module):
    """Args:
        d_model, heads: width and heads (``head_dim = d_model / heads`` for keys and values).
        d_conv: short convolution width on q, k, v (4; 0 turns it off).
        gated: Gated DeltaNet (decay and output gate); ``GatedDeltaNet`` sets it.
    """

    gated = False

    def __init__(self, d_model: int, heads: int, *, d_conv: int = 4, backend: str = "auto"):
        super().__init__()
        _, self.head_dim = check_heads(d_model, heads, None, None)
        self.d_model, self.heads, self.backend = d_model, heads, backend
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model, d_conv, bias=False) if d_conv else None
        self.beta_proj = nn.Linear(d_model, heads, bias=False)
        self.head_norm = RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        if self.gated:
            self.decay_proj = nn.Linear(d_model, heads, bias=False)
            self.gate_proj = nn.Linear(d_model, d_model, bias=False)
            dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))

    def new_cache(self, batch: int, max_len: int, **_) -> RecurrentState:
        return RecurrentState(batch, type(self).__name__)

    def forward(self, x: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        cache = check_recurrent_cache(cache, self, bsz)
        qkv = self.qkv_proj(x)
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, cache.conv if cache is not None else None)
        else:
            qkv, conv_state = F.silu(qkv), None
        q, k, v = qkv.view(bsz, seq_len, 3, self.heads, self.head_dim).unbind(2)
        beta = torch.sigmoid(self.beta_proj(x))
        log_decay = None
        if self.gated:
            acc = torch.promote_types(x.dtype, torch.float32)
            log_decay = -torch.exp(self.A_log.to(acc)) * F.softplus(self.decay_proj(x).to(acc) + self.dt_bias.to(acc))
        if cache is None:
            o = delta_rule(q, k, v, beta, log_decay, backend=self.backend)
        elif seq_len == 1:
            o, cache.state = delta_rule_step(q, k, v, beta, cache.state, log_decay, backend=self.backend)
        else:
            o, cache.state = delta_rule(q, k, v, beta, log_decay, initial_state=cache.state, output_state=True,
                                        backend=self.backend)
        if cache is not None:
            cache.conv, cache.position = conv_state, cache.position + seq_len
        o = self.head_norm(o)
        if self.gated:
            o = o * F.silu(self.gate_proj(x).view(bsz, seq_len, self.heads, self.head_dim))
        return self.o_proj(o.reshape(bsz, seq_len, self.d_model))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, gated={self.gated}"


class GatedDeltaNet(DeltaNet):
    """DeltaNet with a data-dependent decay ``a_t`` (Mamba-2's parametrisation) and a swish output gate."""

    gated = True

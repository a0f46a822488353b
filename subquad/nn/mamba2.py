"""Mamba-2 (Dao & Gu, 2024) as a token mixer: the SSD recurrence with its input projection, short causal
convolution, dt/A parametrisation, ``D`` skip and gated RMSNorm.

    z, xBC, dt = in_proj(u);  x, B, C = silu(conv1d(xBC))
    dt = softplus(dt + dt_bias);  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t;   y_t = C_t h_t + D x_t       (subquad.ssd)
    out = out_proj(RMSNorm(y * silu(z)))

Heads of ``headdim`` channels share ``B``/``C`` within ``ngroups`` groups; the gated RMSNorm normalises each
group's ``d_inner / ngroups`` channels by their own RMS (as ``mamba_ssm``'s ``Mamba2``). The cache holds the SSD state
``(batch, heads, d_state, headdim)`` and the convolution's last ``d_conv - 1`` inputs: O(1) per decoded token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import ssd, ssd_step
from .norm import RMSNorm
from .short_conv import ShortConv
from .state import RecurrentState, check_recurrent_cache


class Mamba2(nn.Module):
    """Args:
        d_model: width. heads: SSD heads (default ``d_inner / headdim``); when given, ``headdim = d_inner / heads``.
        d_state: state size N per head (64 in the paper; smaller for tiny models).
        expand: ``d_inner = expand * d_model``.
        ngroups: groups sharing B and C (1).
        d_conv: short convolution width (4).
        dt_min, dt_max: range of the initial step sizes (log-uniform).
    """

    def __init__(self, d_model: int, heads: int | None = None, *, d_state: int = 64, expand: int = 2,
                 headdim: int = 64, ngroups: int = 1, d_conv: int = 4, dt_min: float = 1e-3, dt_max: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.d_inner = expand * d_model
        if heads is not None:
            if not isinstance(heads, int) or heads <= 0 or self.d_inner % heads:
                raise ValueError(f"heads: expected a positive divisor of d_inner={self.d_inner}, got {heads!r}")
            headdim = self.d_inner // heads
        if not isinstance(headdim, int) or headdim <= 0 or self.d_inner % headdim:
            raise ValueError(f"headdim: expected a positive divisor of d_inner={self.d_inner}, got {headdim!r}")
        self.heads = self.d_inner // headdim
        if not isinstance(ngroups, int) or ngroups <= 0 or self.heads % ngroups:
            raise ValueError(f"ngroups: expected a positive divisor of heads={self.heads}, got {ngroups!r}")
        self.d_model, self.headdim, self.d_state, self.ngroups, self.backend = d_model, headdim, d_state, ngroups, backend
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.heads, bias=False)
        self.conv = ShortConv(conv_dim, d_conv)
        dt = torch.exp(torch.rand(self.heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.heads))
        # one RMS per group of heads sharing B/C, as mamba_ssm's Mamba2 (RMSNormGated, group_size=d_inner/ngroups):
        # over all of d_inner, a loud group would shrink the others' outputs (same thing when ngroups == 1)
        self.norm = RMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def new_cache(self, batch: int, max_len: int, **_) -> RecurrentState:
        return RecurrentState(batch, type(self).__name__)

    def forward(self, u: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        bsz, seq_len, _ = u.shape
        cache = check_recurrent_cache(cache, self, bsz)
        gn = self.ngroups * self.d_state
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * gn, self.heads], dim=-1)
        xbc, conv_state = self.conv(xbc, cache.conv if cache is not None else None)
        x, b, c = xbc.split([self.d_inner, gn, gn], dim=-1)
        x = x.view(bsz, seq_len, self.heads, self.headdim)
        b = b.view(bsz, seq_len, self.ngroups, self.d_state)
        c = c.view(bsz, seq_len, self.ngroups, self.d_state)
        acc = torch.promote_types(u.dtype, torch.float32)  # dt and A in fp32 at least (decays are exp(dt A))
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))
        a = -torch.exp(self.A_log.to(acc))
        if cache is None:
            y = ssd(x, dt, a, b, c, backend=self.backend)
        elif seq_len == 1:
            y, cache.state = ssd_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], cache.state, backend=self.backend)
            y = y.unsqueeze(1)
        else:
            y, cache.state = ssd(x, dt, a, b, c, initial_state=cache.state, output_state=True, backend=self.backend)
        if cache is not None:
            cache.conv, cache.position = conv_state, cache.position + seq_len
        y = y + x * self.D.to(x.dtype).view(-1, 1)
        y = self.norm(y.reshape(bsz, seq_len, self.d_inner) * F.silu(z))
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, headdim={self.headdim}, d_state={self.d_state}, ngroups={self.ngroups}"

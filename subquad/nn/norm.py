"""RMSNorm (Zhang & Sennrich, 2019): ``x / rms(x) * weight``, computed in fp32 (fp64 for fp64 input)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises the last dimension (``dim`` channels), or each of its consecutive groups of ``group_size``
    channels by its own RMS (the weight stays per channel: Mamba-2's grouped gated norm). Used for the residual
    stream and, on ``(..., heads, head_dim)`` tensors, as the per-head norm of the recurrent layers' outputs
    (RetNet's GroupNorm role)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, group_size: int | None = None):
        super().__init__()
        if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or dim % group_size):
            raise ValueError(f"group_size: expected a positive divisor of dim={dim}, got {group_size!r}")
        self.dim, self.eps = dim, eps
        self.group_size = dim if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.group_size == self.dim:
            y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        else:
            g = xf.unflatten(-1, (-1, self.group_size))
            y = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        grouped = f", group_size={self.group_size}" if self.group_size != self.dim else ""
        return f"{self.dim}, eps={self.eps}{grouped}"

"""RMSNorm (Zhang & Sennrich, 2019): ``x / rms(x) * weight``, computed in fp32 (fp64 for fp64 input)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises the last dimension (``dim`` channels). Used for the residual stream and, on ``(..., heads,
    head_dim)`` tensors, as the per-head norm of the recurrent layers' outputs (RetNet's GroupNorm role)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"

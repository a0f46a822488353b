"""SwiGLU feed-forward (Shazeer, 2020): ``W2 (silu(W1 x) * W3 x)``, the MLP of Llama-family models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(d_model: int, ratio: float = 8 / 3, multiple_of: int = 32) -> int:
    """Hidden width ``ratio * d_model`` rounded up to ``multiple_of`` (8/3 keeps the parameters of a 4x GELU MLP)."""
    return multiple_of * math.ceil(ratio * d_model / multiple_of)


class SwiGLU(nn.Module):
    """``W2 (silu(W1 x) * W3 x)`` with a hidden width of ``hidden`` (default ``swiglu_hidden(d_model)``)."""

    def __init__(self, d_model: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # W1 and W3 in one matmul
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

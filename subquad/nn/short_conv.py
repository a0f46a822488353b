"""Causal depthwise short convolution (Mamba, DeltaNet): each channel mixes its last ``kernel_size`` inputs.

For decoding the layer keeps the last ``kernel_size - 1`` inputs as a conv state: prepending them to the new
tokens and convolving without padding gives exactly what the whole sequence would have given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """A causal depthwise convolution of ``channels`` over ``kernel_size`` tokens (then SiLU with
    ``activation``): ``forward(x, state) -> (y, state)``, the state carrying the last inputs for decoding."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True, bias: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive int, got {kernel_size}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-kernel_size ** -0.5,
                                                                               kernel_size ** -0.5))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, T, C)``, ``state`` ``(B, kernel_size - 1, C)`` (None: zeros, the sequence start).
        Returns ``(y (B, T, C), new_state)``."""
        bsz, _, channels = x.shape
        if state is None:
            state = x.new_zeros(bsz, self.kernel_size - 1, channels)
        padded = torch.cat([state.to(x.dtype), x], dim=1)
        # a sum of kernel_size shifted copies: for a few taps this beats a grouped conv1d (slow on CPU)
        w = self.weight.to(x.dtype)
        seq_len = x.shape[1]
        y = sum(padded[:, i:i + seq_len] * w[:, i] for i in range(self.kernel_size))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        # a copy, not a view: a view would keep a prefill's whole input alive in the cache, and its strides
        # (the prefill's length) would differ from a step's, recompiling a compiled decoding step once
        new_state = padded[:, padded.shape[1] - (self.kernel_size - 1):].clone(memory_format=torch.contiguous_format)
        return (F.silu(y) if self.activation else y), new_state

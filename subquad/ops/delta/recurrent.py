"""Delta-rule decoding step on the linear family's fused recurrent kernel (its ``DELTA`` switch)."""

from __future__ import annotations

import torch

from ..linear.recurrent import launch_recurrent
from .reference import delta_rule_step_reference


def recurrent_delta_rule(q, k, v, beta, g, scale, state):
    """q, k (B, T, H, K) (normalised already), v (B, T, H, V), beta (B, T, H), g None | (B, T, H)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, g, state)):
        return delta_rule_step_reference(q, k, v, beta, state, g, scale)
    return launch_recurrent(q, k, v, g, beta, state, scale)

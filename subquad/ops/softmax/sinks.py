"""Attention sinks: a per-head logit that every query sees, with a zero value (GPT-OSS's ``sinks``, the
learnable sink of "Efficient Streaming Language Models with Attention Sinks", FlashAttention-4's
``learnable_sink``).

The sink joins the softmax's denominator only, so attention with it is attention without it, rescaled:
``lse' = logaddexp(lse, sink)`` and ``out' = out * exp(lse - lse')``. That takes the output and LSE of any
backend, and its gradients reach the sink and, through the LSE's gradient, the kernels' inputs. One
elementwise pass over the output each way (the kernels could fold it into their epilogue: not done).
"""

from __future__ import annotations

import torch


def check_sinks(sinks, heads: int, device) -> None:
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (heads,) or not sinks.dtype.is_floating_point:
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks: expected a float tensor of shape ({heads},) (one logit per query head), got "
                         f"{shape}")
    if sinks.device != torch.device(device):
        raise ValueError(f"sinks: expected device {device}, got {sinks.device}")


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (B, N, H, Dv)`` and ``lse (B, H, N)`` (fp32, ``-inf`` where a query saw no key) of attention
    without sinks -> with the per-head logits ``sinks (H,)`` (``-inf``: that head has none). A query that saw no
    key keeps output 0."""
    sink = sinks.float().view(1, -1, 1).expand_as(lse)
    # a row with no key and no sink: logaddexp(-inf, -inf) is -inf, and exp(lse - merged) and logaddexp's
    # gradient NaN there, so such rows go through finite stand-ins and are set after
    empty = (lse == float("-inf")) & (sink == float("-inf"))
    lse_, sink_ = lse.masked_fill(empty, 0.0), sink.masked_fill(empty, 0.0)
    merged = torch.logaddexp(lse_, sink_)
    weight = torch.exp(lse_ - merged).masked_fill(empty, 0.0).transpose(1, 2).unsqueeze(-1)    # (B, N, H, 1)
    return (out * weight).to(out.dtype), merged.masked_fill(empty, float("-inf"))

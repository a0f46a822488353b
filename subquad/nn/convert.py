"""MHA -> GQA / MQA conversion of trained projection weights (Ainslie et al., 2023, "GQA").

The GQA paper builds each key/value head of a group as the mean of the group's original heads, then
uptrains briefly (about 5% of the original steps). These functions do the first part: they pool the K and V
projections of a trained multi-head layer into ``n_kv_heads`` heads; query and output projections are
unchanged. Heads are grouped consecutively (query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``),
the convention of ``subquad.attention`` and of GQA checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS = ("n_heads", "num_heads", "heads_q", "num_attention_heads", "heads")
KV_HEADS = ("n_kv_heads", "num_key_value_heads", "heads_kv", "num_kv_heads", "kv_heads")


def pool_kv_heads(weight: torch.Tensor, n_heads: int, n_kv_heads: int, bias: torch.Tensor | None = None):
    """Mean-pool a K or V projection's heads.

    Args:
        weight: ``(n_heads * head_dim, d_in)``, an ``nn.Linear`` weight whose output rows are head-major.
        bias: ``(n_heads * head_dim,)`` or None.
    Returns:
        ``(weight (n_kv_heads * head_dim, d_in), bias or None)``.
    """
    if not isinstance(n_heads, int) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or n_heads <= 0 \
            or n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: expected a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] % n_heads:
        raise ValueError(f"weight: expected shape (n_heads * head_dim, d_in) with n_heads={n_heads}, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    head_dim = weight.shape[0] // n_heads
    group = n_heads // n_kv_heads
    pooled = weight.reshape(n_kv_heads, group, head_dim, -1).mean(dim=1).reshape(n_kv_heads * head_dim, -1)
    if bias is None:
        return pooled, None
    if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    return pooled, bias.reshape(n_kv_heads, group, head_dim).mean(dim=1).reshape(-1)


def pool_kv_linear(linear: nn.Linear, n_heads: int, n_kv_heads: int, *, fused: bool = False) -> nn.Linear:
    """A new ``nn.Linear`` with the pooled heads of ``linear`` (same dtype and device). ``fused``: ``linear``
    computes ``[K; V]`` (subquad's ``Attention.kv_proj``), each half pooled on its own."""
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    parts = 2 if fused else 1
    if linear.out_features % parts:
        raise ValueError(f"linear: expected an even number of output rows ([K; V]), got {linear.out_features}")
    weights = linear.weight.detach().chunk(parts)
    biases = [None] * parts if linear.bias is None else linear.bias.detach().chunk(parts)
    pooled = [pool_kv_heads(w, n_heads, n_kv_heads, b) for w, b in zip(weights, biases)]
    w = torch.cat([pw for pw, _ in pooled])
    out = nn.Linear(linear.in_features, w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(torch.cat([pb for _, pb in pooled]))
    return out


def _int_attr(owner, names: tuple[str, ...]) -> int | None:
    return next((getattr(owner, a) for a in names if isinstance(getattr(owner, a, None), int)), None)


def mha_to_gqa(module: nn.Module, n_kv_heads: int, *, n_heads: int | None = None, k_name: str = "k_proj",
               v_name: str = "v_proj") -> nn.Module:
    """Convert an attention module in place: its ``k_name`` / ``v_name`` Linear layers (or a fused ``kv_proj``,
    as in ``subquad.nn.Attention``) are replaced by their pooled versions; the head counts it keeps are updated:
    ``n_kv_heads`` / ``num_key_value_heads`` / ``heads_kv`` / ``num_kv_heads`` / ``kv_heads`` attributes,
    transformers' ``num_key_value_groups`` and its ``config.num_key_value_heads``. ``n_heads`` (the heads the
    K/V projections hold now) defaults to the module's (or its ``config``'s) query heads: ``n_heads`` /
    ``num_heads`` / ``heads_q`` / ``num_attention_heads`` / ``heads``. ``n_kv_heads=1`` gives MQA.
    Returns the module."""
    config = getattr(module, "config", None)
    query_heads = _int_attr(module, HEADS)
    if query_heads is None:
        query_heads = _int_attr(config, HEADS)
    n_heads = query_heads if n_heads is None else n_heads
    if n_heads is None:
        raise ValueError("n_heads: the module has no n_heads / num_heads attribute; pass n_heads=")
    # transformers' layers share one config: each layer's own K/V head count is in its num_key_value_groups
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and query_heads is not None:
        held = query_heads // groups
    else:
        held = _int_attr(module, KV_HEADS)
    if held is not None and held != n_heads:
        raise ValueError(f"n_heads: expected the {held} key/value heads the module's projections hold, got "
                         f"{n_heads}")
    kv_proj = getattr(module, "kv_proj", None)
    if isinstance(kv_proj, nn.Linear) and not isinstance(getattr(module, k_name, None), nn.Linear):
        module.kv_proj = pool_kv_linear(kv_proj, n_heads, n_kv_heads, fused=True)
    else:
        for name in (k_name, v_name):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise ValueError(f"{name}: expected the module to have an nn.Linear named {name!r}")
            setattr(module, name, pool_kv_linear(getattr(module, name), n_heads, n_kv_heads))
    for attr in KV_HEADS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, n_kv_heads)
    if isinstance(groups, int):
        module.num_key_value_groups = groups * n_heads // n_kv_heads
    if isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = n_kv_heads
    return module


__all__ = ["pool_kv_heads", "pool_kv_linear", "mha_to_gqa"]

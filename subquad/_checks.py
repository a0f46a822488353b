"""Argument checks shared by the public ops: each failure is a ValueError naming the argument and what
was expected."""

from __future__ import annotations

import math
import numbers
import operator

import torch


def check_bshd(**tensors: torch.Tensor) -> None:
    """Each named argument is a floating-point tensor of shape (batch, seq, heads, head_dim)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape (batch, seq, heads, head_dim), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def check_same_device_and_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_v_dim: bool = False) -> None:
    """q (B, N_q, H_q, D), k (B, N_kv, H_kv, D), v (B, N_kv, H_kv, D_v); H_q a multiple of H_kv."""
    check_bshd(q=q, k=k, v=v)
    b, nq, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"k, v: expected batch {b} (from q), got {k.shape[0]} and {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} (from q), got shape {tuple(k.shape)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected shape ({b}, {k.shape[1]}, {k.shape[2]}, head_dim_v) to match k, got "
                         f"{tuple(v.shape)}")
    if same_v_dim and v.shape[3] != d:
        raise ValueError(f"v: expected head_dim {d} (from q), got {v.shape[3]}")
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError(f"k: expected H_kv dividing H_q={hq} (GQA/MQA), got H_kv={k.shape[2]}")
    check_same_device_and_dtype(q, k, v)
    if min(nq, k.shape[1], d) == 0:
        raise ValueError(f"q, k: expected non-empty sequences and head_dim, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v.shape[3] == 0:
        raise ValueError(f"v: expected a non-empty head_dim_v, got shape {tuple(v.shape)}")


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {backend!r}")


def integer_or_none(value, least: int | None = None) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or a 0-d integer tensor: a length read off an array
    or a config is often one of those; not a bool) of at least ``least``; else None."""
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if least is None or value >= least else None


def is_real(x) -> bool:
    """A real number (NumPy's scalars included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def softcap_or_none(softcap):
    """FlashAttention's ``softcap=0.0`` means none."""
    return None if is_real(softcap) and softcap == 0 else softcap


def check_scale_softcap(scale, softcap) -> None:
    """``scale``: a finite number or None; ``softcap``: a positive finite number or None (``inf`` made every
    output NaN: ``inf * tanh(s / inf)``)."""
    if scale is not None and not (is_real(scale) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    if softcap is not None and not (is_real(softcap) and 0 < softcap < math.inf):
        raise ValueError(f"softcap: expected a positive finite number or None, got {softcap!r}")

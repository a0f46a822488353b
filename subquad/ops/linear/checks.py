"""Argument checks shared by the linear and delta-rule ops (ValueError naming the argument and the shape)."""

from __future__ import annotations

import math

import torch

from ..._checks import check_backend as _check_backend
from ..._checks import check_bshd, check_same_device_and_dtype
from ..grid import check_triton_device


def check_qkv_same_heads(q, k, v) -> None:
    """q, k (B, T, H, K); v (B, T, H, V)."""
    check_bshd(q=q, k=k, v=v)
    b, t, h, dk = q.shape
    if tuple(k.shape) != (b, t, h, dk):
        raise ValueError(f"k: expected shape {(b, t, h, dk)} (from q), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (b, t, h):
        raise ValueError(f"v: expected shape ({b}, {t}, {h}, head_dim_v) (from q), got {tuple(v.shape)}")
    if min(b, h, dk, v.shape[3]) == 0:
        raise ValueError(f"q, v: expected non-empty batch, heads and head dims, got {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    check_same_device_and_dtype(q, k, v)


def describe(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def step_inputs(q_t, k_t, v_t):
    """A decoding step's q, k, v: one token ``(B, H, D)`` or a few ``(B, T, H, D)``. Returns them 4-D and whether
    the call was for one token."""
    forms = "(batch, heads, head_dim) for one token or (batch, seq, heads, head_dim)"
    if not isinstance(q_t, torch.Tensor) or q_t.dim() not in (3, 4):
        raise ValueError(f"q_t: expected shape {forms}, got {describe(q_t)}")
    for name, t in (("k_t", k_t), ("v_t", v_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != q_t.dim():
            raise ValueError(f"{name}: expected a {q_t.dim()}-D tensor as q_t, shape {forms}, got {describe(t)}")
    one = q_t.dim() == 3
    return (*(t.unsqueeze(1) if one else t for t in (q_t, k_t, v_t)), one)


def one_token(value, name: str, shapes: list[tuple]):
    """A per-token argument of a one-token step, checked against ``shapes`` before it gets its token axis (so a
    wrong shape is reported as passed); returned as ``(B, 1, ...)``, or as it is if 1-D (per head)."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) not in shapes:
        raise ValueError(f"{name}: expected a tensor of shape {' or '.join(map(str, shapes))} for one token, got "
                         f"{describe(value)}")
    return value if value.dim() == 1 else value.unsqueeze(1)


def expand_log_decay(log_decay, q: torch.Tensor, *, allow_vector: bool = True,
                     name: str = "log_decay") -> torch.Tensor | None:
    """None | (H,) | (B, T, H) | (B, T, H, K) -> None | (B, T, H, 1) | (B, T, H, K), fp32."""
    if log_decay is None:
        return None
    b, t, h, dk = q.shape
    shapes = [(h,), (b, t, h)] + ([(b, t, h, dk)] if allow_vector else [])
    if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) not in shapes:
        raise ValueError(f"{name}: expected None or a tensor of shape {' or '.join(map(str, shapes))}, got "
                         f"{describe(log_decay)}")
    if not log_decay.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {log_decay.dtype}")
    if log_decay.device != q.device:
        raise ValueError(f"{name}: expected device {q.device}, got {log_decay.device}")
    g = log_decay.to(torch.promote_types(log_decay.dtype, torch.float32))
    if g.dim() == 1:
        return g.view(1, 1, h, 1).expand(b, t, h, 1)
    return g.unsqueeze(-1) if g.dim() == 3 else g


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    return float(scale)


def check_eps(eps) -> None:
    """The normaliser's floor, positive: with features >= 0 a row meets a zero denominator until some phi(k) shares
    its support (ReLU), and eps 0 made that 0 / 0 (NaN)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite number (added to the denominator), got {eps!r}")


def check_chunk_size(chunk_size, largest: int = 128) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > largest or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two in [16, {largest}], got {chunk_size!r}")
    return chunk_size


def check_cu_seqlens(cu_seqlens, q: torch.Tensor) -> int:
    """Returns the number of sequences (the batch size without cu_seqlens)."""
    if cu_seqlens is None:
        return q.shape[0]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens: expected a 1-D int32/int64 tensor (num_seqs + 1,) of cumulative lengths, got "
                         f"{cu_seqlens!r}")
    if q.shape[0] != 1:
        raise ValueError(f"q: expected batch 1 with cu_seqlens (sequences packed along seq), got {tuple(q.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing values from 0 to seq={q.shape[1]}, got {bounds}")
    return len(bounds) - 1


def check_state(state, name: str, n: int, h: int, dk: int, dv: int, device) -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != (n, h, dk, dv):
        got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"{name}: expected shape ({n}, {h}, {dk}, {dv}) (sequences, heads, d_k, d_v), got {got}")
    if state.device != device:
        raise ValueError(f"{name}: expected device {device}, got {state.device}")


def check_backend(backend: str) -> None:
    _check_backend(backend, ("auto", "triton", "reference"))


def pick_backend(backend: str, q: torch.Tensor, kernel_module: str) -> str:
    """auto: the Triton kernels on CUDA (when they import), the reference otherwise and for fp64 (the kernels
    compute in fp32: fp64 inputs ask for more, e.g. a gradcheck)."""
    if backend != "auto":
        if backend == "triton":
            check_triton_device(q)
        return backend
    if q.is_cuda and q.dtype != torch.float64:
        try:
            __import__(kernel_module)
        except ImportError:
            return "reference"
        return "triton"
    return "reference"

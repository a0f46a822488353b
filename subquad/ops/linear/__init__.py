"""Linear attention and decayed recurrences on one chunked engine: ``gla`` and its named forms
``linear_attention`` (feature maps), ``retention`` (RetNet), ``ssd`` (Mamba-2), plus one-token steps for decoding.

Recurrence (per batch and head), state ``S`` of shape ``(d_k, d_v)`` kept in fp32:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

``g_t = log_decay`` is None (no decay), a constant per head, a scalar per token and head, or a vector per token,
head and key dimension. States have shape ``(batch, heads, d_k, d_v)`` (``(num_seqs, ...)`` with ``cu_seqlens``).
"""

from __future__ import annotations

import logging

import torch

from .checks import (check_backend, check_chunk_size, check_cu_seqlens, check_qkv_same_heads, check_scale,
                     check_state, expand_log_decay, pick_backend)
from .feature_maps import CosFormer, Elu1, FeatureMap, Favor, Hedgehog, Identity, ReLU, apply_feature_map, \
    resolve_feature_map
from .reference import gla_reference, gla_step_reference, split_varlen

log = logging.getLogger("subquad")

_KERNELS = "subquad.ops.linear.chunk"


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None, *,
        scale: float | None = None, initial_state: torch.Tensor | None = None, output_state: bool = False,
        cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto"):
    """Decayed (gated) linear attention, chunked: the engine behind linear attention, RetNet, GLA and Mamba-2 SSD.

    Args:
        q, k: ``(B, T, H, K)``; v: ``(B, T, H, V)``.
        log_decay: log of the per-step decay, values <= 0 and finite (decay 1 is 0; decay near 0 is very
            negative): None (plain linear attention), ``(H,)`` constant per head (RetNet), ``(B, T, H)`` scalar per
            token (Mamba-2 SSD, simple GLA), or ``(B, T, H, K)`` per key dimension (GLA). Gradients flow to it.
        scale: multiplies q; defaults to ``K ** -0.5``.
        initial_state: ``(N, H, K, V)`` state before the first token (N = B, or the number of sequences with
            ``cu_seqlens``); any float dtype, used in fp32; differentiable.
        output_state: also return the final state ``(N, H, K, V)`` fp32 (differentiable).
        cu_seqlens: ``(N + 1,)`` int cumulative lengths of sequences packed along ``T`` (then B must be 1); each
            sequence starts from its own initial state (zeros by default).
        chunk_size: tokens per chunk (power of two, 16..128).
        backend: ``"auto"`` (Triton on CUDA, the reference otherwise), ``"triton"`` or ``"reference"``.
    Returns:
        ``o`` ``(B, T, H, V)`` in q's dtype, or ``(o, final_state)`` with ``output_state=True``.
    """
    check_backend(backend)
    check_qkv_same_heads(q, k, v)
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    g = expand_log_decay(log_decay, q)
    scale = check_scale(scale, dk)
    chunk_size = check_chunk_size(chunk_size)
    n_seqs = check_cu_seqlens(cu_seqlens, q)
    check_state(initial_state, "initial_state", n_seqs, heads, dk, dv, q.device)
    chosen = pick_backend(backend, q, _KERNELS)
    log.debug("subquad.gla: backend=%s, q=%s %s, decay=%s", chosen, tuple(q.shape), q.dtype,
              None if g is None else tuple(g.shape))
    if chosen == "triton":
        from .chunk import chunk_gla
        o, state = chunk_gla(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size)
    else:
        o, state = gla_reference(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size)
    return (o, state) if output_state else o


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor | None = None, *,
              scale: float | None = None, initial_state: torch.Tensor | None = None, output_state: bool = False,
              cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto"):
    """RetNet retention (Sun et al., 2023): a fixed decay ``gamma`` per head, ``o_t = sum_j gamma^(t-j) q_t k_j^T v_j``.

    ``gamma``: ``(H,)`` in (0, 1); defaults to RetNet's ``1 - 2^(-5 - h)``. Other arguments as ``gla``. The
    layer-level parts of RetNet (xPos, group norm, swish gate) belong to the nn layer.
    """
    heads = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    if gamma is None:
        if heads is None:
            raise ValueError(f"q: expected shape (batch, seq, heads, head_dim), got {getattr(q, 'shape', q)}")
        gamma = retnet_gammas(heads, q.device)
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or gamma.shape[0] != heads:
        raise ValueError(f"gamma: expected a tensor of shape ({heads},) with values in (0, 1), got "
                         f"{getattr(gamma, 'shape', gamma)}")
    return gla(q, k, v, gamma.float().log(), scale=scale, initial_state=initial_state, output_state=output_state,
               cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)


def retnet_gammas(heads: int, device=None) -> torch.Tensor:
    """RetNet's per-head decays ``1 - 2^(-5 - h)``, h = 0..heads-1 (for more than 1 head, spread over [5, 12])."""
    exps = torch.linspace(5.0, 12.0, heads, device=device) if heads > 1 else torch.full((1,), 5.0, device=device)
    return 1.0 - 2.0 ** (-exps)


def _ssd_args(x, dt, A, B, C):
    if not all(isinstance(t, torch.Tensor) for t in (x, dt, A, B, C)):
        raise ValueError("x, dt, A, B, C: expected tensors")
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    bsz, seq_len, heads, _ = x.shape
    if tuple(dt.shape) != (bsz, seq_len, heads):
        raise ValueError(f"dt: expected shape {(bsz, seq_len, heads)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (heads,):
        raise ValueError(f"A: expected shape ({heads},) (negative), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (bsz, seq_len) or B.shape[2] == 0 or heads % B.shape[2] != 0:
        raise ValueError(f"B: expected shape ({bsz}, {seq_len}, groups, d_state) with groups dividing {heads}, got "
                         f"{tuple(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C: expected shape {tuple(B.shape)} (as B), got {tuple(C.shape)}")
    rep = heads // B.shape[2]
    k = B.repeat_interleave(rep, dim=2) if rep > 1 else B
    q = C.repeat_interleave(rep, dim=2) if rep > 1 else C
    v = x * dt.unsqueeze(-1).to(x.dtype)
    acc = torch.promote_types(x.dtype, torch.float32)
    return q, k, v, dt.to(acc) * A.to(acc)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
        initial_state: torch.Tensor | None = None, output_state: bool = False,
        cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto"):
    """Mamba-2 state-space duality (Dao & Gu, 2024): ``h_t = exp(dt_t A) h_{t-1} + B_t^T (dt_t x_t)``,
    ``y_t = C_t h_t``, i.e. ``gla(q=C, k=B, v=x*dt, log_decay=dt*A, scale=1)``.

    Args:
        x: ``(B, T, H, P)``; dt: ``(B, T, H)`` positive (after softplus and bias); A: ``(H,)`` negative;
        B, C: ``(B, T, G, N)`` with G groups dividing H.
        initial_state: ``(B, H, N, P)`` (note: d_state first, as the engine's ``(d_k, d_v)``).
    Returns ``y`` (without the ``D * x`` skip, which the layer adds), or ``(y, state)``.
    """
    q, k, v, g = _ssd_args(x, dt, A, B, C)
    return gla(q, k, v, g, scale=1.0, initial_state=initial_state, output_state=output_state,
               cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)


def _feature_normaliser(fq, fk, z0, cu_seqlens):
    """Denominators ``fq_t . (z0 + sum_{j<=t} fk_j)`` (per packed sequence) and the final ``z``."""
    acc = torch.promote_types(fk.dtype, torch.float32)
    fq, fk = fq.to(acc), fk.to(acc)
    cs = fk.movedim(1, -1).cumsum(dim=-1).movedim(-1, 1)        # scan the innermost dim (fast on CUDA)
    if cu_seqlens is None:
        zc = cs + (0 if z0 is None else z0.to(acc).unsqueeze(1))
        return (fq * zc).sum(-1), zc[:, -1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=fk.device), lengths)
    padded = torch.cat([cs.new_zeros(1, 1, *cs.shape[2:]), cs], dim=1)
    base = padded[0, cu_seqlens[:-1].long()]                          # (N, H, K): sum before each sequence
    start = (z0.to(acc) if z0 is not None else torch.zeros_like(base)) - base
    zc = cs + start[seg].unsqueeze(0)
    z_final = padded[0, cu_seqlens[1:].long()] + start
    return (fq * zc).sum(-1), z_final


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map="elu1", *, causal: bool = True,
                     normalize: bool = True, scale: float | None = None, eps: float = 1e-6, offset: int = 0,
                     initial_state=None, output_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     chunk_size: int = 64, backend: str = "auto"):
    """Linear attention with a kernel feature map (Katharopoulos et al., 2020):
    ``o_t = phi(q_t) sum_j phi(k_j)^T v_j / (phi(q_t) . sum_j phi(k_j))`` over ``j <= t`` (all j if not causal).

    Args:
        feature_map: ``"elu1"``, ``"relu"``, ``"identity"``, a ``FeatureMap`` (``Favor``, ``CosFormer``,
            ``Hedgehog``) or any callable ``(B, T, H, D) -> (B, T, H, D')``.
        normalize: divide by the denominator (+ ``eps``); ``False`` gives the unnormalised form.
        offset: absolute position of the first token (for position-dependent maps such as cosFormer).
        initial_state: causal only: ``S`` ``(N, H, D', V)``, or with ``normalize`` the pair ``(S, z)`` with
            ``z`` ``(N, H, D')`` the running sum of ``phi(k)``. The final state has the same form.
        Others as ``gla``.
    """
    check_backend(backend)
    check_qkv_same_heads(q, k, v)
    phi = resolve_feature_map(feature_map)
    fq = apply_feature_map(phi, q, is_query=True, offset=offset)
    fk = apply_feature_map(phi, k, is_query=False, offset=offset)
    if fq.shape != fk.shape or fq.shape[:3] != q.shape[:3]:
        raise ValueError(f"feature_map: expected phi(q), phi(k) of one shape (B, T, H, D'), got {tuple(fq.shape)} "
                         f"and {tuple(fk.shape)}")
    scale = check_scale(scale, q.shape[-1])
    s0, z0 = (initial_state if normalize and initial_state is not None else (initial_state, None))
    n_seqs = check_cu_seqlens(cu_seqlens, q)
    if z0 is not None and (not isinstance(z0, torch.Tensor) or tuple(z0.shape) != (n_seqs, q.shape[2], fq.shape[-1])):
        raise ValueError(f"initial_state: expected (S, z) with z of shape {(n_seqs, q.shape[2], fq.shape[-1])}, got "
                         f"{getattr(z0, 'shape', z0)}")
    if not causal:
        if initial_state is not None or output_state:
            raise ValueError("initial_state / output_state: only defined for causal=True")
        return _linear_attention_full(fq, fk, v, scale, normalize, eps, cu_seqlens)
    o, s = gla(fq, fk, v, None, scale=scale, initial_state=s0, output_state=True, cu_seqlens=cu_seqlens,
               chunk_size=chunk_size, backend=backend)
    state = s
    if normalize:
        den, z = _feature_normaliser(fq, fk, z0, cu_seqlens)
        o = (o.to(den.dtype) / (scale * den + eps).unsqueeze(-1)).to(q.dtype)
        state = (s, z)
    return (o, state) if output_state else o


def _linear_attention_full(fq, fk, v, scale, normalize, eps, cu_seqlens):
    """Non-causal: ``phi(Q) (phi(K)^T V)`` per sequence, O(T) in time and memory."""
    lengths = [end - start for start, end in split_varlen(cu_seqlens, fq.shape[1])]
    acc = torch.promote_types(v.dtype, torch.float32)
    outs = []
    # one split per tensor, not a slice per sequence (each slice's backward is a full-length zero fill)
    for q_, k_, v_ in zip(*(t.split(lengths, dim=1) for t in (fq, fk, v))):
        q_, k_, v_ = q_.to(acc), k_.to(acc), v_.to(acc)
        o = scale * torch.einsum("bthk,bhkv->bthv", q_, torch.einsum("bthk,bthv->bhkv", k_, v_))
        if normalize:
            o = o / (scale * torch.einsum("bthk,bhk->bth", q_, k_.sum(1)) + eps).unsqueeze(-1)
        outs.append(o)
    return torch.cat(outs, dim=1).to(v.dtype)


def _step_inputs(q_t, k_t, v_t, log_decay_t):
    """One token (B, H, D) or a few (B, T, H, D) -> 4-D inputs and whether to squeeze the output."""
    one = isinstance(q_t, torch.Tensor) and q_t.dim() == 3
    if one:
        q_t, k_t, v_t = (t.unsqueeze(1) if isinstance(t, torch.Tensor) else t for t in (q_t, k_t, v_t))
        if isinstance(log_decay_t, torch.Tensor) and log_decay_t.dim() >= 2:
            log_decay_t = log_decay_t.unsqueeze(1)
    return q_t, k_t, v_t, log_decay_t, one


def gla_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: torch.Tensor | None,
             log_decay_t: torch.Tensor | None = None, *, scale: float | None = None, backend: str = "auto"):
    """Recurrent step for decoding: ``S = diag(exp(g)) S + k^T v; o = scale * q S``.

    Args:
        q_t, k_t: ``(B, H, K)`` for one token, or ``(B, T, H, K)`` for a few tokens in order; v_t likewise with V.
        state: ``(B, H, K, V)`` (None = zeros); any float dtype, returned in fp32.
        log_decay_t: None, ``(H,)``, ``(B, H)`` / ``(B, H, K)`` for one token, ``(B, T, H)`` / ``(B, T, H, K)``.
    Returns ``(o_t, state)`` with o_t shaped like v_t.
    """
    check_backend(backend)
    q4, k4, v4, g4, one = _step_inputs(q_t, k_t, v_t, log_decay_t)
    check_qkv_same_heads(q4, k4, v4)
    bsz, _, heads, dk = q4.shape
    dv = v4.shape[-1]
    g = expand_log_decay(g4, q4)
    scale = check_scale(scale, dk)
    check_state(state, "state", bsz, heads, dk, dv, q4.device)
    if state is None:
        state = q4.new_zeros(bsz, heads, dk, dv, dtype=torch.float32)
    if pick_backend(backend, q4, "subquad.ops.linear.recurrent") == "triton":
        from .recurrent import recurrent_gla
        o, state = recurrent_gla(q4, k4, v4, g, scale, state)
    else:
        o, state = gla_step_reference(q4, k4, v4, state, g, scale)
    return (o[:, 0] if one else o), state


def ssd_step(x_t: torch.Tensor, dt_t: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor, C_t: torch.Tensor,
             state: torch.Tensor | None, *, backend: str = "auto"):
    """Decoding step of ``ssd``: x_t ``(B, H, P)``, dt_t ``(B, H)``, A ``(H,)``, B_t, C_t ``(B, G, N)``, state
    ``(B, H, N, P)`` or None. Returns ``(y_t, state)``."""
    for name, t, dims in (("x_t", x_t, 3), ("dt_t", dt_t, 2), ("B_t", B_t, 3), ("C_t", C_t, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name}: expected a {dims}-D tensor (one token), got {getattr(t, 'shape', t)}")
    q, k, v, g = _ssd_args(x_t.unsqueeze(1), dt_t.unsqueeze(1), A, B_t.unsqueeze(1), C_t.unsqueeze(1))
    y, state = gla_step(q, k, v, state, g, scale=1.0, backend=backend)
    return y[:, 0], state


def linear_attention_step(q_t, k_t, v_t, state=None, feature_map="elu1", *, normalize: bool = True,
                          scale: float | None = None, eps: float = 1e-6, offset: int = 0, backend: str = "auto"):
    """Decoding step of ``linear_attention`` (causal). ``state`` is ``S`` or, with ``normalize``, ``(S, z)``
    (None = empty); ``offset`` is the position of this token (cosFormer). Returns ``(o_t, state)``."""
    q4, k4, v4, _, one = _step_inputs(q_t, k_t, v_t, None)
    check_qkv_same_heads(q4, k4, v4)
    phi = resolve_feature_map(feature_map)
    fq = apply_feature_map(phi, q4, is_query=True, offset=offset)
    fk = apply_feature_map(phi, k4, is_query=False, offset=offset)
    scale = check_scale(scale, q4.shape[-1])
    s, z = (state if normalize and state is not None else (state, None))
    o, s = gla_step(fq, fk, v4, s, None, scale=scale, backend=backend)
    new_state = s
    if normalize:
        acc = torch.promote_types(fk.dtype, torch.float32)
        zc = fk.to(acc).cumsum(1) + (0 if z is None else z.to(acc).unsqueeze(1))
        o = (o.to(acc) / (scale * (fq.to(acc) * zc).sum(-1) + eps).unsqueeze(-1)).to(q4.dtype)
        new_state = (s, zc[:, -1])
    return (o[:, 0] if one else o), new_state


__all__ = ["gla", "retention", "retnet_gammas", "ssd", "ssd_step", "linear_attention", "gla_step", "linear_attention_step",
           "FeatureMap", "Elu1", "ReLU", "Identity", "Favor", "CosFormer", "Hedgehog"]

"""Linear attention and decayed recurrences on one chunked engine: ``gla`` and its named forms
``linear_attention`` (feature maps), ``retention`` (RetNet), ``ssd`` (Mamba-2), plus one-token steps for decoding.

Recurrence (per batch and head), state ``S`` of shape ``(d_k, d_v)`` kept in fp32 (fp64 for fp64 inputs):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

``g_t = log_decay`` is None (no decay), a constant per head, a scalar per token and head, or a vector per token,
head and key dimension. States have shape ``(batch, heads, d_k, d_v)`` (``(num_seqs, ...)`` with ``cu_seqlens``).
"""

from __future__ import annotations

import logging

import torch

from .checks import (check_backend, check_chunk_size, check_cu_seqlens, check_eps, check_qkv_same_heads, check_scale,
                     check_state, describe, expand_log_decay, one_token, pick_backend, step_inputs)
from .feature_maps import CosFormer, Elu1, FeatureMap, Favor, Hedgehog, Identity, ReLU, apply_feature_map, \
    resolve_feature_map
from .reference import gla_reference, gla_step_reference, no_tokens, split_varlen

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
            ``cu_seqlens``); any float dtype, used in fp32 (fp64 for fp64 inputs); differentiable.
        output_state: also return the final state ``(N, H, K, V)`` fp32 (fp64 for fp64 inputs; differentiable).
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
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):    # dynamo cannot trace loggers
        log.debug("subquad.gla: backend=%s, q=%s %s, decay=%s", chosen, tuple(q.shape), q.dtype,
                  None if g is None else tuple(g.shape))
    if seq_len == 0:
        o, state = no_tokens(v, initial_state, n_seqs, dk)
    elif chosen == "triton":
        from .chunk import chunk_gla
        o, state = chunk_gla(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size)
    else:
        o, state = gla_reference(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size)
    return (o, state) if output_state else o


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor | None = None, *,
              scale: float | None = None, initial_state: torch.Tensor | None = None, output_state: bool = False,
              cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto"):
    """RetNet retention (Sun et al., 2023): a fixed decay ``gamma`` per head, ``o_t = sum_j gamma^(t-j) q_t k_j^T v_j``.

    ``gamma``: ``(H,)`` in (0, 1); defaults to RetNet's ``1 - 2^(-5 - h)``, h = 0..H-1. Other arguments as ``gla``. The
    layer-level parts of RetNet (xPos, group norm, swish gate) belong to the nn layer.
    """
    return gla(q, k, v, retention_log_decay(q, gamma), scale=scale, initial_state=initial_state,
               output_state=output_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)


def retention_log_decay(q: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """``retention``'s log decay ``(H,)`` for q's heads: ``log(gamma)``, RetNet's decays when ``gamma`` is None."""
    heads = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    if gamma is None:
        if heads is None:
            raise ValueError(f"q: expected shape (batch, seq, heads, head_dim), got {getattr(q, 'shape', q)}")
        gamma = retnet_gammas(heads, q.device)
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or gamma.shape[0] != heads:
        raise ValueError(f"gamma: expected a tensor of shape ({heads},) with values in (0, 1), got "
                         f"{getattr(gamma, 'shape', gamma)}")
    # fp64 gamma with fp64 inputs keeps its digits (a gradcheck); otherwise fp32, as the kernels and the steps take
    return gamma.to(torch.float64 if gamma.dtype == q.dtype == torch.float64 else torch.float32).log()


def retnet_gammas(heads: int, device=None) -> torch.Tensor:
    """RetNet's per-head decays ``1 - 2^(-5 - h)``, h = 0..heads-1 (as the paper, torchscale and fla)."""
    return 1.0 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32, device=device))


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
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")
    for name, t in (("B", B), ("C", C)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
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
    fq = fq.to(acc)
    if cu_seqlens is None:
        fk = fk.to(acc)
        start = fk.new_zeros(fk.shape[0], *fk.shape[2:]) if z0 is None else z0.to(acc)
        zc = _token_cumsum(fk) + start.unsqueeze(1)
        return (fq * zc).sum(-1), start + fk.sum(1)
    # One scan over the whole pack less the sum before each sequence: that sum grows with the position in the pack,
    # and in fp32 the difference keeps only ~7 digits of it (1e-3 off after 64k tokens), so the scan is in fp64.
    cs = _token_cumsum(fk.double())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=fk.device), lengths)
    padded = torch.cat([cs.new_zeros(1, 1, *cs.shape[2:]), cs], dim=1)
    base = padded[0, cu_seqlens[:-1].long()]                          # (N, H, K): sum before each sequence
    start = (z0.double() if z0 is not None else torch.zeros_like(base)) - base
    zc = (cs + start[seg].unsqueeze(0)).to(acc)
    z_final = (padded[0, cu_seqlens[1:].long()] + start).to(acc)
    return (fq * zc).sum(-1), z_final


def _token_cumsum(x):
    return x.movedim(1, -1).cumsum(dim=-1).movedim(-1, 1)        # scans the innermost dim (fast on CUDA)


# phi(q_t) / (scale den_t + eps) falls like 1/t from below 1: in fp16 it would sink into the subnormals (below 6e-5,
# fewer digits) after a few thousand tokens, so the engine gets it this much larger, with the scale as much smaller
# (a power of two: exact). 256 keeps it normal some 10^5 tokens longer (d = 64) and finite up to 256.
_NORMALISED_Q_GAIN = 256.0


def _normalised_queries(fq, den, scale, eps):
    """Queries and scale that make the engine's output the normalised one (it is linear in q_t), rather than the
    numerator, which grows with t and in fp16 overflows 65504 within a few thousand tokens of values of mean 1.
    Returns ``phi(q) * gain / (scale den + eps)`` in phi(q)'s dtype and ``scale / gain``."""
    fq_n = fq.to(den.dtype) * (_NORMALISED_Q_GAIN / (scale * den + eps)).unsqueeze(-1)
    # a zero denominator (features >= 0, none of phi(k) yet) gives phi(q) / eps, past fp16's range; the state's rows
    # it meets are zero, so a finite query keeps the output 0 (inf * 0 would be NaN)
    big = torch.finfo(fq.dtype).max
    return fq_n.clamp(-big, big).to(fq.dtype), scale / _NORMALISED_Q_GAIN


def _state_pair(state, name, n, heads, d_feat, dv):
    """With ``normalize``, the state is the pair ``(S, z)``; S is checked by the engine."""
    expected = f"(S, z) with normalize=True, S of shape {(n, heads, d_feat, dv)} and z of shape {(n, heads, d_feat)}"
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"{name}: expected {expected}, got {describe(state)}")
    s, z = state
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != (n, heads, d_feat):
        raise ValueError(f"{name}: expected {expected}, got z {describe(z)}")
    return s, z


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
        offset: absolute position of the first token (for position-dependent maps such as cosFormer; with
            ``cu_seqlens``, of each sequence's first token).
        initial_state: causal only: ``S`` ``(N, H, D', V)``, or with ``normalize`` the pair ``(S, z)`` with
            ``z`` ``(N, H, D')`` the running sum of ``phi(k)``. The final state has the same form.
        Others as ``gla``.
    """
    check_backend(backend)
    check_qkv_same_heads(q, k, v)
    phi = resolve_feature_map(feature_map)
    n_seqs = check_cu_seqlens(cu_seqlens, q)
    lengths = None if cu_seqlens is None else [end - start for start, end in split_varlen(cu_seqlens, q.shape[1])]
    fq = apply_feature_map(phi, q, is_query=True, offset=offset, lengths=lengths)
    fk = apply_feature_map(phi, k, is_query=False, offset=offset, lengths=lengths)
    if fq.dim() != 4 or fq.shape != fk.shape or fq.shape[:3] != q.shape[:3]:
        raise ValueError(f"feature_map: expected phi(q), phi(k) of one shape (B, T, H, D'), got {tuple(fq.shape)} "
                         f"and {tuple(fk.shape)}")
    scale = check_scale(scale, q.shape[-1])
    if normalize:
        check_eps(eps)
    s0, z0 = initial_state, None
    if normalize and initial_state is not None:
        s0, z0 = _state_pair(initial_state, "initial_state", n_seqs, q.shape[2], fq.shape[-1], v.shape[-1])
    if not causal:
        if initial_state is not None or output_state:
            raise ValueError("initial_state / output_state: only defined for causal=True")
        return _linear_attention_full(fq, fk, v, scale, normalize, eps, cu_seqlens)
    if not normalize:
        return gla(fq, fk, v, None, scale=scale, initial_state=s0, output_state=output_state, cu_seqlens=cu_seqlens,
                   chunk_size=chunk_size, backend=backend)
    den, z = _feature_normaliser(fq, fk, z0, cu_seqlens)
    fq_n, scale_n = _normalised_queries(fq, den, scale, eps)
    o, s = gla(fq_n, fk, v, None, scale=scale_n, initial_state=s0, output_state=True, cu_seqlens=cu_seqlens,
               chunk_size=chunk_size, backend=backend)
    return (o, (s, z)) if output_state else o


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


def gla_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: torch.Tensor | None,
             log_decay_t: torch.Tensor | None = None, *, scale: float | None = None, backend: str = "auto"):
    """Recurrent step for decoding: ``S = diag(exp(g)) S + k^T v; o = scale * q S``.

    Args:
        q_t, k_t: ``(B, H, K)`` for one token, or ``(B, T, H, K)`` for a few tokens in order; v_t likewise with V.
        state: ``(B, H, K, V)`` (None = zeros); any float dtype, returned in fp32 (fp64 for fp64 inputs).
        log_decay_t: None, ``(H,)``, ``(B, H)`` / ``(B, H, K)`` for one token, ``(B, T, H)`` / ``(B, T, H, K)``.
    Returns ``(o_t, state)`` with o_t shaped like v_t.
    """
    check_backend(backend)
    q4, k4, v4, one = step_inputs(q_t, k_t, v_t)
    check_qkv_same_heads(q4, k4, v4)
    bsz, n_tokens, heads, dk = q4.shape
    dv = v4.shape[-1]
    if one and log_decay_t is not None:
        log_decay_t = one_token(log_decay_t, "log_decay_t", [(heads,), (bsz, heads), (bsz, heads, dk)])
    g = expand_log_decay(log_decay_t, q4, name="log_decay_t")
    scale = check_scale(scale, dk)
    check_state(state, "state", bsz, heads, dk, dv, q4.device)
    chosen = pick_backend(backend, q4, "subquad.ops.linear.recurrent")
    if n_tokens == 0:
        return no_tokens(v4, state, bsz, dk)
    if state is None:
        state = q4.new_zeros(bsz, heads, dk, dv, dtype=torch.float32)
    if chosen == "triton":
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
    # shapes checked as passed: _ssd_args would name them with the token axis added
    bsz, heads = x_t.shape[:2]
    if tuple(dt_t.shape) != (bsz, heads):
        raise ValueError(f"dt_t: expected shape {(bsz, heads)}, got {tuple(dt_t.shape)}")
    if B_t.shape[0] != bsz or B_t.shape[1] == 0 or heads % B_t.shape[1] != 0:
        raise ValueError(f"B_t: expected shape ({bsz}, groups, d_state) with groups dividing {heads}, got "
                         f"{tuple(B_t.shape)}")
    if C_t.shape != B_t.shape:
        raise ValueError(f"C_t: expected shape {tuple(B_t.shape)} (as B_t), got {tuple(C_t.shape)}")
    q, k, v, g = _ssd_args(x_t.unsqueeze(1), dt_t.unsqueeze(1), A, B_t.unsqueeze(1), C_t.unsqueeze(1))
    y, state = gla_step(q, k, v, state, g, scale=1.0, backend=backend)
    return y[:, 0], state


def linear_attention_step(q_t, k_t, v_t, state=None, feature_map="elu1", *, normalize: bool = True,
                          scale: float | None = None, eps: float = 1e-6, offset: int = 0, backend: str = "auto"):
    """Decoding step of ``linear_attention`` (causal). ``state`` is ``S`` or, with ``normalize``, ``(S, z)``
    (None = empty); ``offset`` is the position of this token (cosFormer). Returns ``(o_t, state)``."""
    q4, k4, v4, one = step_inputs(q_t, k_t, v_t)
    check_qkv_same_heads(q4, k4, v4)
    phi = resolve_feature_map(feature_map)
    fq = apply_feature_map(phi, q4, is_query=True, offset=offset)
    fk = apply_feature_map(phi, k4, is_query=False, offset=offset)
    scale = check_scale(scale, q4.shape[-1])
    if not normalize:
        o, s = gla_step(fq, fk, v4, state, None, scale=scale, backend=backend)
        return (o[:, 0] if one else o), s
    check_eps(eps)
    s, z = (None, None) if state is None else \
        _state_pair(state, "state", q4.shape[0], q4.shape[2], fk.shape[-1], v4.shape[-1])
    den, z = _feature_normaliser(fq, fk, z, None)
    fq_n, scale_n = _normalised_queries(fq, den, scale, eps)
    o, s = gla_step(fq_n, fk, v4, s, None, scale=scale_n, backend=backend)
    return (o[:, 0] if one else o), (s, z)


__all__ = ["gla", "retention", "retnet_gammas", "ssd", "ssd_step", "linear_attention", "gla_step", "linear_attention_step",
           "FeatureMap", "Elu1", "ReLU", "Identity", "Favor", "CosFormer", "Hedgehog"]

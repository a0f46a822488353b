"""Delta rule (DeltaNet) and gated delta rule (Gated DeltaNet), chunked with the WY representation.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = scale * q_t S_t

with ``a_t = exp(log_decay_t)`` (gated DeltaNet) or 1 (DeltaNet). States ``(batch, heads, d_k, d_v)`` fp32
(fp64 for fp64 inputs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..linear.checks import (check_backend, check_chunk_size, check_cu_seqlens, check_qkv_same_heads, check_scale,
                             check_state, expand_log_decay, one_token, pick_backend, step_inputs)
from ..linear.reference import no_tokens
from .reference import delta_rule_reference, delta_rule_step_reference

log = logging.getLogger("subquad")


def _check_beta(beta, q, name="beta"):
    b, t, h, _ = q.shape
    if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != (b, t, h):
        raise ValueError(f"{name}: expected a tensor of shape {(b, t, h)} (values in [0, 1]; 2 allows negative "
                         f"eigenvalues), got {tuple(beta.shape) if isinstance(beta, torch.Tensor) else beta!r}")
    if beta.device != q.device:
        raise ValueError(f"{name}: expected device {q.device}, got {beta.device}")


def _scalar_decay(log_decay, q, name="log_decay"):
    g = expand_log_decay(log_decay, q, allow_vector=False, name=name)
    return None if g is None else g[..., 0]


def _l2norm(x):
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=1e-6).to(x.dtype)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               log_decay: torch.Tensor | None = None, *, scale: float | None = None, qk_l2norm: bool = True,
               initial_state: torch.Tensor | None = None, output_state: bool = False,
               cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, backend: str = "auto"):
    """DeltaNet / gated DeltaNet, chunked (WY / UT transform).

    Args:
        q, k: ``(B, T, H, K)``; v: ``(B, T, H, V)``; beta: ``(B, T, H)`` writing strength (sigmoid output).
        log_decay: None (DeltaNet), ``(H,)`` or ``(B, T, H)`` log of the gate ``alpha_t`` (gated DeltaNet), <= 0.
        qk_l2norm: L2-normalise q and k over the head dim first (as the papers do; keeps the update a
            contraction). Gradients flow through the normalisation.
        scale, initial_state, output_state, cu_seqlens, backend: as ``subquad.gla``.
        chunk_size: 16, 32 or 64.
    Returns ``o`` ``(B, T, H, V)``, or ``(o, final_state)``.
    """
    check_backend(backend)
    check_qkv_same_heads(q, k, v)
    _check_beta(beta, q)
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    g = _scalar_decay(log_decay, q)
    scale = check_scale(scale, dk)
    # 128-row chunks: the GPU test at chunk 128 did not finish in 150 s on the H100 (the WY kernels hold fp32
    # C x C tiles; the other sizes take seconds), and fla's delta rule runs 64
    chunk_size = check_chunk_size(chunk_size, largest=64)
    n_seqs = check_cu_seqlens(cu_seqlens, q)
    check_state(initial_state, "initial_state", n_seqs, heads, dk, dv, q.device)
    if qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    chosen = pick_backend(backend, q, "subquad.ops.delta.chunk")
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):    # dynamo cannot trace loggers
        log.debug("subquad.delta_rule: backend=%s, q=%s %s, gated=%s", chosen, tuple(q.shape), q.dtype,
                  g is not None)
    if chosen == "triton":
        from .chunk import chunk_delta_rule
        o, state = chunk_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens, chunk_size)
    else:
        o, state = delta_rule_reference(q, k, v, beta, g, scale, initial_state, cu_seqlens, chunk_size)
    return (o, state) if output_state else o


def delta_rule_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, beta_t: torch.Tensor,
                    state: torch.Tensor | None, log_decay_t: torch.Tensor | None = None, *, scale: float | None = None,
                    qk_l2norm: bool = True, backend: str = "auto"):
    """Recurrent step for decoding. q_t, k_t ``(B, H, K)`` (one token) or ``(B, T, H, K)`` (a few, in order);
    v_t likewise; beta_t ``(B, H)`` / ``(B, T, H)``; log_decay_t None, ``(H,)``, ``(B, H)`` / ``(B, T, H)``;
    state ``(B, H, K, V)`` or None. Returns ``(o_t, state)`` (state fp32, fp64 for fp64
    inputs)."""
    check_backend(backend)
    q_t, k_t, v_t, one = step_inputs(q_t, k_t, v_t)
    check_qkv_same_heads(q_t, k_t, v_t)
    bsz, n_tokens, heads, dk = q_t.shape
    if one:
        beta_t = one_token(beta_t, "beta_t", [(bsz, heads)])
        if log_decay_t is not None:
            log_decay_t = one_token(log_decay_t, "log_decay_t", [(heads,), (bsz, heads)])
    _check_beta(beta_t, q_t, "beta_t")
    g = _scalar_decay(log_decay_t, q_t, "log_decay_t")
    scale = check_scale(scale, dk)
    check_state(state, "state", bsz, heads, dk, v_t.shape[-1], q_t.device)
    chosen = pick_backend(backend, q_t, "subquad.ops.delta.recurrent")
    if n_tokens == 0:
        return no_tokens(v_t, state, bsz, dk)
    if state is None:
        state = q_t.new_zeros(bsz, heads, dk, v_t.shape[-1], dtype=torch.float32)
    if qk_l2norm:
        q_t, k_t = _l2norm(q_t), _l2norm(k_t)
    if chosen == "triton":
        from .recurrent import recurrent_delta_rule
        o, state = recurrent_delta_rule(q_t, k_t, v_t, beta_t, g, scale, state)
    else:
        o, state = delta_rule_step_reference(q_t, k_t, v_t, beta_t, state, g, scale)
    return (o[:, 0] if one else o), state


__all__ = ["delta_rule", "delta_rule_step"]

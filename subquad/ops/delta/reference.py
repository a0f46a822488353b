"""Plain-PyTorch chunked delta rule (DeltaNet, gated DeltaNet): the CPU path and the specification.

Recurrence (per batch and head), with ``a_t = exp(g_t)`` (1 without gating), state ``S`` ``(d_k, d_v)`` in fp32:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = scale * q_t S_t

Chunked with the WY representation (Schlag et al. 2021; Yang et al. 2024): inside a chunk with state ``S`` at its
start and ``Gamma_ij = exp(b_i - b_j)`` (``b`` the cumulative log-decay, ``i >= j``), the corrected values
``v_new_t = beta_t (v_t - k_t . S_{t-1})`` solve a unit lower-triangular system
``(I + A) v_new = beta v - beta exp(b) k S`` with ``A_ij = beta_i (k_i . k_j) Gamma_ij`` for ``i > j``. So
``v_new = u - w S`` with ``u = T beta v``, ``w = T (beta exp(b) k)``, ``T = (I + A)^-1`` (the UT transform), after
which the chunk is the decayed linear-attention chunk with values ``v_new``.
"""

from __future__ import annotations

import torch

from ..linear.reference import chunks, over_sequences, split_varlen


def wy_transform(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, b: torch.Tensor | None):
    """One chunk, (B, H, n, ·) fp32: returns ``w`` (n, K), ``u`` (n, V) and the decay matrix ``Gamma`` (n, n)."""
    n = k.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    if b is None:
        gamma = causal.to(k.dtype).expand(*k.shape[:2], n, n)
        kb = k * beta.unsqueeze(-1)
    else:
        gamma = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
        kb = k * (beta * b.exp()).unsqueeze(-1)
    a = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    rhs = torch.cat([kb, v * beta.unsqueeze(-1)], dim=-1)
    wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    return wu[..., :k.shape[-1]], wu[..., k.shape[-1]:], gamma


def _delta_chunk_scan(q, k, v, beta, g, s0, chunk_size):
    """q, k (B, H, T, K) fp32 (q scaled), v (B, H, T, V), beta (B, H, T), g None | (B, H, T); s0 (B, H, K, V)."""
    state = s0
    outs = []
    count = -(-q.shape[2] // chunk_size)
    for qc, kc, vc, bc, gc in zip(*(chunks(t, chunk_size, count) for t in (q, k, v, beta, g))):
        b = None if gc is None else gc.cumsum(dim=2)
        w, u, gamma = wy_transform(kc, vc, bc, b)
        v_new = u - w @ state
        scores = (qc @ kc.transpose(-1, -2)) * gamma
        if b is None:
            outs.append(qc @ state + scores @ v_new)
            state = state + kc.transpose(-1, -2) @ v_new
        else:
            b_last = b[:, :, -1:]
            outs.append((qc * b.exp().unsqueeze(-1)) @ state + scores @ v_new)
            state = b_last.exp().unsqueeze(-1) * state + (kc * (b_last - b).exp().unsqueeze(-1)).transpose(-1, -2) @ v_new
    return torch.cat(outs, dim=2), state


def delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         log_decay: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64):
    """q, k (B, T, H, K) (already L2-normalised if wanted), v (B, T, H, V), beta (B, T, H), log_decay None or
    (B, T, H); initial_state (N, H, K, V). Returns o (B, T, H, V) in q's dtype and the final state fp32."""
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    to_bht = lambda t: t.to(acc).transpose(1, 2)  # noqa: E731
    qf, kf, vf, bf = to_bht(q) * scale, to_bht(k), to_bht(v), to_bht(beta)
    gf = None if log_decay is None else to_bht(log_decay)
    if initial_state is None:
        n = len(split_varlen(cu_seqlens, seq_len)) if cu_seqlens is not None else bsz
        initial_state = q.new_zeros(n, heads, dk, dv, dtype=acc)
    scan = lambda q, k, v, beta, g, s0: _delta_chunk_scan(q, k, v, beta, g, s0, chunk_size)  # noqa: E731
    o, finals = over_sequences(scan, [qf, kf, vf, bf, gf], initial_state.to(acc), cu_seqlens, seq_len)
    return o.transpose(1, 2).to(q.dtype), finals


def delta_rule_step_reference(q, k, v, beta, state, log_decay, scale):
    """Token-by-token over (B, T, H, ·): returns o (B, T, H, V) and the new state fp32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    state = state.to(acc)
    outs = []
    for t in range(q.shape[1]):
        if log_decay is not None:
            state = log_decay[:, t].to(acc).exp()[..., None, None] * state
        kt, vt, bt = k[:, t].to(acc), v[:, t].to(acc), beta[:, t].to(acc)
        v_new = bt.unsqueeze(-1) * (vt - torch.einsum("bhk,bhkv->bhv", kt, state))
        state = state + kt.unsqueeze(-1) * v_new.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc) * scale, state))
    return torch.stack(outs, dim=1).to(q.dtype), state

"""Plain-PyTorch chunked form of decayed linear attention: the CPU path and the specification.

The recurrence (per batch, head), with ``g_t`` the log-decay (a scalar, or one value per key dimension):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          S: (d_k, d_v), kept in fp32
    o_t = scale * q_t S_t

Chunked form: inside a chunk of ``C`` tokens the outputs are a masked, decayed ``Q K^T`` times ``V`` (parallel);
across chunks only the state is carried. With ``b`` the cumulative log-decay inside the chunk, every exponent
used is a difference ``b_i - b_j`` with ``i`` at or after ``j``, so it is <= 0: decays near 0 underflow to 0
instead of overflowing, which dividing by a cumulative product would not.
Memory is linear in the sequence length (one chunk of scores at a time).
"""

from __future__ import annotations

import torch


def split_varlen(cu_seqlens: torch.Tensor | None, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence; the whole sequence when ``cu_seqlens`` is None."""
    if cu_seqlens is None:
        return [(0, seq_len)]
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def no_tokens(v: torch.Tensor, initial_state: torch.Tensor | None, n_states: int,
              dk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A call with no tokens (the kernels' tables and launches, and the step loop, assume some): the empty output
    in v's dtype, and the initial state (zeros if None) as the final one, in the working dtype like a scan's."""
    acc = torch.promote_types(v.dtype, torch.float32)
    if initial_state is None:
        return v.clone(), v.new_zeros(n_states, v.shape[2], dk, v.shape[3], dtype=acc)
    return v.clone(), initial_state.to(acc, copy=True)


def chunks(t: torch.Tensor | None, size: int, count: int) -> list:
    """``t`` (B, H, T, ...) split along T into pieces of ``size``: the outputs of one split, whose backward is
    one concatenation (a slice per piece would fill a zero gradient as long as ``t`` each, O(T^2 / size) in
    all). ``count`` Nones for an absent tensor."""
    return [None] * count if t is None else list(t.split(size, dim=2))


def over_sequences(scan, tensors: list, initial_state: torch.Tensor, cu_seqlens: torch.Tensor | None,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``scan(*pieces, s0) -> (o, state)`` over each packed sequence of (B, H, T, ...) ``tensors`` (the
    first three are q, k, v; None stays None), each from its own initial state; an empty sequence keeps its
    state. Returns the outputs concatenated along T and the final states along dim 0."""
    segments = split_varlen(cu_seqlens, seq_len)
    lengths = [end - start for start, end in segments]
    pieces = [[None] * len(lengths) if t is None else t.split(lengths, dim=2) for t in tensors]
    states = initial_state.split(1, dim=0) if cu_seqlens is not None else [initial_state]
    outs, finals = [], []
    for i, length in enumerate(lengths):
        if length == 0:
            outs.append(pieces[2][i])
            finals.append(states[i])
            continue
        o, state = scan(*(p[i] for p in pieces), states[i])
        outs.append(o)
        finals.append(state)
    return torch.cat(outs, dim=2), torch.cat(finals, dim=0)


def _chunk_scan(q, k, v, g, s0, chunk_size):
    """q, k (B, H, T, K) fp32 (q already scaled), v (B, H, T, V), g None | (B, H, T, 1) | (B, H, T, K);
    s0 (B, H, K, V) fp32. Returns o (B, H, T, V) fp32 and the final state."""
    state = s0
    outs = []
    count = -(-q.shape[2] // chunk_size)
    for qc, kc, vc, gc in zip(*(chunks(t, chunk_size, count) for t in (q, k, v, g))):
        n = qc.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if g is None:
            scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
            outs.append(qc @ state + scores @ vc)
            state = state + kc.transpose(-1, -2) @ vc
            continue
        b = gc.cumsum(dim=2)                                             # (B, H, n, 1 or K), <= 0
        diff = (b.unsqueeze(3) - b.unsqueeze(2))                          # (B, H, i, j, 1 or K): b_i - b_j
        decay = diff.masked_fill(~causal[:, :, None], float("-inf")).exp()
        if g.shape[-1] == 1:
            scores = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
        else:
            scores = torch.einsum("bhid,bhjd,bhijd->bhij", qc, kc, decay)
        b_last = b[:, :, -1:]                                             # (B, H, 1, 1 or K)
        outs.append((qc * b.exp()) @ state + scores @ vc)
        state = b_last.transpose(-1, -2).exp() * state + (kc * (b_last - b).exp()).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), state


def gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                  scale: float, initial_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                  chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked decayed linear attention.

    Args:
        q, k: ``(B, T, H, K)``; v: ``(B, T, H, V)``.
        log_decay: None, or ``(B, T, H, 1)`` / ``(B, T, H, K)`` (already expanded; values <= 0).
        initial_state: ``(N, H, K, V)`` with N = B, or the number of packed sequences with ``cu_seqlens``.
    Returns:
        o ``(B, T, H, V)`` in q's dtype, final state ``(N, H, K, V)`` fp32.
    """
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    to_bhtd = lambda t: t.to(acc).transpose(1, 2)  # noqa: E731
    qf, kf, vf = to_bhtd(q) * scale, to_bhtd(k), to_bhtd(v)
    gf = None if log_decay is None else to_bhtd(log_decay)
    if initial_state is None:
        n_states = len(split_varlen(cu_seqlens, seq_len)) if cu_seqlens is not None else bsz
        initial_state = q.new_zeros(n_states, heads, dk, dv, dtype=acc)
    scan = lambda q, k, v, g, s0: _chunk_scan(q, k, v, g, s0, chunk_size)  # noqa: E731
    o, finals = over_sequences(scan, [qf, kf, vf, gf], initial_state.to(acc), cu_seqlens, seq_len)
    return o.transpose(1, 2).to(q.dtype), finals


def gla_step_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                       log_decay: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence over ``(B, T, H, ·)`` inputs (decoding). log_decay None | (B, T, H, 1 or K).
    Returns o ``(B, T, H, V)`` in q's dtype and the new state (fp32)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    state = state.to(acc)
    outs = []
    for t in range(q.shape[1]):
        if log_decay is not None:
            state = log_decay[:, t].to(acc).exp().unsqueeze(-1) * state
        state = state + k[:, t].to(acc).unsqueeze(-1) * v[:, t].to(acc).unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc) * scale, state))
    return torch.stack(outs, dim=1).to(q.dtype), state

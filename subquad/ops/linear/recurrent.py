"""Fused recurrent kernel for decoding: a few tokens, state in, state out, one program per (batch, head, V block).

Memory bound: each step reads and writes the fp32 state once; the state block ``(K, BV)`` stays in registers
over the tokens of the call. ``DELTA`` switches to the delta-rule update
``v_new = beta (v - k S)``, ``S += k^T v_new`` (used by ``subquad.delta_rule_step``). No gradients: under autograd
the step functions run the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grid import cdiv, launch_split, next_power_of_2


@triton.jit(do_not_specialize=["pid_offset"])
def recurrent_step(q, k, v, g, beta, state, new_state, o, scale, T, pid_offset,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   GATE: tl.constexpr, DELTA: tl.constexpr, WIDE_ROWS: tl.constexpr = False):
    """q, k (B, T, H, K), v, o (B, T, H, V); g None | (B, T, H) | (B, T, H, K); beta (B, T, H); state (B, H, K, V).
    ``pid_offset``: the batch rows of the launches before this one (``grid.launch_split``)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    # (pid_offset counts batch rows, so that the head stays the program id's alone: as chunk_fwd.state_fwd's)
    i_b, i_h = i_bh // H + pid_offset, i_bh % H
    i_bh += pid_offset * H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    s = tl.load(state + p_state, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(T):
        row = (i_b * T + t) * H + i_h
        if WIDE_ROWS:
            # a row's offset, row x K, reaches 2^31 elements (2^31 / (H K) tokens in all: 128k of 64 heads of
            # 256): int64, where int32 wrapped; the rest keep int32 (an int64 base per program, stepped on by a
            # token, cost 5-10 instructions and up to 8 registers a step: Triton 3.6, sm90)
            row = (i_b.to(tl.int64) * T + t) * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if GATE == 1:
            s *= tl.exp(tl.load(g + row))
        if GATE == 2:
            s *= tl.exp(tl.load(g + row * K + o_k, mask=m_k, other=0.0))[:, None]
        if DELTA:
            b_v = tl.load(beta + row).to(tl.float32) * (b_v - tl.sum(b_k[:, None] * s, axis=0))
        s += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * s, axis=0) * scale
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(new_state + p_state, s, mask=m_kv)


def _wide_rows(bsz: int, seq_len: int, heads: int, dk: int, dv: int) -> bool:
    """Whether a row's offset in q, k, v or o reaches 2^31 elements (``recurrent_step``'s WIDE_ROWS)."""
    return bsz * seq_len * heads * max(dk, dv) >= 2 ** 31


def launch_recurrent(q, k, v, g, beta, state, scale):
    """q, k (B, T, H, K), v (B, T, H, V), g None | (B, T, H) | (B, T, H, K), beta None | (B, T, H),
    state (B, H, K, V). Returns o and the new fp32 state."""
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    bk = max(16, next_power_of_2(dk))
    bv = min(32 if bk <= 128 else 16, max(16, next_power_of_2(dv)))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.float().contiguous()
    o = torch.empty_like(v)
    new_state = torch.empty(bsz, heads, dk, dv, device=q.device, dtype=torch.float32)
    launch_split(recurrent_step, lambda n: (cdiv(dv, bv), n), bsz * heads, q, k, v, g,
                 None if beta is None else beta.contiguous(), state.contiguous(), new_state, o, scale, seq_len,
                 unit=heads, H=heads, K=dk, V=dv, BK=bk, BV=bv, GATE=0 if g is None else (1 if g.dim() == 3 else 2),
                 DELTA=beta is not None, WIDE_ROWS=_wide_rows(bsz, seq_len, heads, dk, dv), num_warps=4)
    return o, new_state


def recurrent_gla(q, k, v, g, scale, state):
    """g: None | (B, T, H, 1) | (B, T, H, K) (expanded, as from checks.expand_log_decay)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, state)):
        from .reference import gla_step_reference
        return gla_step_reference(q, k, v, state, g, scale)
    if g is not None and g.shape[-1] == 1:
        g = g[..., 0]
    return launch_recurrent(q, k, v, g, None, state, scale)

"""Chunked delta rule on the linear engine's Triton kernels (``DELTA`` switch).

Split in two:
1. the WY / UT transform per chunk, ``w = T (beta e^b k)``, ``u = T (beta v)``, ``T = (I + A)^-1`` — batched
   matmuls and one batched triangular solve over all chunks in PyTorch (its backward is autograd's);
2. the sequential core ``(q, k, w, u, g, h0) -> (o, S_T)`` in Triton: the state pass forms ``v_new = u - w S``
   chunk by chunk, the output pass is the engine's with values ``v_new``; its backward runs the engine's kernels
   with the delta terms (``dv_new``, ``dw = -dv_new h^T``) switched on.

Log-decay gradient of the core: as for the engine (``q . dq - k . dk``, final state), plus one term per chunk:
``v_new = u - w h_c`` depends on the cumulative decay up to the chunk start through ``h_c``, which adds
``sum(dv_new * (v_new - u))`` over the chunk to the last token before it.
"""

from __future__ import annotations

import torch

from ..linear.chunk import (ChunkTables, launch_dqk_bwd, launch_dv_bwd, launch_output_fwd, launch_state_bwd,
                            launch_state_fwd, log_decay_grad)


def _chunk_layout(tables: ChunkTables, chunk_size: int, device):
    """(n_chunks, C) token index of each chunk row and its validity (the tail chunk of a sequence is short)."""
    seq, within = tables.chunk_indices[:, 0].long(), tables.chunk_indices[:, 1].long()
    start = tables.cu.long()[seq] + within * chunk_size
    idx = start[:, None] + torch.arange(chunk_size, device=device)
    valid = idx < tables.cu.long()[seq + 1][:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def wy_chunks(kf, vf, betaf, gf, idx, valid):
    """k, v (T_total, H, ·), beta, g (T_total, H) -> w (T_total, H, K), u (T_total, H, V), fp32, differentiable."""
    gather = lambda t: (t[idx] * valid.view(*valid.shape, *([1] * (t.dim() - 1)))).transpose(1, 2)  # noqa: E731
    k_c, v_c, beta_c = gather(kf.float()), gather(vf.float()), gather(betaf.float())     # (NC, H, C, ·)
    n = k_c.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=kf.device).tril()
    kb = k_c * beta_c.unsqueeze(-1)
    a = kb @ k_c.transpose(-1, -2)
    if gf is not None:
        b = gather(gf.float()).cumsum(-1)
        a = a * (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
        kb = kb * b.exp().unsqueeze(-1)
    a = a.tril(-1)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    rhs = torch.cat([kb, v_c * beta_c.unsqueeze(-1)], dim=-1)
    wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    wu = wu.transpose(1, 2)[valid]                                       # (T_total, H, K + V), token order
    return wu[..., :kf.shape[-1]], wu[..., kf.shape[-1]:]


class DeltaCoreFunction(torch.autograd.Function):
    """q, k, w (T_total, H, K), u (T_total, H, V) in the compute dtype; g None | (T_total, H) fp32."""

    @staticmethod
    def forward(ctx, q, k, w, u, g, h0, tables, scale, chunk_size):
        h, ht, v_new = launch_state_fwd(k, u, g, h0, tables, chunk_size, w=w, bk=_full(k), bv=32)
        o = launch_output_fwd(q, k, v_new, g, h, tables, scale, chunk_size)
        ctx.save_for_backward(q, k, w, u, g, h0, ht)
        ctx.meta = (tables, scale, chunk_size)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, w, u, g, h0, ht = ctx.saved_tensors
        tables, scale, chunk_size = ctx.meta
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        h, _, v_new = launch_state_fwd(k, u, g, h0, tables, chunk_size, w=w, bk=_full(k), bv=32)
        dv_local = launch_dv_bwd(q, k, g, do, None, tables, scale, chunk_size)
        dh, dh0, dv_new = launch_state_bwd(q, k, do, g, dht, tables, scale, chunk_size, w=w, dv_local=dv_local,
                                           need_dh0=h0 is not None and ctx.needs_input_grad[5])
        dq, dk, dw, db = launch_dqk_bwd(q, k, v_new, g, h, do, dh, tables, scale, chunk_size, dv_new=dv_new)
        dg = None
        if g is not None and ctx.needs_input_grad[4]:
            dg = log_decay_grad(db, ht, dht, tables, extra=_state_decay_term(dv_new, v_new, u, tables, chunk_size))
        return dq, dk, dw, dv_new, dg, dh0, None, None, None


def _full(k):
    import triton
    return max(16, triton.next_power_of_2(k.shape[-1]))


def _state_decay_term(dv_new, v_new, u, tables, chunk_size):
    """sum over each chunk of dv_new * (v_new - u), placed at the token before the chunk (chunks after the first
    of their sequence)."""
    per_token = (dv_new.float() * (v_new.float() - u.float())).sum(-1)   # (T_total, H)
    idx, valid = _chunk_layout(tables, chunk_size, per_token.device)
    sums = (per_token[idx] * valid[:, :, None]).sum(1)                  # (NC, H)
    within = tables.chunk_indices[:, 1].long()
    keep = within > 0
    target = idx[:, 0] - 1
    return torch.zeros_like(per_token).index_add(0, target[keep], sums[keep])


def chunk_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens, chunk_size):
    """q, k (B, T, H, K) (normalised already), v (B, T, H, V), beta (B, T, H), g None | (B, T, H) fp32."""
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    tables = ChunkTables(cu_seqlens, bsz, seq_len, chunk_size, q.device)
    flat = lambda t: t.reshape(bsz * seq_len, heads, *t.shape[3:])  # noqa: E731
    qf, kf, vf, bf = flat(q), flat(k), flat(v), flat(beta)
    gf = None if g is None else flat(g).float().contiguous()
    idx, valid = _chunk_layout(tables, chunk_size, q.device)
    w, u = wy_chunks(kf, vf, bf, gf, idx, valid)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = DeltaCoreFunction.apply(qf.contiguous(), kf.contiguous(), w.to(q.dtype).contiguous(),
                                    u.to(q.dtype).contiguous(), gf, h0, tables, scale, chunk_size)
    return o.view(bsz, seq_len, heads, dv), ht

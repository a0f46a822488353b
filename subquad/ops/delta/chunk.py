"""Chunked delta rule on the linear engine's Triton kernels (``DELTA`` switch).

Three steps:
1. the WY / UT transform per chunk (wy.py), ``w = T (beta e^b k)``, ``u = T (beta v)``, ``T = (I + A)^-1``;
2. the state pass forms ``v_new = u - w S`` chunk by chunk (the engine's state kernel, ``DELTA`` on);
3. the engine's output pass with values ``v_new``.
(2 and 3 in one walk where it pays, ``fused_fwd``.) Where sequences x heads are too few to fill the GPU, the
walks run on segments (linear/chunk_split.py), with each segment's transition matrix computed beside its own
state. The backward runs the engine's kernels with the delta terms (``dv_new``, ``dw = -dv_new h^T``) switched
on, then the WY backward. w, u and T are kept (and the segments' states and transitions); the per-chunk states
are recomputed.

Log-decay gradient of steps 2-3: as for the engine (``q . dq - k . dk``, final state), plus one term per chunk:
``v_new = u - w h_c`` depends on the cumulative decay up to the chunk start through ``h_c``, which adds
``sum(dv_new * (v_new - u))`` over the chunk to the last token before it.
"""

from __future__ import annotations

import torch

from ..first_order import first_order
from ..linear.chunk import (ChunkTables, chunk_tables, fused_forward, launch_chunk_cumsum, launch_dqk_bwd,
                            launch_dv_bwd, launch_fused_fwd, launch_output_fwd, launch_state_bwd, launch_state_fwd,
                            launch_transition, log_decay_grad)
from ..linear.chunk_split import segment_split
from .wy import launch_wy_bwd, launch_wy_fwd


def _chunk_layout(tables: ChunkTables, chunk_size: int, device):
    """(n_chunks, C) token index of each chunk row and its validity (the tail chunk of a sequence is short)."""
    seq, within = tables.chunk_indices[:, 0].long(), tables.chunk_indices[:, 1].long()
    start = tables.cu.long()[seq] + within * chunk_size
    idx = start[:, None] + torch.arange(chunk_size, device=device)
    valid = idx < tables.cu.long()[seq + 1][:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


class ChunkDeltaFunction(torch.autograd.Function):
    """q, k, v, beta, g on the packed layout (T_total, H, ·); g None | (T_total, H) fp32."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, tables, scale, chunk_size):
        # every kernel of both passes reads the one cumulative log-decay (see linear/chunk_bwd.py's docstring)
        gc = launch_chunk_cumsum(g, tables, chunk_size)
        w, u, t_mat = launch_wy_fwd(k, v, beta, gc, tables, chunk_size)
        heads, dk, dv = k.shape[1], k.shape[2], v.shape[2]
        split = segment_split(tables, heads, dk, dv)
        walk_tables, segments, local, trans = tables, None, None, None
        if split is not None:
            _, local, _ = launch_state_fwd(k, u, gc, None, split.tables, chunk_size, w=w, store_h=False)
            trans = launch_transition(k, w, gc, split.tables, chunk_size)
            walk_tables, segments = split.tables, (split, local, trans)
        if fused_forward(walk_tables, heads, dk, dv, delta=True):
            o, ht = launch_fused_fwd(q, k, u, gc, None, h0, walk_tables, scale, chunk_size, w=w, segments=segments)
        else:
            h, ht, v_new = launch_state_fwd(k, u, gc, h0, walk_tables, chunk_size, w=w, segments=segments)
            o = launch_output_fwd(q, k, v_new, gc, h, tables, scale, chunk_size)
        ctx.save_for_backward(q, k, v, beta, gc, h0, ht, t_mat, w, u, local, trans)
        ctx.meta = (tables, split, scale, chunk_size)
        return o, ht

    @staticmethod
    @first_order
    def backward(ctx, do, dht):
        q, k, v, beta, gc, h0, ht, t_mat, w, u, local, trans = ctx.saved_tensors
        tables, split, scale, chunk_size = ctx.meta
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dv_local = launch_dv_bwd(q, k, gc, do, None, tables, scale, chunk_size)
        if split is None:
            h, _, v_new = launch_state_fwd(k, u, gc, h0, tables, chunk_size, w=w)
            dh, dh0, dv_new = launch_state_bwd(q, k, do, gc, dht, tables, scale, chunk_size, w=w, dv_local=dv_local,
                                               need_dh0=need_dh0)
        else:
            h, _, v_new = launch_state_fwd(k, u, gc, h0, split.tables, chunk_size, w=w,
                                           segments=(split, local, trans))
            # each segment's own d initial_state, then the reverse walk composing with the transposed transitions
            _, local_d, _ = launch_state_bwd(q, k, do, gc, None, split.tables, scale, chunk_size, w=w,
                                             dv_local=dv_local, store_dh=False)
            dh, dh0, dv_new = launch_state_bwd(q, k, do, gc, dht, split.tables, scale, chunk_size, w=w,
                                               dv_local=dv_local, need_dh0=need_dh0,
                                               segments=(split, local_d, trans))
        dq, dk, dw, db, dvu = launch_dqk_bwd(q, k, v_new, gc, h, do, dh, tables, scale, chunk_size, dv_new=dv_new,
                                             u=u)
        dv, dbeta, dg_wy = launch_wy_bwd(k, v, beta, gc, t_mat, dw, dv_new, dk, tables, chunk_size)
        dg = None
        if gc is not None and ctx.needs_input_grad[4]:
            db = db + _state_decay_term(dvu, tables, chunk_size)
            dg = log_decay_grad(q, k, dq, dk, db, ht, dht, tables, chunk_size) + dg_wy
        return dq, dk, dv, dbeta, dg, dh0, None, None, None


def _state_decay_term(dvu, tables, chunk_size):
    """dvu = sum_v dv_new (v_new - u) per token (T_total, H): its sum over each chunk, placed at the token before
    the chunk (chunks after the first of their sequence)."""
    idx, valid = _chunk_layout(tables, chunk_size, dvu.device)
    sums = (dvu[idx] * valid[:, :, None]).sum(1)                        # (n_chunks, H)
    # a sequence's first chunk adds zero (to token 0) rather than being dropped by a boolean index, which
    # waits for the GPU (a host sync in the middle of the backward)
    later = (tables.chunk_indices[:, 1] > 0)[:, None]
    return torch.zeros_like(dvu).index_add(0, (idx[:, 0] - 1).clamp(min=0), sums * later)


def chunk_delta_rule(q, k, v, beta, g, scale, initial_state, cu_seqlens, chunk_size):
    """q, k (B, T, H, K) (normalised already), v (B, T, H, V), beta (B, T, H), g None | (B, T, H) fp32."""
    bsz, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    tables = chunk_tables(cu_seqlens, bsz, seq_len, chunk_size, q.device)
    flat = lambda t: t.reshape(bsz * seq_len, *t.shape[2:]).contiguous()  # noqa: E731
    gf = None if g is None else flat(g.float())
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = ChunkDeltaFunction.apply(flat(q), flat(k), flat(v), flat(beta.to(q.dtype)), gf, h0, tables, scale,
                                     chunk_size)
    return o.view(bsz, seq_len, heads, dv), ht

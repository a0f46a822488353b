"""The forward and backward passes around the ring: each rank's queries meet every rank's K/V shard once.

At step ``s`` rank ``r`` holds the K/V shard of rank ``r - s`` (mod world); the transfer of that shard to the
next rank starts before the step's attention, so the two overlap. Each step attends with ``subquad.attention``
(any backend, with its LSE), only where the layout says the queries see the keys, and the partial outputs are
merged by LSE into an fp32 running output.

The backward runs the ring again with the global output and LSE. A block's gradients are those of the
merged output, which depends on the block's ``(o_b, lse_b)`` through ``out = sum_b a_b o_b``,
``a_b = exp(lse_b - lse)``: so the block's attention is recomputed under autograd and differentiated with
``d o_b = a_b dout`` and ``d lse_b = a_b (o_b.dout - out.dout + dlse)`` (the LSE merge's backward). That is
exact whatever the backend, softcap included, and needs no block-level backward entry point. dQ stays on its
rank; dK/dV accumulators travel with their shard and arrive back at its owner after the last step.
"""

from __future__ import annotations

import torch

from ..softmax import attention
from ..softmax.lse_merge import merge_lse
from .comm import Ring
from .layout import block_calls, shard_chunks


def _step_calls(ring: Ring, step: int, shard_len: int, causal: bool, zigzag: bool):
    owner = (ring.rank - step) % ring.world
    return block_calls(shard_chunks(ring.rank, ring.world, zigzag), shard_chunks(owner, ring.world, zigzag),
                       shard_len, causal)


def ring_forward(ring: Ring, q, k, v, *, causal: bool, zigzag: bool, scale, softcap, backend: str):
    """``(out, lse)`` of the local queries against the whole sequence: out like q (with v's head_dim), lse
    ``(B, H_q, N_local)`` fp32."""
    bsz, n, hq, _ = q.shape
    out = q.new_zeros(bsz, n, hq, v.shape[-1], dtype=torch.float32)
    lse = q.new_full((bsz, hq, n), float("-inf"), dtype=torch.float32)
    for step in range(ring.world):
        transfer = ring.pass_on(k, v) if step + 1 < ring.world else None
        for call in _step_calls(ring, step, n, causal, zigzag):
            rows = slice(call.q_start, call.q_stop)
            o, l = attention(q[:, rows], k[:, :call.kv_stop], v[:, :call.kv_stop], causal=call.causal, scale=scale,
                             softcap=softcap, return_lse=True, backend=backend)
            out[:, rows], lse[..., rows] = merge_lse([out[:, rows], o], [lse[..., rows], l], torch.float32)
        if transfer is not None:
            k, v = transfer.wait()
    return out.to(q.dtype), lse


def _block_grads(q, k, v, dout, out_dot_dout, lse, dlse, call, scale, softcap, backend):
    """dQ, dK, dV of the merged output through one block call (see the module docstring), fp32."""
    rows = slice(call.q_start, call.q_stop)
    with torch.enable_grad():
        qb = q[:, rows].detach().requires_grad_()
        kb = k[:, :call.kv_stop].detach().requires_grad_()
        vb = v[:, :call.kv_stop].detach().requires_grad_()
        o, l = attention(qb, kb, vb, causal=call.causal, scale=scale, softcap=softcap, return_lse=True,
                         backend=backend)
    global_lse = lse[..., rows]
    # a row no key reaches has lse -inf everywhere: its share is 0, not exp(nan)
    share = torch.where(torch.isinf(global_lse), torch.zeros_like(global_lse), torch.exp(l.detach() - global_lse))
    d = dout[:, rows].float()
    d_o = share.transpose(1, 2).unsqueeze(-1) * d
    o_dot_dout = (o.detach().float() * d).sum(-1).transpose(1, 2)
    d_l = share * (o_dot_dout - out_dot_dout[..., rows] + (0 if dlse is None else dlse[..., rows].float()))
    dq, dk, dv = torch.autograd.grad((o, l), (qb, kb, vb), (d_o.to(o.dtype), d_l))
    return dq.float(), dk.float(), dv.float()


def ring_backward(ring: Ring, q, k, v, out, lse, dout, dlse, *, causal: bool, zigzag: bool, scale, softcap,
                  backend: str):
    """dQ, dK, dV of the local shards (dK, dV: of this rank's own K/V, summed over every rank's queries)."""
    n = q.shape[1]
    out_dot_dout = (out.float() * dout.float()).sum(-1).transpose(1, 2)
    dq = torch.zeros_like(q, dtype=torch.float32)
    grads_back = None
    for step in range(ring.world):
        transfer = ring.pass_on(k, v) if step + 1 < ring.world else None
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for call in _step_calls(ring, step, n, causal, zigzag):
            dq_b, dk_b, dv_b = _block_grads(q, k, v, dout, out_dot_dout, lse, dlse, call, scale, softcap, backend)
            dq[:, call.q_start:call.q_stop] += dq_b
            dk[:, :call.kv_stop] += dk_b
            dv[:, :call.kv_stop] += dv_b
        if grads_back is not None:
            # the sums of the earlier ranks' queries for the shard visiting now
            dk_before, dv_before = grads_back.wait()
            dk, dv = dk + dk_before, dv + dv_before
        grads_back = ring.pass_on(dk, dv)
        if transfer is not None:
            k, v = transfer.wait()
    dk, dv = grads_back.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

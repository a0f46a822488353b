"""The GPU path of NSA and top-k block attention: index production in PyTorch, attention on Triton kernels.

* compressed branch: the flash engine (``flash_attention_masked``) over the compressed keys at the positions of
  their blocks' last tokens, causal on those positions; it returns the LSE the selection needs;
* selection: the probabilities of the compressed branch recomputed from that LSE a chunk of queries at a time
  (``selection``), then the top-k rule: no ``N x M`` tensor;
* selected branch: the head-packed kernels of ``selected``;
* sliding window: ``subquad.attention`` with ``window_size=(window - 1, 0)`` on the flash kernels.
"""

from __future__ import annotations

import torch

from ..softmax import attention
from ..softmax.flash import flash_attention_masked
from ..softmax.flash.launch import interpreting
from .compression import block_ends, causal_block_mask, pool_blocks, pooled_ends
from .selected import selected_attention
from .selection import select_nsa, select_topk

#: score elements (over every head) that one chunk of queries of the selection may hold
SELECTION_ELEMENTS = 1 << 25


def _mask_block(device) -> int:
    """The compressed branch's BlockMask block: the flash engine's 128, 32 in the interpreter (small test
    shapes then cross several blocks)."""
    return 32 if interpreting() and torch.device(device).type == "cpu" else 128


def _chunk(seq_q: int, heads_q: int, keys: int) -> int:
    return max(1, min(seq_q, SELECTION_ELEMENTS // max(heads_q * keys, 1)))


def nsa_triton(q, k, v, gates, k_cmp, v_cmp, *, block: int, compress_block: int, compress_stride: int, top_k: int,
               window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``nsa_reference``'s maths on the kernels (fp16/bf16; arguments checked by ``subquad.nsa``)."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv = k.shape[1], k.shape[2]
    q_pos = torch.arange(seq_kv - seq_q, seq_kv, device=q.device)
    ends = block_ends(k_cmp.shape[1], compress_block, compress_stride, q.device)
    if k_cmp.shape[1]:
        size = _mask_block(q.device)
        o_cmp, lse = flash_attention_masked(q, k_cmp.to(q.dtype).contiguous(), v_cmp.to(q.dtype).contiguous(),
                                            causal_block_mask(q_pos, ends, size, size), scale, q_pos=q_pos,
                                            kv_pos=ends)
    else:
        o_cmp = q.new_zeros(bsz, seq_q, hq, v.shape[3])
        lse = torch.full((bsz, hq, seq_q), float("-inf"), device=q.device)
    with torch.no_grad():
        indices = _select(q, k_cmp, lse.detach(), ends, q_pos, scale, compress_block=compress_block,
                          compress_stride=compress_stride, block=block, top_k=top_k,
                          n_blocks=-(-seq_kv // block))
    o_slc = selected_attention(q, k, v, indices, block=block, scale=scale, causal=True)
    o_win = attention(q, k, v, causal=True, window_size=(window - 1, 0), scale=scale, backend="triton")
    w = gates.float()
    out = w[..., 0:1] * o_cmp.float() + w[..., 1:2] * o_slc.float() + w[..., 2:3] * o_win.float()
    return out.to(q.dtype), indices


def _select(q, k_cmp, lse, kv_pos, q_pos, scale, **rule) -> torch.Tensor:
    """``select_nsa`` over chunks of queries, the compressed branch's probabilities ``exp(scale q.k - lse)``
    recomputed per chunk."""
    bsz, seq_q, hq, d = q.shape
    hkv = k_cmp.shape[2]
    kc = k_cmp.float()
    rows = _chunk(seq_q, hq, k_cmp.shape[1])
    picked = []
    for t0 in range(0, seq_q, rows):
        t1 = min(t0 + rows, seq_q)
        qc = q[:, t0:t1].float().view(bsz, t1 - t0, hkv, hq // hkv, d)
        s = torch.einsum("bchgd,bmhd->bchgm", qc, kc) * scale
        l_c = lse[:, :, t0:t1].transpose(1, 2).reshape(bsz, t1 - t0, hkv, hq // hkv, 1)
        seen = (kv_pos.view(1, -1) <= q_pos[t0:t1].view(-1, 1)).view(1, t1 - t0, 1, 1, -1)
        p = torch.where(seen, torch.exp(s - torch.where(torch.isinf(l_c), 0.0, l_c)), 0.0)
        picked.append(select_nsa(p, q_pos[t0:t1], **rule))
    return torch.cat(picked, 1)


def topk_block_attention_triton(q, k, v, *, block: int, top_k: int, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_block_attention_reference``'s maths on the selected-blocks kernels (fp16/bf16)."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv = k.shape[1], k.shape[2]
    q_pos = torch.arange(seq_kv - seq_q, seq_kv, device=q.device)
    k_pool = pool_blocks(k, block)
    ends = pooled_ends(seq_kv, block, q.device)
    rows = _chunk(seq_q, hq, k_pool.shape[1])
    with torch.no_grad():
        indices = torch.cat([
            select_topk((q[:, t0:t0 + rows].float() * scale).view(bsz, -1, hkv, hq // hkv, d), k_pool, ends,
                        q_pos[t0:t0 + rows], block=block, top_k=top_k, causal=causal)
            for t0 in range(0, seq_q, rows)], 1)
    return selected_attention(q, k, v, indices, block=block, scale=scale, causal=causal), indices

"""The GPU path of NSA and top-k block attention: every stage on Triton kernels but the final top-k.

* compressed branch: the flash engine (``flash_attention_masked``) over the compressed keys at the positions of
  their blocks' last tokens, causal on those positions;
* selection: the blocks ranked by the summary keys' probabilities and the top-k kept, on one kernel
  (``selection_kernel``, in near-fp32: the ranking follows the reference's): no ``N x M`` tensor;
* selected branch: the head-packed kernels of ``selected``;
* sliding window: ``subquad.attention`` with ``window_size=(window - 1, 0)`` on the flash kernels;
* the gated sum of the three: ``gate_mix``.
"""

from __future__ import annotations

import torch

from ..softmax import attention
from ..softmax.flash import flash_attention_masked
from ..softmax.flash.launch import interpreting
from .compression import block_ends, causal_block_mask, pool_blocks
from .gate_mix import gate_mix
from .selected import selected_attention
from .selection_kernel import select_top_blocks


def _mask_block(device) -> int:
    """The compressed branch's BlockMask block: the flash engine's 128, 32 in the interpreter (small test
    shapes then cross several blocks)."""
    return 32 if interpreting() and torch.device(device).type == "cpu" else 128


def nsa_triton(q, k, v, gates, k_cmp, v_cmp, *, block: int, compress_block: int, compress_stride: int, top_k: int,
               window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``nsa_reference``'s maths on the kernels (fp16/bf16; arguments checked by ``subquad.nsa``)."""
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv = k.shape[1], k.shape[2]
    q_pos = torch.arange(seq_kv - seq_q, seq_kv, device=q.device)
    ends = block_ends(k_cmp.shape[1], compress_block, compress_stride, q.device)
    if k_cmp.shape[1]:
        size = _mask_block(q.device)
        o_cmp, _ = flash_attention_masked(q, k_cmp.to(q.dtype).contiguous(), v_cmp.to(q.dtype).contiguous(),
                                            causal_block_mask(q_pos, ends, size, size), scale, q_pos=q_pos,
                                            kv_pos=ends)
    else:
        o_cmp = q.new_zeros(bsz, seq_q, hq, v.shape[3])
    indices = _select(q, k_cmp, seq_kv, scale, compress_block=compress_block, compress_stride=compress_stride,
                      block=block, top_k=top_k, causal=True, forced=True,
                      bound=float((hq // hkv) * (compress_block // compress_stride) + 1))
    o_slc = selected_attention(q, k, v, indices, block=block, scale=scale, causal=True)
    o_win = attention(q, k, v, causal=True, window_size=(window - 1, 0), scale=scale, backend="triton")
    return gate_mix(o_cmp, o_slc, o_win, gates), indices


def _select(q, k_cmp, seq_kv: int, scale: float, *, block: int, **rule) -> torch.Tensor:
    """Every query's selection (``selection``'s rule) on ``selection_kernel``, ``(B, N_q, H_kv, top_k)`` int64."""
    with torch.no_grad():
        return select_top_blocks(q, k_cmp, q_pos0=seq_kv - q.shape[1], seq_kv=seq_kv, block=block,
                                 n_blocks=-(-seq_kv // block), scale=scale, **rule)


def topk_block_attention_triton(q, k, v, *, block: int, top_k: int, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_block_attention_reference``'s maths on the selected-blocks kernels (fp16/bf16)."""
    hq, seq_kv, hkv = q.shape[2], k.shape[1], k.shape[2]
    indices = _select(q, pool_blocks(k, block), seq_kv, scale, compress_block=block, compress_stride=block,
                      block=block, top_k=top_k, causal=causal, forced=False, bound=float(hq // hkv + 1))
    return selected_attention(q, k, v, indices, block=block, scale=scale, causal=causal), indices

"""NSA's compressed keys: one summary key (and value) per block of ``block`` tokens taken every ``stride`` tokens.

Compression block ``i`` covers tokens ``[i * stride, i * stride + block)``; only complete blocks exist (a block is
compressed once its last token has arrived), so ``N`` tokens give ``(N - block) // stride + 1`` of them. Its
summary sits at the position of its last token, ``i * stride + block - 1``: a query sees it from there on, which
is ordinary causal masking on those positions (``q_pos >= kv_pos``) and how the flash engine runs the branch.
"""

from __future__ import annotations

import torch

from ...masks import EMPTY, FULL, PARTIAL, BlockMask, causal


def num_blocks(seq_len: int, block: int, stride: int) -> int:
    """Complete compression blocks among ``seq_len`` tokens."""
    return (seq_len - block) // stride + 1 if seq_len >= block else 0


def mean_pool(x: torch.Tensor, block: int, stride: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, N, H, D)`` -> ``(B, M, H, D)``: the mean of each complete compression block (NSA's default
    compression without its learnable MLP; ``subquad.nn.NSA`` owns that one), in ``dtype`` (default x's)."""
    dtype = x.dtype if dtype is None else dtype
    if x.shape[1] < block:
        return x.new_zeros(x.shape[0], 0, *x.shape[2:], dtype=dtype)
    # unfold: (B, M, H, D, block); the mean in fp32 at least, so that fp16 blocks of 64 do not round per add
    pooled = x.unfold(1, block, stride).to(torch.promote_types(x.dtype, torch.float32)).mean(-1)
    return pooled.to(dtype)


def block_ends(count: int, block: int, stride: int, device) -> torch.Tensor:
    """The positions of ``count`` compressed keys: each block's last token."""
    return torch.arange(count, device=device) * stride + block - 1


def causal_block_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, block_q: int, block_kv: int) -> BlockMask:
    """The BlockMask of causal attention (``q_pos >= kv_pos``) for queries and keys at increasing positions,
    tiled ``block_q`` x ``block_kv`` over their indices; it may have more queries than keys, which
    ``BlockMask.build`` (queries aligned to the end of the keys) does not take."""
    def extent(pos, size):
        n = -(-pos.numel() // size)
        padded = torch.cat([pos, pos[-1:].expand(n * size - pos.numel())])
        return padded.view(n, size)[:, 0], padded.view(n, size)[:, -1]

    q_lo, q_hi = extent(q_pos, block_q)
    k_lo, k_hi = extent(kv_pos, block_kv)
    kind = torch.where(q_lo[:, None] >= k_hi[None, :], FULL,
                       torch.where(q_hi[:, None] >= k_lo[None, :], PARTIAL, EMPTY)).to(torch.int8)
    return BlockMask(causal, kind[None, None].contiguous(), q_pos.numel(), kv_pos.numel(), block_q, block_kv, 1, 1)


def pooled_ends(seq_len: int, block: int, device) -> torch.Tensor:
    """The last token of each of the ``ceil(seq_len / block)`` blocks of ``block`` tokens (the last possibly
    short)."""
    return torch.clamp(torch.arange(1, -(-seq_len // block) + 1, device=device) * block, max=seq_len) - 1


def pool_blocks(k: torch.Tensor, block: int) -> torch.Tensor:
    """``topk_block_attention``'s summary keys: the mean of each block of ``block`` tokens (a short last block,
    the mean of what it has), in fp32 at least and without gradient (they only rank blocks):
    ``(B, ceil(N / block), H, D)``."""
    bsz, n, h, d = k.shape
    n_blocks = -(-n // block)
    acc = torch.promote_types(k.dtype, torch.float32)
    padded = torch.zeros(bsz, n_blocks * block, h, d, dtype=acc, device=k.device)
    padded[:, :n] = k.detach()
    counts = pooled_ends(n, block, k.device) + 1 - torch.arange(n_blocks, device=k.device) * block
    return padded.view(bsz, n_blocks, block, h, d).sum(2) / counts.to(acc).view(1, -1, 1, 1)

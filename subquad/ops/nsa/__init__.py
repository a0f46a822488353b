"""Dynamic block sparsity: top-k block attention and Native Sparse Attention (NSA, Yuan et al. 2025).

Both pick, per query token, the key blocks to attend to (one choice per token shared by its GQA group: the rule
is in ``selection``), then run exact softmax over the chosen blocks on a head-packed Triton kernel (``selected``).
NSA adds a compressed branch (attention over one summary key per block) and a sliding window, and mixes the
three with per-head gates. Tensors are ``(batch, seq, heads, head_dim)``.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..._checks import check_backend, check_qkv, check_scale_softcap
from .compression import mean_pool, num_blocks
from .reference import nsa_reference, topk_block_attention_reference

log = logging.getLogger("subquad")

BACKENDS = ("auto", "triton", "reference")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_sizes(block, compress_block, compress_stride, top_k, window) -> None:
    """NSA's block sizes, ``top_k`` and ``window``: positive ints, the stride dividing both blocks."""
    for name, value in (("block", block), ("compress_block", compress_block), ("compress_stride", compress_stride),
                        ("top_k", top_k), ("window", window)):
        _positive_int(name, value)
    if compress_block % compress_stride or block % compress_stride:
        raise ValueError(f"compress_stride: expected a divisor of compress_block={compress_block} and "
                         f"block={block}, got {compress_stride}")


def _check_lengths(q, k) -> None:
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q: expected at most seq_kv={k.shape[1]} queries (aligned to the end of the keys), got "
                         f"shape {tuple(q.shape)}")


def _triton_runs(block: int) -> bool:
    return block >= 16 and block & (block - 1) == 0


def _pick_backend(backend: str, q: torch.Tensor, block: int) -> str:
    """The Triton kernels take fp16/bf16 (fp32 and fp64 run the fp32-accumulating reference, as in
    ``subquad.attention``) and selection blocks that are powers of two >= 16."""
    check_backend(backend, BACKENDS)
    fast_dtype = q.dtype in (torch.float16, torch.bfloat16)
    if backend == "triton":
        if fast_dtype and not _triton_runs(block):
            raise ValueError(f"block: the Triton kernels take a power of two >= 16, got {block} (use "
                             f"backend='reference')")
        return "triton" if fast_dtype else "reference"
    if backend == "auto" and q.is_cuda and fast_dtype and _triton_runs(block):
        return "triton"
    return "reference"


def _implementation(op: str, backend: str, q: torch.Tensor, block: int) -> Callable:
    """``op``'s implementation (``"nsa"`` or ``"topk_block_attention"``) on the backend that runs the call."""
    chosen = _pick_backend(backend, q, block)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("subquad.%s: backend=%s, q=%s %s", op, chosen, tuple(q.shape), q.dtype)
    if chosen == "triton":
        from . import engine
        return getattr(engine, f"{op}_triton")
    return {"nsa": nsa_reference, "topk_block_attention": topk_block_attention_reference}[op]


def topk_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, top_k: int = 16,
                         causal: bool = True, scale: float | None = None, return_indices: bool = False,
                         backend: str = "auto"):
    """Exact softmax attention over the ``top_k`` key blocks each query token selects.

    Selection, per query token and shared by the query heads of its GQA group (so the kernel reads each chosen
    K/V block once per group): each block of ``block`` keys is summarised by its mean key; each query head's
    softmax over the summaries it sees (causal: complete blocks) is summed over the group, and the blocks with
    the largest sums are kept (``subquad.ops.nsa.selection``). Causal: the query's own (diagonal) block is always
    kept, first, and keys after the query are masked. The selection has no gradient; the attention over the
    selected blocks is exact and differentiable in q, k, v.

    Args:
        q: ``(B, N_q, H_q, D)``; k, v: ``(B, N_kv, H_kv, D[_v])``, ``H_q`` a multiple of ``H_kv``;
            ``N_q <= N_kv``, queries aligned to the end of the keys.
        block: keys per block (the Triton kernels: a power of two >= 16).
        top_k: blocks per query token; with fewer candidates all are kept (indices padded with ``-1``).
        causal: causal attention.
        scale: defaults to ``D ** -0.5``.
        return_indices: also return the chosen blocks, ``(B, N_q, H_kv, top_k)`` int64, increasing, ``-1`` last.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the reference), ``"triton"``, ``"reference"``.
    """
    check_qkv(q, k, v)
    _check_lengths(q, k)
    block, top_k = _positive_int("block", block), _positive_int("top_k", top_k)
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    check_scale_softcap(scale, None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    run = _implementation("topk_block_attention", backend, q, block)
    out, indices = run(q, k, v, block=block, top_k=top_k, causal=causal, scale=scale)
    return (out, indices) if return_indices else out


def _compressed(compress, k, v, compress_block: int, compress_stride: int):
    """``compress`` as ``(k_cmp, v_cmp)``, each ``(B, M, H_kv, D*)`` with ``M`` the complete compression blocks."""
    bsz, seq_kv, hkv, d = k.shape
    m = num_blocks(seq_kv, compress_block, compress_stride)
    if compress is None:
        # the summary keys in fp32 at least: they rank the blocks, and rounded to bf16 they tipped near-ties to
        # other blocks than the reference picks on the same inputs (the H100's dynamic suite, 2 x 16k: 0.065 max
        # error on sampled rows, the error of one swapped block); the compressed branch rounds them for its kernel
        return (mean_pool(k, compress_block, compress_stride, torch.promote_types(k.dtype, torch.float32)),
                mean_pool(v, compress_block, compress_stride))
    if callable(compress):
        compress = compress(k, v)
    if not (isinstance(compress, (tuple, list)) and len(compress) == 2):
        raise ValueError(f"compress: expected None, a callable (k, v) -> (k_cmp, v_cmp) or a pair (k_cmp, v_cmp), "
                         f"got {type(compress).__name__}")
    for name, x, dim in (("k_cmp", compress[0], d), ("v_cmp", compress[1], v.shape[3])):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (bsz, m, hkv, dim):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"compress: expected {name} of shape {(bsz, m, hkv, dim)} (one row per complete block of "
                             f"{compress_block} keys every {compress_stride}), got {shape}")
        if x.device != k.device:
            raise ValueError(f"compress: expected {name} on {k.device}, got {x.device}")
    return compress[0], compress[1]


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *, block: int = 64,
        compress_block: int = 32, compress_stride: int = 16, top_k: int = 16, window: int = 512,
        scale: float | None = None, compress: Callable | tuple | None = None, return_indices: bool = False,
        backend: str = "auto"):
    """Native Sparse Attention (Yuan et al., 2025): causal, three branches mixed by per-head gates,
    ``o = gates[..., 0] * o_cmp + gates[..., 1] * o_slc + gates[..., 2] * o_win``.

    * compressed: attention over one key/value per block of ``compress_block`` tokens taken every
      ``compress_stride`` tokens (only complete blocks), seen by a query from the block's last token on;
    * selected: attention over the ``top_k`` blocks of ``block`` tokens each query token selects from the
      compressed branch's probabilities, summed over its GQA group and carried from compression blocks to
      selection blocks by shared ``compress_stride`` segments (NSA eq. 9-10); the query's own block, block 0 and
      the block before its own are always selected (in that order of priority), the rest by importance
      (the exact rule: ``subquad.ops.nsa.selection``); keys after the query are masked;
    * sliding window: the ``window`` most recent keys, the query's own included.

    A branch with no key for a query (the compressed branch before the first block completes) contributes 0.

    Args:
        q: ``(B, N_q, H_q, D)``; k, v: ``(B, N_kv, H_kv, D[_v])``, ``H_q`` a multiple of ``H_kv``;
            ``N_q <= N_kv``, queries aligned to the end of the keys (decoding from a cache).
        gates: ``(B, N_q, H_q, 3)`` weights of the compressed, selected and window branches, as NSA's gate MLP
            gives them (after its sigmoid: pass weights, not logits); differentiable.
        block: selection block (NSA's l'; the Triton kernels: a power of two >= 16).
        compress_block, compress_stride: NSA's l and d; ``compress_stride`` must divide both ``compress_block``
            and ``block``.
        top_k: selected blocks per query token (forced ones included; ``-1``-padded where fewer exist).
        window: sliding-window size.
        scale: defaults to ``D ** -0.5``.
        compress: None (mean of each block), a callable ``(k, v) -> (k_cmp, v_cmp)`` (a learnable compression such
            as ``subquad.nn.NSA``'s MLP), or the pair ``(k_cmp, v_cmp)`` itself (a cache's); each
            ``(B, M, H_kv, D[_v])`` with ``M = (N_kv - compress_block) // compress_stride + 1`` (0 if negative).
        return_indices: also return the selection, ``(B, N_q, H_kv, top_k)`` int64, increasing, ``-1`` last.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the reference), ``"triton"``, ``"reference"``.
    """
    check_qkv(q, k, v)
    _check_lengths(q, k)
    bsz, seq_q, hq, _ = q.shape
    if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (bsz, seq_q, hq, 3) \
            or not gates.dtype.is_floating_point:
        shape = (tuple(gates.shape), gates.dtype) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates: expected a floating-point tensor of shape {(bsz, seq_q, hq, 3)} (compressed, "
                         f"selected, window weights), got {shape}")
    if gates.device != q.device:
        raise ValueError(f"gates: expected device {q.device}, got {gates.device}")
    check_sizes(block, compress_block, compress_stride, top_k, window)
    check_scale_softcap(scale, None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k_cmp, v_cmp = _compressed(compress, k, v, compress_block, compress_stride)
    run = _implementation("nsa", backend, q, block)
    out, indices = run(q, k, v, gates, k_cmp, v_cmp, block=block, compress_block=compress_block,
                       compress_stride=compress_stride, top_k=top_k, window=window, scale=scale)
    return (out, indices) if return_indices else out


__all__ = ["nsa", "topk_block_attention", "check_sizes", "BACKENDS"]

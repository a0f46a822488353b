"""FlashAttention 2.x's Python API over subquad: ``from subquad.integrations.flash_attn import flash_attn_func``.

The functions keep ``flash_attn.flash_attn_interface``'s names, signatures, defaults and return conventions
(``(batch, seqlen, nheads, headdim)`` layouts, ``window_size=(left, right)`` with -1 unbounded, ``softcap=0.0``
for none, causal masks aligned bottom-right, ``return_attn_probs`` giving ``(out, softmax_lse, None)``) and run
``subquad.attention``, ``subquad.varlen_attention`` and ``subquad.decode``. Each takes one more keyword,
``backend`` (subquad's: ``"auto"``, ``"triton"``, ``"reference"``, ...).

Refused with a ValueError naming the argument, as they have no exact mapping: ``block_table`` of
``flash_attn_varlen_func`` (paged prefill) and ``cache_leftpad`` of ``flash_attn_with_kvcache``. Attention
probabilities are never returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import KVView
from ..cache.base import write_pages, write_rows
from ..nn.positions import apply_rotary
from ..ops.decode import MAX_NEW_TOKENS, decode
from ..ops.softmax import attention
from ..ops.softmax.varlen import varlen_attention

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _deterministic(deterministic: bool) -> bool | None:
    # FlashAttention's False means "not required": subquad's None, which still honours
    # torch.use_deterministic_algorithms
    return True if deterministic else None


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend="auto"):
    """``flash_attn.flash_attn_func``: q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k,
    nheads_k, headdim)`` (GQA/MQA: ``nheads`` a multiple of ``nheads_k``). Returns ``out``, or with
    ``return_attn_probs`` ``(out, softmax_lse (batch, nheads, seqlen_q) fp32, None)``: the attention
    probabilities are not returned (FlashAttention returns them only for testing, with dropout)."""
    # (a window_size that is not a pair is left to attention, which names it)
    if (not causal and isinstance(window_size, (tuple, list)) and tuple(window_size) != (-1, -1)
            and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4
            and q.shape[1] > k.shape[1]):
        return _windowed_more_queries(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                                      deterministic, return_attn_probs, backend)
    result = attention(q, k, v, causal=causal, scale=softmax_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                       window_size=window_size, dropout_p=dropout_p, deterministic=_deterministic(deterministic),
                       return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result


def _windowed_more_queries(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs, backend):
    """A window without causality over fewer keys than queries, which ``attention`` refuses (its first queries
    sit before every key) and FlashAttention runs: the batch as packed sequences of equal lengths through
    ``varlen_attention``, which places each sequence's queries bottom-right as FlashAttention does."""
    bsz, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    steps = torch.arange(bsz + 1, dtype=torch.int32, device=q.device)
    result = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), steps * nq, steps * nk, nq,
                                    nk, dropout_p, softmax_scale, False, window_size, softcap, alibi_slopes,
                                    deterministic, return_attn_probs, backend=backend)
    if not return_attn_probs:
        return result.unflatten(0, (bsz, nq))
    out, lse, _ = result
    return out.unflatten(0, (bsz, nq)), lse.unflatten(1, (bsz, nq)).transpose(0, 1), None


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend="auto"):
    """``flash_attn.flash_attn_qkvpacked_func``: qkv ``(batch, seqlen, 3, nheads, headdim)``; as
    ``flash_attn_func``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), got {_shape(qkv)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend="auto"):
    """``flash_attn.flash_attn_kvpacked_func``: kv ``(batch, seqlen_k, 2, nheads_k, headdim)``; as
    ``flash_attn_func``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape (batch, seqlen_k, 2, nheads_k, headdim), got {_shape(kv)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend="auto"):
    """``flash_attn.flash_attn_varlen_func``: q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k,
    headdim)``, ``cu_seqlens_*`` ``(num_seqs + 1,)`` int32 offsets; masks aligned bottom-right per sequence.
    With ``return_attn_probs``: ``(out, softmax_lse (nheads, total_q) fp32, None)`` (no probabilities).
    ``alibi_slopes``: ``(nheads,)`` only. ``block_table`` (a paged KV cache) is refused."""
    if block_table is not None:
        raise ValueError("block_table: a paged KV cache is not supported by flash_attn_varlen_func here (gather the "
                         "pages into packed k/v, or use flash_attn_with_kvcache); expected None")
    result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              window_size=window_size, scale=softmax_scale, softcap=softcap,
                              alibi_slopes=alibi_slopes, return_lse=return_attn_probs, backend=backend,
                              deterministic=_deterministic(deterministic), dropout_p=dropout_p)
    return (*result, None) if return_attn_probs else result


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend="auto"):
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: qkv ``(total, 3, nheads, headdim)``, one ``cu_seqlens``
    for queries and keys; as ``flash_attn_varlen_func``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected shape (total, 3, nheads, headdim), got {_shape(qkv)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  backend=backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend="auto"):
    """``flash_attn.flash_attn_varlen_kvpacked_func``: kv ``(total_k, 2, nheads_k, headdim)``; as
    ``flash_attn_varlen_func``."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {_shape(kv)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)


def _batch(q) -> int | str:
    return q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else "batch"


def _check_cache(q, k_cache, v_cache, block_table):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected shape (batch, seqlen, nheads, headdim), got {_shape(q)}")
    layout = "(num_blocks, page_block_size, nheads_k, headdim)" if block_table is not None \
        else f"({q.shape[0]}, seqlen_cache, nheads_k, headdim)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:3] != k_cache.shape[:3] \
                or (block_table is None and t.shape[0] != q.shape[0]):
            raise ValueError(f"{name}: expected shape {layout}, got {_shape(t)}")
    if block_table is not None and (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2
                                    or block_table.shape[0] != q.shape[0] or block_table.dtype.is_floating_point):
        raise ValueError(f"block_table: expected an int32 tensor of shape ({q.shape[0]}, max_num_blocks_per_seq), "
                         f"got {_shape(block_table)}")


def _cache_seqlens(cache_seqlens, bsz: int, capacity: int, device) -> torch.Tensor:
    """FlashAttention's ``cache_seqlens`` (None: the whole cache; an int; ``(batch,)`` integers) as int32."""
    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((bsz,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (bsz,) \
            or cache_seqlens.dtype.is_floating_point or cache_seqlens.dtype == torch.bool:
        raise ValueError(f"cache_seqlens: expected an int or an int32 tensor of shape ({bsz},), got "
                         f"{_shape(cache_seqlens)}")
    return cache_seqlens.to(device=device, dtype=torch.int32)


def _rotary_tables(rotary_cos, rotary_sin, head_dim: int, capacity: int, dtype):
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        # (a row for every position of the cache, as FlashAttention asks: a shorter table would be indexed past
        # its end)
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != rotary_cos.shape \
                or not 0 < 2 * t.shape[1] <= head_dim or t.shape[0] < capacity:
            raise ValueError(f"{name}: expected shape (seqlen_ro, rotary_dim / 2) with seqlen_ro >= {capacity} (the "
                             f"cache's length) and rotary_dim <= {head_dim}, both tables alike, got {_shape(t)}")
    # (rotated in fp32 at least, as FlashAttention's kernel does for fp16/bf16)
    acc = torch.promote_types(dtype, torch.float32)
    return rotary_cos.to(acc), rotary_sin.to(acc)


def _append(cache: torch.Tensor, new: torch.Tensor, pos: torch.Tensor, block_table) -> None:
    """Write ``new`` ``(batch, seqlen_new, ...)`` into ``cache`` in place at positions ``pos`` ``(batch,
    seqlen_new)``."""
    if block_table is None:
        write_rows(cache, pos, 0, new)
    else:
        write_pages(cache, block_table, pos, new)


def _attend_gathered(q, view: KVView, causal, window_size, scale, softcap, alibi_slopes, backend):
    """Attention of q over each sequence's cached keys as packed varlen sequences (bottom-right aligned): what
    the decode kernel does not cover (non-causal new tokens, a window's right side, more than
    ``MAX_NEW_TOKENS``)."""
    bsz, t, hq, d = q.shape
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        if alibi_slopes.shape[0] != 1 and not bool((alibi_slopes == alibi_slopes[:1]).all()):
            raise ValueError(f"alibi_slopes: expected ({hq},) slopes (per-sequence slopes run only for causal "
                             f"calls of at most {MAX_NEW_TOKENS} new tokens), got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes[0]
    k, v, lengths = view.dense()
    valid = torch.arange(k.shape[1], device=k.device)[None, :] < lengths[:, None]
    cu_k = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.arange(0, (bsz + 1) * t, t, dtype=torch.int32, device=q.device)
    out, lse = varlen_attention(q.reshape(bsz * t, hq, d), k[valid], v[valid], cu_q, cu_k, causal=causal,
                                window_size=window_size, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                return_lse=True, backend=backend)
    return out.view(bsz, t, hq, -1), lse.view(hq, bsz, t).permute(1, 0, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend="auto"):
    """``flash_attn.flash_attn_with_kvcache``: incremental decoding over a KV cache.

    ``k``/``v`` ``(batch, seqlen_new, nheads_k, headdim)``, if given, are written into ``k_cache``/``v_cache`` in
    place at positions ``cache_seqlens ..`` of each sequence (rotated first when ``rotary_cos``/``rotary_sin``
    ``(seqlen_ro, rotary_dim / 2)`` are given: pairs ``(2i, 2i + 1)`` if ``rotary_interleaved``, else
    ``(i, i + rotary_dim / 2)``; q rotated at ``cache_seqlens + i`` when causal or windowed, else all at
    ``cache_seqlens``). Then q ``(batch, seqlen, nheads, headdim)`` attends to the first ``cache_seqlens +
    seqlen_new`` keys of its sequence, aligned bottom-right (causal among the new queries with ``causal``).
    ``cache_seqlens``: an int or ``(batch,)`` int32 (None: the whole cache). A paged cache: ``k_cache``
    ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table`` ``(batch, max_num_blocks_per_seq)``
    int32. ``num_splits > 0`` is passed to subquad's split-KV decode kernel (ignored elsewhere). Returns ``out``,
    and ``softmax_lse`` ``(batch, nheads, seqlen)`` fp32 with ``return_softmax_lse``.

    ``cache_batch_idx`` ``(batch,)`` int32 (dense caches only): sequence i reads and writes row
    ``cache_batch_idx[i]`` of a cache of any batch size. ``cache_leftpad`` is refused (ValueError).
    """
    if cache_batch_idx is not None:
        if block_table is not None:
            raise ValueError("cache_batch_idx: expected None with a block_table (as FlashAttention asks)")
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.shape != (_batch(q),) \
                or cache_batch_idx.dtype.is_floating_point or cache_batch_idx.dtype == torch.bool:
            raise ValueError(f"cache_batch_idx: expected an int32 tensor of shape ({_batch(q)},), got "
                             f"{_shape(cache_batch_idx)}")
        # a dense cache is a paged one whose pages are its rows: sequence i's one page is row cache_batch_idx[i],
        # read in place
        block_table = cache_batch_idx.to(device=k_cache.device, dtype=torch.int32)[:, None]
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad: not supported (left-padded caches); expected None")
    _check_cache(q, k_cache, v_cache, block_table)
    # (as cache_seqlens, indices on the device are not read back)
    if cache_batch_idx is not None and not block_table.is_cuda and block_table.numel() \
            and (int(block_table.min()) < 0 or int(block_table.max()) >= k_cache.shape[0]):
        raise ValueError(f"cache_batch_idx: expected rows of k_cache in [0, {k_cache.shape[0]}), got "
                         f"{cache_batch_idx.tolist()}")
    bsz, t, _, d = q.shape
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    lengths = _cache_seqlens(cache_seqlens, bsz, capacity, k_cache.device)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}")
    left, right = window_size
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both new keys and values, or neither")
    if (rotary_cos is None) != (rotary_sin is None) or (rotary_cos is not None and k is None):
        raise ValueError("rotary_cos, rotary_sin: expected both, and only with new k/v (FlashAttention rotates "
                         "them as they are written)")
    n_new = 0
    if k is not None:
        for name, t_new in (("k", k), ("v", v)):
            want = (bsz, k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else "seqlen_new",
                    k_cache.shape[2], (k_cache if name == "k" else v_cache).shape[3])
            if not isinstance(t_new, torch.Tensor) or t_new.dim() != 4 or tuple(t_new.shape) != want:
                raise ValueError(f"{name}: expected shape {want}, got {_shape(t_new)}")
            if t_new.dtype != k_cache.dtype or t_new.device != k_cache.device:
                raise ValueError(f"{name}: expected dtype {k_cache.dtype} on {k_cache.device} (the cache's), got "
                                 f"{t_new.dtype} on {t_new.device}")
        n_new = k.shape[1]
    if not lengths.is_cuda and lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) + n_new > capacity):
        # (lengths on the device are not read back, as in subquad.decode.) A negative length would write the new
        # keys at the end of the cache and one past the cache would read beyond it
        raise ValueError(f"cache_seqlens: expected lengths in [0, {capacity - n_new}] (room for {n_new} new tokens "
                         f"in a cache of {capacity}), got {lengths.tolist()}")
    if k is not None:
        pos = lengths.long()[:, None] + torch.arange(n_new, device=lengths.device)
        if rotary_cos is not None:
            cos, sin = _rotary_tables(rotary_cos, rotary_sin, d, capacity, q.dtype)
            k = apply_rotary(k, cos[pos], sin[pos], rotary_interleaved)
            q_pos = lengths.long()[:, None] + torch.arange(t, device=lengths.device) \
                if causal or tuple(window_size) != (-1, -1) else lengths.long()[:, None].expand(bsz, t)
            q = apply_rotary(q, cos[q_pos], sin[q_pos], rotary_interleaved)
        _append(k_cache, k, pos, block_table)
        _append(v_cache, v, pos, block_table)
    total = lengths + n_new
    view = KVView(k_cache, v_cache, total, "paged" if block_table is not None else "dense",
                  block_table=None if block_table is None else block_table.to(torch.int32))
    if (causal or t == 1) and t <= MAX_NEW_TOKENS:
        # decode's queries sit at the last t positions and see the keys up to their own (FlashAttention's causal
        # mask, or for one query every key); its window counts the query itself
        options = {"num_splits": num_splits} if num_splits > 0 else {}
        out, lse = decode(q, view, window=left + 1 if left >= 0 else None, scale=softmax_scale, softcap=softcap,
                          alibi_slopes=alibi_slopes, return_lse=True, backend=backend, **options)
    else:
        out, lse = _attend_gathered(q, view, causal, window_size, softmax_scale, softcap, alibi_slopes, backend)
    return (out, lse) if return_softmax_lse else out

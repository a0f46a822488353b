"""Decoding: a few new query tokens against a KV cache, ``subquad.decode``."""

from __future__ import annotations

import torch

from ..._checks import check_backend, check_scale_softcap, softcap_or_none
from ...cache import KVCache, KVView
from ..grid import check_triton_device
from ..softmax.sinks import check_sinks, with_sinks
from .reference import decode_reference

BACKENDS = ("auto", "triton", "reference")
#: the most new tokens per sequence one kernel call packs (speculative decoding drafts)
MAX_NEW_TOKENS = 16


_FULL_LENGTHS: dict = {}


def _full_lengths(bsz: int, s: int, device) -> torch.Tensor:
    """``(bsz,)`` int32 filled with ``s``, built once per shape (no allocation and fill kernel per step)."""
    key = (bsz, s, str(device))
    if key not in _FULL_LENGTHS:
        if len(_FULL_LENGTHS) > 256:
            _FULL_LENGTHS.clear()
        _FULL_LENGTHS[key] = torch.full((bsz,), s, dtype=torch.int32, device=device)
    return _FULL_LENGTHS[key]


def _as_view(kv, v, seqlens) -> KVView:
    if isinstance(kv, KVCache):
        if v is not None or seqlens is not None:
            raise ValueError("v, seqlens: expected None when a cache is passed (it knows its own)")
        return kv.view()
    if isinstance(kv, KVView):
        if v is not None or seqlens is not None:
            raise ValueError("v, seqlens: expected None when a KVView is passed")
        return kv
    if not isinstance(kv, torch.Tensor) or not isinstance(v, torch.Tensor) or kv.dim() != 4 or v.dim() != 4 \
            or kv.shape[:3] != v.shape[:3]:
        raise ValueError("kv: expected a KVCache, a KVView, or k (batch, seq, heads_kv, head_dim) with v "
                         f"(batch, seq, heads_kv, head_dim_v); got {type(kv).__name__} and {type(v).__name__}"
                         + (f" {tuple(kv.shape)}, {tuple(v.shape)}" if isinstance(kv, torch.Tensor)
                            and isinstance(v, torch.Tensor) else ""))
    bsz, s = kv.shape[:2]
    max_seqlen = s
    traced = torch.compiler.is_compiling()
    if seqlens is None:
        seqlens = torch.full((bsz,), s, dtype=torch.int32, device=kv.device) if traced else \
            _full_lengths(bsz, s, kv.device)
    else:
        if not isinstance(seqlens, torch.Tensor) or seqlens.shape != (bsz,) or seqlens.dtype.is_floating_point:
            raise ValueError(f"seqlens: expected an integer tensor of shape ({bsz},), got "
                             f"{tuple(seqlens.shape) if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__}")
        max_seqlen = None
        if not traced and not seqlens.is_cuda and seqlens.numel() \
                and not (0 <= int(seqlens.min()) and int(seqlens.max()) <= s):
            # (lengths on the device are not read back: the kernel reads at most the storage's ``seq`` keys)
            raise ValueError(f"seqlens: expected values in [0, {s}] (the keys stored), got {seqlens.tolist()}")
    return KVView(kv, v, seqlens.to(device=kv.device, dtype=torch.int32), "dense", max_seqlen=max_seqlen)


def _check(q: torch.Tensor, view: KVView, window, scale, softcap, alibi_slopes) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected shape (batch, new_tokens, heads_q, head_dim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    bsz, t, hq, d = q.shape
    hkv = view.k.shape[2]
    if bsz != view.batch:
        raise ValueError(f"q: expected batch {view.batch} (from the cache), got {bsz}")
    if d != view.k.shape[3]:
        raise ValueError(f"q: expected head_dim {view.k.shape[3]} (the cache's key width), got {d}")
    if hq % hkv != 0:
        raise ValueError(f"q: expected heads_q a multiple of heads_kv={hkv}, got {hq}")
    if t == 0:
        raise ValueError("q: expected at least one new token, got 0")
    if q.dtype != view.k.dtype or q.device != view.k.device:
        raise ValueError(f"q: expected dtype {view.k.dtype} on {view.k.device} (the cache's), got {q.dtype} on "
                         f"{q.device}")
    if view.v.dtype != view.k.dtype or view.v.device != view.k.device:
        raise ValueError(f"v: expected dtype {view.k.dtype} on {view.k.device} (k's), got {view.v.dtype} on "
                         f"{view.v.device}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"window: expected a positive int or None, got {window!r}")
    if window is not None and view.window is not None and window > view.window:
        # a ring (or a rolling cache's prefill view) holds only the keys its own window needs
        raise ValueError(f"window: expected at most the cache's window {view.window}, got {window}")
    check_scale_softcap(scale, softcap)
    if alibi_slopes is not None and (not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dim() not in (1, 2)
                                     or alibi_slopes.shape[-1] != hq
                                     or (alibi_slopes.dim() == 2 and alibi_slopes.shape[0] not in (1, bsz))):
        raise ValueError(f"alibi_slopes: expected a tensor of shape ({hq},) or ({bsz}, {hq}), got "
                         f"{tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else alibi_slopes!r}")
    if view.layout == "ring" and view.window is not None and t > view.k.shape[1] - view.window + 1:
        raise ValueError(f"q: a ring of {view.k.shape[1]} slots for window {view.window} serves at most "
                         f"{view.k.shape[1] - view.window + 1} new tokens per step, got {t}")


def decode(q: torch.Tensor, kv, v: torch.Tensor | None = None, *, seqlens: torch.Tensor | None = None,
           window: int | None = None, scale: float | None = None, softcap: float | None = None,
           alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None, return_lse: bool = False,
           backend: str = "auto", **kernel_options):
    """Attention of ``T`` new query tokens per sequence over a KV cache (split-KV flash-decoding on CUDA).

    Args:
        q: ``(batch, T, heads_q, head_dim)``, the new tokens (already written to the cache), at positions
            ``seqlens - T .. seqlens - 1``: each sees the keys up to its own position (causal among the new
            ones). The Triton kernel takes ``T <= 16``; the reference any ``T``.
        kv: a cache (``subquad.cache``), the ``KVView`` its ``update`` returned, or a key tensor
            ``(batch, seq, heads_kv, head_dim)`` with ``v`` ``(batch, seq, heads_kv, head_dim_v)`` and optional
            per-sequence ``seqlens`` ``(batch,)`` (default: all ``seq``).
        window: sliding window (keys a query sees, itself included); defaults to the cache's window.
        scale, softcap, alibi_slopes, sinks: as in ``subquad.attention``.
        return_lse: also return the log-sum-exp ``(batch, heads_q, T)`` fp32.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the reference), ``"triton"``, ``"reference"``.
        kernel_options: ``num_splits``, ``block_n``, ``block_m``, ``block_dv``, ``num_warps``, ``num_stages``,
            ``split_score_tile`` for the Triton kernel (benchmark sweeps).
    Returns:
        ``out`` ``(batch, T, heads_q, head_dim_v)`` (and ``lse``).
    """
    check_backend(backend, BACKENDS)
    softcap = softcap_or_none(softcap)
    view = _as_view(kv, v, seqlens)
    window = view.window if window is None else window
    _check(q, view, window, scale, softcap, alibi_slopes)
    if alibi_slopes is not None and alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes: expected device {q.device}, got {alibi_slopes.device}")
    if sinks is not None:
        check_sinks(sinks, q.shape[2], q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else "reference"
    if backend == "triton":
        check_triton_device(q)
        if q.shape[1] > MAX_NEW_TOKENS:
            raise ValueError(f"q: the Triton decode kernel takes at most {MAX_NEW_TOKENS} new tokens, got "
                             f"{q.shape[1]} (use subquad.attention for a prefill)")
        if torch.compiler.is_compiling():
            if kernel_options:
                raise ValueError(f"kernel_options: a traced call takes the default launch, got {kernel_options}")
            from .op import decode_traced

            out, lse = decode_traced(q.contiguous(), view, window=window, scale=scale, softcap=softcap,
                                     alibi_slopes=alibi_slopes)
        else:
            from .splitkv import decode_splitkv

            out, lse = decode_splitkv(q.contiguous(), view, window=window, scale=scale, softcap=softcap,
                                      alibi_slopes=alibi_slopes, **kernel_options)
    else:
        out, lse = decode_reference(q, view, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


__all__ = ["decode", "decode_reference", "BACKENDS", "MAX_NEW_TOKENS"]

"""Packed variable-length attention with FlashAttention's ``flash_attn_varlen_func`` contract.

Sequence ``i`` has its queries at ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` and its keys at
``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``; the two lengths may differ (chunked prefill over a cached prefix,
packed cross-attention). Causal masks and windows are aligned to the bottom right of each sequence, as in
FlashAttention: query ``t`` of a sequence with ``m`` queries and ``n`` keys sits at position ``t + n - m``.

Equal query and key lengths are packed documents: ``subquad.attention`` with the ``document`` pattern, so every
backend that runs documents can be chosen. Unequal lengths run the flash kernels (or the reference) at
positions laid out so that the kernels' existing terms are exact: each sequence gets a span of
``max(m, n)`` positions, its keys at the span's last ``n`` positions and its queries at its last ``m``. Then
``q_pos - k_pos`` is the bottom-right distance, the band term is FlashAttention's causal mask and window, ALiBi
sees the same distance, and the document term (one id per span) keeps sequences apart.
"""

from __future__ import annotations

import collections

import torch

from ... import masks as _masks
from ..._checks import check_backend, check_qkv, check_scale_softcap, integer_or_none, softcap_or_none
from ...masks.patterns import INF, Band, Document
from ...masks.plan import _positional_block_mask
from .dropout import check_dropout_p, new_rng
from .reference import Dropout, attention_reference
from .sinks import check_sinks, with_sinks

BACKENDS = ("auto", "triton", "reference", "fa4", "cudnn", "flex")


#: what a call's offsets make (the pattern, or positions and BlockMask), kept per offsets: a model's layers all
#: call with the same offsets, and the BlockMask's build and block lists are host work per call (on the H200,
#: 8 x 1,024 queries over 8 x 8,192 keys took 5.5 ms rebuilt each call against 2.6 for the kernels' batched form)
_PREPARED: collections.OrderedDict = collections.OrderedDict()
PREPARED_OFFSETS = 32


def _kept(key, make):
    hit = _PREPARED.get(key)
    if hit is None:
        hit = _PREPARED[key] = make()
        while len(_PREPARED) > PREPARED_OFFSETS:
            _PREPARED.popitem(last=False)
    else:
        _PREPARED.move_to_end(key)
    return hit


def _check_cu(name: str, cu, total: int) -> torch.Tensor:
    """The offsets, checked, as a host int64 tensor (read once: what is made from them is kept per their
    values)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point \
            or cu.dtype == torch.bool:
        shape = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name}: expected an integer tensor of shape (num_seqs + 1,), got {shape}")
    host = cu.detach().cpu().long()
    if int(host[0]) != 0 or bool((host[1:] < host[:-1]).any()) or int(host[-1]) != total:
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total} (the packed length), got "
                         f"{host.tolist() if host.numel() <= 16 else tuple(host.shape)}")
    return host


def _band(causal: bool, window_size) -> tuple[int, int]:
    """``(lo, hi)`` of the kept ``q_pos - k_pos`` from FlashAttention's ``causal`` and ``window_size=(left,
    right)`` (-1: unbounded)."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}")
    band = _masks.window(*window_size).inner
    return (max(band.lo, 0), band.hi) if causal else (band.lo, band.hi)


def _spans(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int):
    """``(q_pos, kv_pos, ids)``: the positions of the packed queries and keys, each sequence in a span of
    ``max(m, n)`` positions aligned at its end, and the span's sequence index at every position."""
    m, n = cu_q.diff(), cu_k.diff()
    width = torch.maximum(m, n)
    end = width.cumsum(0)
    seqs = torch.arange(width.numel(), device=cu_q.device)
    ids = seqs.repeat_interleave(width)
    # token t of sequence i, at offset t - cu[i] in it: end[i] - length[i] + offset = t + (end[i] - cu[i + 1])
    q_seq = seqs.repeat_interleave(m)
    k_seq = seqs.repeat_interleave(n)
    q_pos = torch.arange(total_q, device=cu_q.device) + (end - cu_q[1:])[q_seq]
    kv_pos = torch.arange(total_k, device=cu_q.device) + (end - cu_k[1:])[k_seq]
    return q_pos, kv_pos, ids


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, *, causal: bool = False, window_size=(-1, -1),
                     scale: float | None = None, softcap: float | None = None,
                     alibi_slopes: torch.Tensor | None = None, return_lse: bool = False, backend: str = "auto",
                     deterministic: bool | None = None, sinks: torch.Tensor | None = None,
                     dropout_p: float = 0.0):
    """Attention over packed sequences, as FlashAttention's ``flash_attn_varlen_func``.

    Args:
        q: ``(total_q, heads_q, head_dim)``, the sequences' queries one after another.
        k, v: ``(total_k, heads_kv, head_dim[_v])``; ``heads_q`` a multiple of ``heads_kv``.
        cu_seqlens_q, cu_seqlens_k: ``(num_seqs + 1,)`` integer offsets from 0 to ``total_q`` / ``total_k``
            (``cu_seqlens_k`` defaults to ``cu_seqlens_q``). Read on the host.
        max_seqlen_q, max_seqlen_k: accepted for FlashAttention's signature and checked when given; not needed.
        causal: each query sees the keys up to its bottom-right aligned position (a sequence with more queries
            than keys: its first queries see none, output 0, LSE ``-inf``).
        window_size: ``(left, right)``: keys from ``left`` positions before the query's to ``right`` after; -1
            is unbounded. With ``causal`` the right side is 0.
        scale, return_lse, deterministic, sinks, dropout_p: as ``subquad.attention`` (dropout on ``"triton"``
            and ``"reference"``; a pair's draw follows its row in the packed tensors).
        softcap: as ``subquad.attention``; 0 is no softcap, as in FlashAttention.
        alibi_slopes: ``(heads_q,)``: ``-slope * |q_pos - k_pos|`` with the bottom-right aligned positions.
        backend: as ``subquad.attention`` when the query and key lengths are equal (packed documents). Unequal
            lengths run ``"triton"`` (fp16 / bf16 on a GPU), ``"reference"`` (``"auto"`` picks between these
            two) or ``"fa4"`` (FlashAttention-4's varlen kernels where installed: no ALiBi, no deterministic
            backward).

    Returns:
        ``(total_q, heads_q, head_dim_v)``, and with ``return_lse`` the log-sum-exp ``(heads_q, total_q)`` fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape (total_tokens, heads, head_dim), got {shape}")
    check_backend(backend, BACKENDS)
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected the keys' offsets ({k.shape[0]} keys, {q.shape[0]} queries), got "
                         f"None (which takes cu_seqlens_q)")
    cu_k = cu_q if cu_seqlens_k is None else _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_q.numel()} offsets ({cu_q.numel() - 1} sequences, as "
                         f"cu_seqlens_q), got {cu_k.numel()}")
    for name, given, cu in (("max_seqlen_q", max_seqlen_q, cu_q), ("max_seqlen_k", max_seqlen_k, cu_k)):
        # (FlashAttention's callers pass Python, NumPy or 0-d tensor integers)
        if given is not None and (integer_or_none(given) is None or int(given) < int(cu.diff().max())):
            raise ValueError(f"{name}: expected an integer at least the longest sequence ({int(cu.diff().max())}), "
                             f"got {given!r}")
    dropout_p = check_dropout_p(dropout_p, backend)
    lo, hi = _band(causal, window_size)
    softcap = softcap_or_none(softcap)
    if alibi_slopes is not None and (not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.shape != (q.shape[1],)):
        shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else type(alibi_slopes).__name__
        raise ValueError(f"alibi_slopes: expected shape ({q.shape[1]},) (one slope per query head; per-sequence "
                         f"slopes are not supported), got {shape}")
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _without_pairs(q, k, v, scale, softcap, sinks, return_lse)
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    check_qkv(q4, k4, v4)
    offsets = (tuple(cu_q.tolist()), tuple(cu_k.tolist()), lo, hi, str(q.device))
    if offsets[0] == offsets[1]:
        # packed documents: every backend that runs the document pattern may be chosen
        from . import attention

        band_causal = lo == 0 and hi == INF

        def make():
            ids = torch.arange(cu_q.numel() - 1).repeat_interleave(cu_q.diff()).to(q.device)
            mask = _masks.document(ids)
            return mask & Band(lo, hi) if not band_causal and (lo, hi) != (-INF, INF) else mask

        mask = _kept(("documents", *offsets), make)
        result = attention(q4, k4, v4, causal=band_causal, mask=mask, scale=scale, softcap=softcap,
                           alibi_slopes=alibi_slopes, return_lse=return_lse, backend=backend,
                           deterministic=deterministic, sinks=sinks, dropout_p=dropout_p)
        out, lse = result if return_lse else (result, None)
    else:
        out, lse = _positions_call(q4, k4, v4, cu_q, cu_k, lo, hi, scale, softcap, alibi_slopes, backend,
                                   deterministic, sinks, offsets, dropout_p)
    return (out[0], lse[0]) if return_lse else out[0]


def _without_pairs(q, k, v, scale, softcap, sinks, return_lse):
    """No query or no key in the whole batch (every KV cache empty, say), which the kernels do not take: every
    query's output 0 and LSE -inf, as for any query that sees no key (with sinks, the sink's logit), once the
    arguments are checked as a call with pairs checks them."""
    check_qkv(*(t.new_empty(1, 1, *t.shape[1:]) for t in (q, k, v)))
    check_scale_softcap(scale, softcap)
    out = q.new_zeros(1, q.shape[0], q.shape[1], v.shape[2])
    lse = torch.full((1, q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    if sinks is not None:
        check_sinks(sinks, q.shape[1], q.device)
        out, lse = with_sinks(out, lse, sinks)
    return (out[0], lse[0]) if return_lse else out[0]


def _positions_call(q, k, v, cu_q, cu_k, lo, hi, scale, softcap, alibi_slopes, backend, deterministic, sinks,
                    offsets, dropout_p=0.0):
    check_scale_softcap(scale, softcap)
    if sinks is not None:
        check_sinks(sinks, q.shape[2], q.device)
    if alibi_slopes is not None and alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes: expected device {q.device}, got {alibi_slopes.device}")
    if backend in ("cudnn", "flex"):
        raise ValueError(f"backend: sequences whose query and key lengths differ run on 'triton', 'fa4' or "
                         f"'reference', got {backend!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "fa4":
        out, lse = _fa4_call(q, k, v, cu_q, cu_k, lo, hi, scale, softcap, alibi_slopes, deterministic)
        return with_sinks(out, lse, sinks) if sinks is not None else (out, lse)
    kernels = q.dtype in (torch.float16, torch.bfloat16) and (backend == "triton" or q.is_cuda and backend == "auto")
    from .dispatch import trainable_slopes

    if kernels and trainable_slopes(alibi_slopes):
        if backend == "triton":
            raise ValueError("alibi_slopes: slopes that require grad are differentiated by the reference backend "
                             "only; pass alibi_slopes.detach() or backend='reference'")
        kernels = False
    total_q, hq, d = q.shape[1:]
    total_k = k.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    if kernels:
        from .flash import _mask_block, flash_attention_masked

        block = _mask_block(q.device)
    else:
        block = 128

    def make():
        q_pos, kv_pos, ids = _spans(cu_q.to(q.device), cu_k.to(q.device), total_q, total_k)
        pattern = Document(ids)
        if (lo, hi) != (-INF, INF):
            pattern = pattern & Band(lo, hi)
        ctx = _masks.BuildContext(1, hq, total_q, total_k, q.device)
        return q_pos, kv_pos, _positional_block_mask(pattern, pattern, ctx, total_q, total_k, q_pos, kv_pos, block,
                                                     block, 1, hq, q.device)

    q_pos, kv_pos, block_mask = _kept(("positions", *offsets, hq, block), make)
    rng = new_rng(q.device, dropout_p) if dropout_p else None
    if kernels:
        out, lse = flash_attention_masked(q, k, v, block_mask, scale, softcap, alibi_slopes, q_pos=q_pos,
                                          kv_pos=kv_pos, deterministic=deterministic,
                                          dropout=(dropout_p, rng) if dropout_p else None)
    else:
        out, lse = attention_reference(q, k, v, block_mask, scale, softcap, alibi_slopes, q_pos, kv_pos,
                                       dropout=Dropout(dropout_p, rng, hq, total_q, total_k) if dropout_p else None)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return out, lse


def _fa4_call(q, k, v, cu_q, cu_k, lo, hi, scale, softcap, alibi_slopes, deterministic):
    """FlashAttention-4's own varlen kernels (which align causal masks and windows bottom-right per sequence as
    this function does)."""
    from . import fa4

    why = fa4.unsupported_reason(q, k, v, softcap=softcap, alibi_slopes=alibi_slopes)
    if why is None and deterministic:
        why = "it has no deterministic backward here"
    if why is not None:
        raise ValueError(f"backend: 'fa4' cannot run this call: {why}")
    causal, window = fa4.band_window(lo, hi)
    _, flash_attn_varlen_func, _ = fa4._interface()
    out, lse = flash_attn_varlen_func(
        q[0], k[0], v[0], cu_seqlens_q=cu_q.to(q.device, torch.int32), cu_seqlens_k=cu_k.to(q.device, torch.int32),
        max_seqlen_q=int(cu_q.diff().max()), max_seqlen_k=int(cu_k.diff().max()), causal=causal,
        window_size=window, softmax_scale=scale, softcap=0.0 if softcap is None else float(softcap), return_lse=True)
    return out.unsqueeze(0), lse.unsqueeze(0)


__all__ = ["varlen_attention"]

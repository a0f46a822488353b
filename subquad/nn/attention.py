"""Softmax attention as a token mixer: MHA / GQA / MQA, any ``subquad.masks`` pattern, RoPE or ALiBi, softcap.

Without a cache the whole sequence goes through ``subquad.attention`` (the flash kernel on the GPU). With a
cache (``new_cache``) the new tokens' K/V are appended and the new queries attend over what is stored:

* full causal attention: a ``StaticKVCache`` (memory O(max_len));
* a sliding window (``window=``, Gemma's local layers, Mistral): a ``RollingKVCache`` of ``window`` slots, so
  a decoding step reads O(window) keys whatever the length of the stream;
* any other pattern (strided, dilated, Longformer, ...): a ``StaticKVCache``, the pattern evaluated for the
  new queries aligned to the end of the stored keys.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masks
from .._checks import check_scale_softcap
from ..cache import KVView, RollingKVCache, StaticKVCache
from ..ops.decode import MAX_NEW_TOKENS, decode, decode_reference
from ..ops.softmax import attention
from ..ops.softmax.dropout import check_dropout_p
from ..ops.softmax.sinks import with_sinks
from .positions import RopeScaling, RotaryEmbedding, alibi_slopes, rotary_dim

POSITIONS = ("rope", "alibi", "none")


def check_heads(d_model: int, heads: int, kv_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """Validated ``(kv_heads, head_dim)``; ``head_dim`` defaults to ``d_model / heads``."""
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads: expected a positive int, got {heads!r}")
    if head_dim is None:
        if d_model % heads:
            raise ValueError(f"d_model: expected a multiple of heads={heads} (head_dim = d_model / heads), got "
                             f"{d_model}")
        head_dim = d_model // heads
    kv_heads = heads if kv_heads is None else kv_heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"kv_heads: expected a positive divisor of heads={heads} (GQA/MQA), got {kv_heads!r}")
    return kv_heads, head_dim


def cache_positions(cache, seq_len: int, device) -> torch.Tensor:
    """``(B, T)`` absolute positions of ``seq_len`` new tokens appended to ``cache`` (before the update)."""
    return cache.seqlens.to(device=device, dtype=torch.long).view(-1, 1) + torch.arange(seq_len, device=device)


def check_kv_cache(cache, layer, window: int | None, heads_kv: int, head_dim: int, head_dim_v: int, batch: int):
    """A layer with a window takes a rolling or a static cache; without one, only a static cache (a ring
    would silently drop keys the layer must see)."""
    kinds = (RollingKVCache, StaticKVCache) if window is not None else (StaticKVCache,)
    name = type(layer).__name__
    if not isinstance(cache, kinds):
        raise ValueError(f"cache: expected {' or '.join(k.__name__ for k in kinds)} for this {name} layer "
                         f"(window={window}; use layer.new_cache()), got {type(cache).__name__}")
    if isinstance(cache, RollingKVCache) and cache.window < window:
        raise ValueError(f"cache: expected a RollingKVCache of window >= {window}, got window {cache.window}")
    if (cache.batch, cache.heads_kv, cache.head_dim, cache.head_dim_v) != (batch, heads_kv, head_dim, head_dim_v):
        raise ValueError(f"cache: expected batch {batch}, heads_kv {heads_kv}, head_dim {head_dim}, head_dim_v "
                         f"{head_dim_v}; got {cache.batch}, {cache.heads_kv}, {cache.head_dim}, {cache.head_dim_v}")


def rows_by_length(lengths: torch.Tensor):
    """``(n, rows)`` for each length ``n`` among a cache's sequences, ``rows`` the batch indices (a tensor on
    ``lengths``' device) of the sequences of that length: a prefill over a cache attends one group at a time,
    its queries aligned to its own end."""
    host = [int(n) for n in lengths.tolist()]
    for n in sorted(set(host)):
        yield n, torch.tensor([b for b, m in enumerate(host) if m == n], device=lengths.device)


def attend_cached(q: torch.Tensor, view: KVView, *, window: int | None, pattern, scale: float | None,
                  softcap: float | None, alibi: torch.Tensor | None, backend: str,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The ``T`` new queries ``q`` (positions ``seqlens - T .. seqlens - 1``) over a cache's view, causal.

    Decoding steps (``T <= 16``) without a general pattern run ``subquad.decode`` (split-KV on the GPU,
    reading ring slots in place); prefills and general patterns gather the keys in position order and run
    ``subquad.attention`` per group of sequences of one length (traced: ``attend_pattern_traced``).
    """
    t = q.shape[1]
    kv_dtype = view.k.dtype
    if pattern is None and t <= MAX_NEW_TOKENS:
        return decode(q.to(kv_dtype), view, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi,
                      sinks=sinks, backend=backend).to(q.dtype)
    if pattern is not None and torch.compiler.is_compiling():
        return attend_pattern_traced(q, view, pattern, scale=scale, softcap=softcap, alibi=alibi, sinks=sinks)
    k, v, lengths = view.dense()
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for n, idx in rows_by_length(lengths):
        if pattern is not None:
            mask = pattern.to_dense(t, n, batch=1, heads=1, device=q.device)[0, 0]
        else:
            mask = masks.sliding_window(window) if window is not None else None
        out[idx] = attention(q[idx], k[idx, :n].to(q.dtype), v[idx, :n].to(q.dtype), causal=True, mask=mask,
                             scale=scale, softcap=softcap, alibi_slopes=alibi, backend=backend, sinks=sinks)
    return out


def attend_pattern_traced(q: torch.Tensor, view: KVView, pattern: masks.Pattern, *, scale: float | None,
                          softcap: float | None, alibi: torch.Tensor | None,
                          sinks: torch.Tensor | None) -> torch.Tensor:
    """``attend_cached``'s pattern path as a traced step runs it: the groups by length read the lengths on the
    host (a graph break), so every sequence attends at once over the view padded to the storage, as
    ``subquad.decode``'s reference places them, the pattern's predicate evaluated on the device at each
    sequence's own positions (a ``score_mod``, which the kernels refuse); a query that sees no key gives
    zeros."""
    # (a ``prepare`` that read a tensor's values on the host would break the graph: ``Positions`` keeps its
    # last position as an int for this)
    prepared = pattern.prepare(masks.BuildContext(q.shape[0], q.shape[2], q.shape[1], view.capacity, q.device))
    kv_dtype = view.k.dtype
    out, lse = decode_reference(q.to(kv_dtype), view, window=None, scale=q.shape[-1] ** -0.5 if scale is None
                                else scale, softcap=softcap, alibi_slopes=alibi, pattern=prepared)
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    return out.to(q.dtype)


class Attention(nn.Module):
    """Multi-head softmax attention.

    Args:
        d_model: model width.
        heads: query heads; ``kv_heads`` key/value heads (a divisor: GQA; 1: MQA; default ``heads``: MHA).
        head_dim: defaults to ``d_model / heads``.
        causal: causal attention (a decoder); False for an encoder (no cache then).
        window: sliding-window attention over the ``window`` most recent keys (itself included); an encoder
            (``causal=False``): the keys within ``window // 2`` positions on either side.
        mask: any other ``subquad.masks`` pattern (intersected with causality when ``causal``).
        position: ``"rope"`` (default), ``"alibi"`` or ``"none"``.
        rope_base, partial_rotary, rope_scaling, rope_interleaved: RoPE's options (``rope_scaling`` a
            ``RopeScaling`` or the dict of its fields).
        softcap: Gemma-2's ``softcap * tanh(score / softcap)``.
        sinks: a learnable attention-sink logit per head (GPT-OSS; ``subquad.attention``'s ``sinks``), from 0.
        dropout: attention dropout on the probabilities while training (``subquad.attention``'s ``dropout_p``;
            none in eval mode or with a cache).
        backend: passed to ``subquad.attention`` / ``subquad.decode``.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 causal: bool = True, window: int | None = None, mask: masks.Pattern | None = None,
                 position: str = "rope", rope_base: float = 10000.0, partial_rotary: float = 1.0,
                 rope_scaling: RopeScaling | dict | None = None, rope_interleaved: bool = False,
                 softcap: float | None = None, sinks: bool = False, bias: bool = False, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.kv_heads, self.head_dim = check_heads(d_model, heads, kv_heads, head_dim)
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ValueError(f"window: expected a positive int or None, got {window!r}")
        if window is not None and mask is not None:
            raise ValueError("mask: pass either window= or mask=, not both (combine patterns with & / |)")
        if mask is not None and not isinstance(mask, masks.Pattern):
            raise ValueError(f"mask: expected a subquad.masks pattern, got {type(mask).__name__}")
        if position not in POSITIONS:
            raise ValueError(f"position: expected one of {POSITIONS}, got {position!r}")
        check_scale_softcap(None, softcap)
        # the probability as given, as nn.Dropout keeps it (each call uses it as a multiple of 1/256)
        check_dropout_p(dropout, backend)
        self.dropout = float(dropout)
        self.d_model, self.heads, self.causal, self.window = d_model, heads, causal, window
        self.pattern, self.position, self.softcap, self.backend = mask, position, softcap, backend
        self.q_proj = nn.Linear(d_model, heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, d_model, bias=bias)
        if isinstance(rope_scaling, dict):
            rope_scaling = RopeScaling(**rope_scaling)
        self.rope = RotaryEmbedding(rotary_dim(self.head_dim, partial_rotary), rope_base, rope_scaling,
                                    rope_interleaved) if position == "rope" else None
        self.register_buffer("alibi", alibi_slopes(heads) if position == "alibi" else None, persistent=False)
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None

    def _apply(self, fn, recurse=True):
        # the ALiBi slopes stay fp32 through model.to(bfloat16), as the kernels read them: rounded (heads not a
        # power of two) a slope is 0.4% off, a bias of ~8 at 4,000 tokens off by ~0.03
        super()._apply(fn, recurse)
        if self.alibi is not None:
            self.alibi = alibi_slopes(self.heads).to(self.alibi.device)
        return self

    def _mask(self):
        return masks.sliding_window(self.window, causal=self.causal) if self.window is not None else self.pattern

    def new_cache(self, batch: int, max_len: int, *, dtype=None, device=None, max_step: int = 1):
        """A ``RollingKVCache`` of ``window + max_step - 1`` slots for a windowed layer (steps of up to ``max_step``
        tokens), else a ``StaticKVCache`` (steps of any length)."""
        if not self.causal:
            raise ValueError("cache: a non-causal (encoder) attention layer has no generation cache")
        w = self.q_proj.weight
        dtype, device = dtype or w.dtype, device or w.device
        if self.window is not None:
            return RollingKVCache(batch, self.window, self.kv_heads, self.head_dim, dtype=dtype, device=device,
                                  max_step=max_step)
        return StaticKVCache(batch, max_len, self.kv_heads, self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.heads, self.head_dim)
        k, v = self.kv_proj(x).view(bsz, seq_len, 2, self.kv_heads, self.head_dim).unbind(2)
        if cache is not None:
            if not self.causal:
                raise ValueError("cache: a non-causal (encoder) attention layer takes no cache")
            check_kv_cache(cache, self, self.window, self.kv_heads, self.head_dim, self.head_dim, bsz)
            positions = cache_positions(cache, seq_len, x.device)
        else:
            positions = torch.arange(seq_len, device=x.device)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        alibi = self.alibi if self.alibi is None else self.alibi.to(x.device)
        if cache is None:
            o = attention(q, k, v, causal=self.causal, mask=self._mask(), softcap=self.softcap, alibi_slopes=alibi,
                          backend=self.backend, sinks=self.sinks, dropout_p=self.dropout if self.training else 0.0)
        else:
            view = cache.update(k, v)
            o = attend_cached(q, view, window=self.window, pattern=self.pattern, scale=None, softcap=self.softcap,
                              alibi=alibi, backend=self.backend, sinks=self.sinks)
        return self.o_proj(o.reshape(bsz, seq_len, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        parts = [f"heads={self.heads}", f"kv_heads={self.kv_heads}", f"head_dim={self.head_dim}",
                 f"position={self.position}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.pattern is not None:
            parts.append(f"mask={self.pattern!r}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.sinks is not None:
            parts.append("sinks")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return ", ".join(parts)

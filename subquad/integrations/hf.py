"""Hugging Face transformers integration (optional: ``pip install 'subquad[hf]'``).

Two ways in:

* ``register_attention(name="subquad", pattern=None)`` registers subquad's attention with transformers'
  ``AttentionInterface`` under ``name``, so ``from_pretrained(..., attn_implementation="subquad")`` (or
  ``model.set_attn_implementation("subquad")``) runs every self-attention of a Llama-family model (Llama,
  Mistral, Qwen, Gemma, ... and BERT in transformers >= 5) through ``subquad.attention``: flash kernels on the
  GPU, GQA without repeating K/V, softcap and sliding windows as the model asks. ``pattern`` (a
  ``subquad.masks`` pattern) restricts attention further (e.g. a sliding window on a model trained dense).
  The mask function is registered too (``sdpa_mask``: boolean ``(B, 1, N_q, N_kv)``): without it, transformers
  passes ``attention_mask=None`` to a custom function and padding would be silently ignored.
* ``swap_attention(model, mechanism)`` replaces the self-attention modules of a loaded BERT-family encoder
  (BERT, RoBERTa, MiniLM, ...: modules with ``query``/``key``/``value`` projections) by a subquad mechanism:
  ``"exact"``, ``"sliding_window"``, ``"longformer"``, ``"bigbird"`` (patterns, padding respected) or
  ``"linear"`` (a kernel feature map: linear in the sequence length).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .. import masks
from ..masks.patterns import Tensor  # (a pattern per call: no copy, unlike masks.from_tensor)
from ..ops.linear import linear_attention
from ..ops.linear.feature_maps import apply_feature_map, resolve_feature_map
from ..ops.softmax import attention
from ..ops.softmax.dropout import check_dropout_p

MECHANISMS = ("exact", "sliding_window", "longformer", "bigbird", "linear")


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("subquad.integrations.hf needs transformers: pip install 'subquad[hf]'") from err
    return transformers


def keep_mask(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """transformers' 4-D mask -> boolean keep mask ``(B, 1, N_q, N_kv)``: a boolean mask is used as is, an additive
    float mask (eager style, 0 = keep, a large negative = drop) is thresholded. None stays None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: expected a 4-D mask (batch, 1, q_len, kv_len), got "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask[..., :kv_len]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def subquad_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, softcap: float | None = None, sliding_window: int | None = None,
                              *, s_aux: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                              pattern: masks.Pattern | None = None, backend: str = "auto",
                              is_causal: bool | None = None, **kwargs):
    """An ``AttentionInterface`` function: ``query`` ``(B, H_q, N_q, D)``, ``key``/``value`` ``(B, H_kv, N_kv, D)``
    (transformers' layout) -> ``(out (B, N_q, H_q, D), None)``. ``dropout``: transformers passes the model's
    attention dropout while training, 0 in eval (``attention``'s ``dropout_p``). ``s_aux``: GPT-OSS's per-head
    attention sinks (``attention``'s ``sinks``). ``position_bias``: T5's relative bias ``(B or 1, H_q, N_q, N_kv)``,
    added to the scores (``attention``'s ``score_mod``: the reference backend unless one is named). Causality
    follows transformers' SDPA function: ``is_causal`` when the model passes it, else the module's ``is_causal``,
    and only where no mask came (the mask then holds it)."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    keep = keep_mask(attention_mask, k.shape[1])
    # CLIP's text encoder passes is_causal=True to layers whose own attribute says False; and a mask, when present,
    # is the whole truth: Gemma 3's image tokens and prefix-LMs see later keys that causality would drop
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal) and keep is None
    if causal and 1 < q.shape[1] < k.shape[1]:
        # transformers drops the mask with more keys than queries only for the prefill of an empty static cache:
        # the keys past the queries are unfilled slots (SDPA's top-left causality; ours is bottom-right)
        k, v = k[:, :q.shape[1]], v[:, :q.shape[1]]
    if pattern is not None and keep is not None and k.shape[1] > q.shape[1]:
        # a static cache's keys run to its full length, its unfilled slots masked out: a pattern's positions are
        # aligned to the keys' end, so the keys stop at the last one any query keeps (one read of the mask)
        kept = keep.flatten(0, 2).any(0).nonzero()
        filled = max(int(kept.max()) + 1 if kept.numel() else k.shape[1], q.shape[1])
        k, v, keep = k[:, :filled], v[:, :filled], keep[..., :filled]
    mask = pattern
    if sliding_window and keep is None:  # (a mask holds the window too, with Gemma 3's image tokens past it)
        window = masks.sliding_window(int(sliding_window))
        mask = window if mask is None else mask & window
    if keep is not None:
        mask = Tensor(keep) if mask is None else mask & Tensor(keep)
    score_mod = None
    if position_bias is not None:
        # (T5's bias was swallowed with the other keywords: T5 ran without its relative positions)
        bias = position_bias[..., :k.shape[1]].expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        offset = k.shape[1] - q.shape[1]  # score_mod's query positions are aligned to the keys' end

        def score_mod(score, b, h, q_pos, k_pos):
            return score + bias[b, h, q_pos - offset, k_pos]

        # flex compiles again for each new score_mod, and the bias is new at every call
        backend = "reference" if backend == "auto" else backend
    out = attention(q, k, v, causal=causal, mask=mask, scale=scaling, softcap=softcap, backend=backend,
                    sinks=s_aux, dropout_p=dropout, score_mod=score_mod)
    return out, None


def register_attention(name: str = "subquad", pattern: masks.Pattern | None = None, backend: str = "auto") -> str:
    """Register subquad's attention (restricted by ``pattern`` if given) and its mask function under ``name``.
    Returns ``name`` (for ``attn_implementation=``)."""
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, partial(subquad_attention_forward, pattern=pattern, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class SubquadSelfAttention(nn.Module):
    """A BERT-family self-attention with the original ``query``/``key``/``value`` projections, computed by a
    subquad mechanism. Returns ``(context (B, N, hidden), None)`` as transformers' self-attention modules do. The
    original's attention dropout applies while training (``attention``'s ``dropout_p``: the "triton" and
    "reference" backends, or "auto"), except in linear attention."""

    def __init__(self, original: nn.Module, mechanism: str = "exact", *, window: int = 128,
                 global_tokens=(0,), random_blocks: int = 3, block: int = 64, feature_map="elu1",
                 backend: str = "auto"):
        super().__init__()
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism: expected one of {MECHANISMS}, got {mechanism!r}")
        if getattr(original, "is_causal", False):
            # a decoder's layer (is_decoder=True): its mask is often None, causality left to the layer, and its
            # KV cache lives in the layer; this module runs bidirectional and keeps no cache
            raise ValueError("original: expected an encoder's self-attention, got a causal (decoder) one; use "
                             "register_attention for decoders")
        self.query, self.key, self.value = original.query, original.key, original.value
        self.heads = original.num_attention_heads
        self.head_dim = original.attention_head_size
        self.scaling = getattr(original, "scaling", self.head_dim ** -0.5)
        self.mechanism, self.backend = mechanism, backend
        # BERT's attention_probs_dropout_prob, which its attention applies while training (none in linear
        # attention, which has no probabilities)
        dropout = getattr(original, "dropout", None)
        self.dropout = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        check_dropout_p(self.dropout)
        self.phi = resolve_feature_map(feature_map) if mechanism == "linear" else None
        if isinstance(self.phi, nn.Module):
            self.add_module("feature_map", self.phi)
        self.pattern = {"exact": None,
                        "sliding_window": masks.sliding_window(window, causal=False) if mechanism == "sliding_window"
                        else None,
                        "longformer": masks.longformer(window, list(global_tokens)) if mechanism == "longformer"
                        else None,
                        "bigbird": masks.bigbird(window, list(global_tokens), random_blocks, block=block)
                        if mechanism == "bigbird" else None,
                        "linear": None}[mechanism]
        # (swapped into a model in eval mode, it stays there: its dropout follows the mode)
        self.train(original.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        bsz, n, _ = hidden_states.shape
        shape = (bsz, n, self.heads, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.query, self.key, self.value))
        keep = keep_mask(attention_mask, n)
        if self.mechanism == "linear":
            fq = apply_feature_map(self.phi, q, is_query=True)
            fk = apply_feature_map(self.phi, k, is_query=False)
            if keep is not None:  # padded keys leave both the sum and the normaliser
                key_kept = keep[:, 0].any(dim=1)  # (B, N_kv)
                fk = fk * key_kept[:, :, None, None].to(fk.dtype)
            out = linear_attention(fq, fk, v, "identity", causal=False, backend=self.backend)
        else:
            mask = self.pattern
            if keep is not None:
                mask = Tensor(keep) if mask is None else mask & Tensor(keep)
            out = attention(q, k, v, mask=mask, scale=self.scaling, backend=self.backend,
                            dropout_p=self.dropout if self.training else 0.0)
        return out.reshape(bsz, n, self.heads * self.head_dim), None

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism}, heads={self.heads}, head_dim={self.head_dim}" + (
            f", dropout={self.dropout}" if self.dropout else "")


def _is_bert_self_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")) \
        and hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size") \
        and not getattr(module, "is_cross_attention", False)


def swap_attention(model: nn.Module, mechanism: str = "exact", **options) -> int:
    """Replace every BERT-family self-attention in ``model`` (in place) by ``SubquadSelfAttention(mechanism,
    **options)``; returns how many were replaced (ValueError if none)."""
    targets = [(name, m) for name, m in model.named_modules() if _is_bert_self_attention(m)]
    if not targets:
        raise ValueError("model: expected a BERT-family encoder (self-attention modules with query/key/value "
                         "projections), found none")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SubquadSelfAttention(module, mechanism, **options))
    return len(targets)


__all__ = ["register_attention", "subquad_attention_forward", "swap_attention", "SubquadSelfAttention",
           "keep_mask", "MECHANISMS"]

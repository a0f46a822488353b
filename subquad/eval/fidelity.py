"""Fidelity of a swapped attention: how far a model's predictions move when its exact softmax attention layers
are replaced by a cheaper mechanism with the same trained weights, before any fine-tuning.

``replace_attention`` converts the exact layers (letters ``A`` and ``G``: ``Attention`` with neither a window nor
a mask) of a ``HybridLM`` into a new model; every other weight is copied unchanged:

* ``"window"``: sliding-window softmax attention (letter ``L``), the same projections and RoPE; only the keys
  further back than ``window`` are dropped. Exact while the sequence fits in the window.
* ``"linear"``: linear attention (letter ``F``) with the layer's Q, K and V projections fused into ``qkv_proj``
  (GQA/MQA key/value heads repeated for their query heads) and its output projection. Softmax's exponential is
  replaced by ``feature_map`` and RoPE is dropped (linear attention has no positions); a learnable map
  (``"hedgehog"``) starts from its fresh initialisation, untrained.
* ``"gqa"``: ``kv_heads`` key/value heads, each the mean of its group (the GQA paper's conversion, as
  ``HybridLM.to_gqa`` makes it, but of the exact layers only).

``fidelity`` then runs both models on the same token windows: the relative L2 error of the logits, the KL
divergence of the next-token distributions (exact || swapped), and each model's bits per token and perplexity.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from ..models import HybridLM
from ..nn import Attention, LinearAttention
from ..nn.registry import DEFAULT_WINDOW, lookup

MECHANISMS = ("window", "linear", "gqa")
EXACT_LETTERS = "AG"
# the letter each mechanism's layers take in the swapped model's pattern
SWAPPED_LETTER = {"window": "L", "linear": "F"}


def _is_exact(mixer) -> bool:
    return isinstance(mixer, Attention) and mixer.window is None and mixer.pattern is None


def replace_attention(model: HybridLM, mechanism: str, *, window: int = 128, feature_map: str = "elu1",
                      kv_heads: int = 1) -> HybridLM:
    """A new ``HybridLM`` with every exact softmax attention layer of ``model`` replaced by ``mechanism`` (one of
    ``MECHANISMS``; see the module's doc for what each keeps). ``model`` is not changed; the new model is in eval
    mode on ``model``'s device, and its ``config`` rebuilds it."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism: expected one of {MECHANISMS}, got {mechanism!r}")
    if not isinstance(model, HybridLM):
        raise ValueError(f"model: expected a HybridLM, got {type(model).__name__}")
    exact = [i for i, blk in enumerate(model.blocks) if _is_exact(blk.mixer)]
    if not exact:
        raise ValueError(f"model: expected exact softmax attention layers (A or G), got layers "
                         f"{model.layer_letters!r}")
    if mechanism == "gqa":
        # the exact layers' letters alone: the sliding-window and differential layers keep their key/value heads
        return copy.deepcopy(model).to_gqa(kv_heads, letters="".join({model.layer_letters[i] for i in exact})).eval()
    letter = SWAPPED_LETTER[mechanism]
    config = copy.deepcopy(model.config)
    options = {lookup(key).letter: opts for key, opts in config.pop("mixer_options").items()}
    converted = {options.get(model.layer_letters[i], {}).get("heads") for i in exact}
    if len(converted) > 1:
        raise ValueError(f"model: expected its exact attention layers to share one head count, got {converted}")
    heads = converted.pop()
    if mechanism == "window":
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window: expected a positive int, got {window!r}")
        # every swapped layer is an L, built from L's one set of options: the exact layers must have been built
        # alike (the model's kv_heads stands in where their options name none, as HybridLM builds them)
        kv_heads_of_model = {} if model.config.get("kv_heads") is None else {"kv_heads": model.config["kv_heads"]}
        letters = sorted({model.layer_letters[i] for i in exact})
        built = {c: {**kv_heads_of_model, **options.get(c, {})} for c in letters}
        if any(_effective("L", built[c]) != _effective("L", built[letters[0]]) for c in letters[1:]):
            raise ValueError(f"model: expected its exact attention layers to share their options for "
                             f"mechanism='window', got {built}")
        new_options = {**options.get(model.layer_letters[exact[0]], {}), "window": window}
    else:
        new_options = {"feature_map": feature_map, **({"heads": heads} if heads is not None else {})}
    held = options.get(letter, {})
    if letter in model.layer_letters and _effective(letter, held) != _effective(letter, new_options):
        raise ValueError(f"mechanism: the model's own {letter} layers have options {held}, which the swapped "
                         f"layers would change to {new_options}")
    options[letter] = new_options
    letters = "".join(letter if i in exact else c for i, c in enumerate(model.layer_letters))
    config.pop("layers")
    swapped = HybridLM(config.pop("vocab_size"), config.pop("d_model"), letters, mixer_options=options, **config)
    state = model.state_dict()
    if mechanism == "linear":
        for i in exact:
            prefix = f"blocks.{i}.mixer."
            state[prefix + "qkv_proj.weight"] = _fused_qkv(model.blocks[i].mixer)
            del state[prefix + "q_proj.weight"], state[prefix + "kv_proj.weight"]
    missing, unexpected = swapped.load_state_dict(state, strict=False)
    # a learnable feature map's parameters are the only ones the swapped model may lack
    if unexpected or any(".phi." not in key for key in missing):
        raise ValueError(f"model: its attention layers hold weights the {mechanism} layers cannot take "
                         f"(unexpected {sorted(unexpected)}, missing {sorted(missing)})")
    return swapped.to(next(model.parameters()).device).eval()


def _effective(letter: str, options: dict) -> dict:
    """``options`` of a mixer ``letter`` as they build it: the registry's defaults filled in, the class's own
    defaults left out (``{}`` and ``{"feature_map": "elu1"}`` build the same linear attention)."""
    spec = {"L": Attention, "F": LinearAttention}[letter]
    full = {"window": DEFAULT_WINDOW, **options} if letter == "L" else dict(options)
    defaults = inspect.signature(spec).parameters
    return {k: v for k, v in full.items() if k not in defaults or defaults[k].default != v}


def _fused_qkv(mixer: Attention) -> torch.Tensor:
    """``LinearAttention.qkv_proj``'s weight ``[Q; K; V]`` from ``mixer``'s ``q_proj`` and ``kv_proj``."""
    if mixer.q_proj.bias is not None or mixer.sinks is not None:
        raise ValueError("model: expected attention layers without biases or sinks for mechanism='linear' "
                         "(linear attention has neither)")
    if mixer.heads * mixer.head_dim != mixer.d_model:
        raise ValueError(f"model: expected head_dim = d_model / heads for mechanism='linear', got heads "
                         f"{mixer.heads} x head_dim {mixer.head_dim} != d_model {mixer.d_model}")
    group = mixer.heads // mixer.kv_heads
    k, v = mixer.kv_proj.weight.detach().view(2, mixer.kv_heads, mixer.head_dim, mixer.d_model)
    # query head h reads key/value head h // group (the grouping of subquad.attention and of mha_to_gqa)
    k, v = (w.repeat_interleave(group, dim=0).reshape(mixer.d_model, mixer.d_model) for w in (k, v))
    return torch.cat([mixer.q_proj.weight.detach(), k, v])


@dataclass
class Fidelity:
    """Two models on the same tokens. ``logits_rel_l2``: ``||swapped - exact|| / ||exact||`` over every logit;
    ``kl``: the mean KL divergence ``KL(exact || swapped)`` of the next-token distributions, nats per token;
    ``*_bits``: next-token cross-entropy in bits per token (bits per byte for a byte-level model)."""

    logits_rel_l2: float
    kl: float
    exact_bits: float
    swapped_bits: float
    tokens: int

    @property
    def exact_perplexity(self) -> float:
        return 2.0 ** self.exact_bits

    @property
    def swapped_perplexity(self) -> float:
        return 2.0 ** self.swapped_bits


@torch.no_grad()
def fidelity(exact: torch.nn.Module, swapped: torch.nn.Module, batches: Iterable[torch.Tensor]) -> Fidelity:
    """Compare ``swapped`` with ``exact`` on ``batches`` of token windows ``(batch, seq + 1)``: both predict
    tokens ``1..seq`` from ``0..seq-1``. Both models are put in eval mode."""
    exact.eval()
    swapped.eval()
    err = ref = kl = ce_exact = ce_swapped = 0.0
    tokens = 0
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"batches: expected token windows (batch, seq + 1) with seq >= 1, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        inputs, labels = ids[:, :-1], ids[:, 1:].flatten()
        a, b = exact(inputs).float().flatten(0, 1), swapped(inputs).float().flatten(0, 1)
        err += float((b - a).square().sum())
        ref += float(a.square().sum())
        log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
        kl += float(F.kl_div(log_b, log_a, log_target=True, reduction="sum"))
        ce_exact += float(F.cross_entropy(a, labels, reduction="sum"))
        ce_swapped += float(F.cross_entropy(b, labels, reduction="sum"))
        tokens += labels.numel()
    if tokens == 0:
        raise ValueError("batches: expected at least one batch, got none")
    return Fidelity(math.sqrt(err / ref), kl / tokens, ce_exact / tokens / math.log(2),
                    ce_swapped / tokens / math.log(2), tokens)

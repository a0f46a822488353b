"""Short names for token mixers, so that a model's layer stack is a string: ``"MMMMAMMM"`` (Jamba-style,
1 attention : 7 Mamba-2), ``"LLLLLG"`` (Gemma-3-style, 5 local sliding-window : 1 global), ``"EEEE"`` (pure GLA).

Each entry builds a mixer from ``(d_model, heads, layer_idx, **options)``; ``options`` are the mixer's own
keyword arguments (e.g. ``{"window": 512}`` for ``L``, ``{"d_state": 16}`` for ``M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .attention import Attention
from .deltanet import DeltaNet, GatedDeltaNet
from .diff_attention import DiffAttention
from .gla import GLA
from .linear_attention import LinearAttention
from .lsh_attention import LSHAttention
from .mamba2 import Mamba2
from .nsa import NSA
from .retnet import RetNet

DEFAULT_WINDOW = 128


@dataclass(frozen=True)
class MixerSpec:
    letter: str
    name: str
    build: Callable[..., nn.Module]  # build(d_model, heads, layer_idx, **options) -> module
    description: str


REGISTRY: dict[str, MixerSpec] = {}


def register(letter: str, name: str, build: Callable[..., nn.Module], description: str) -> MixerSpec:
    """Add a mixer under a one-character ``letter`` and a ``name`` (both must be new)."""
    if len(letter) != 1:
        raise ValueError(f"letter: expected one character, got {letter!r}")
    if letter in REGISTRY or any(s.name == name for s in REGISTRY.values()):
        raise ValueError(f"letter, name: {letter!r} / {name!r} already registered")
    spec = MixerSpec(letter, name, build, description)
    REGISTRY[letter] = spec
    return spec


def _attention(d_model, heads, layer_idx, **opts):
    return Attention(d_model, heads, **opts)


def _local(d_model, heads, layer_idx, **opts):
    opts.setdefault("window", DEFAULT_WINDOW)
    return Attention(d_model, heads, **opts)


def _mla(d_model, heads, layer_idx, **opts):
    from .mla import MLA  # the caches engineer's layer; imported when used
    head_dim = d_model // heads
    # rope_dim: half the head, rounded down to the even width RoPE rotates in pairs
    defaults = dict(kv_lora_rank=max(d_model // 2, 16), qk_nope_dim=head_dim, rope_dim=max(head_dim // 4 * 2, 2),
                    v_dim=head_dim)
    return MLA(d_model, heads, **{**defaults, **opts})


def _mamba2(d_model, heads, layer_idx, /, **opts):
    """Mamba-2's own head size (64) where it divides d_inner; otherwise the model's head count."""
    d_inner = opts.get("expand", 2) * d_model
    if "heads" not in opts and "headdim" not in opts and d_inner % 64:
        opts["heads"] = heads
    return Mamba2(d_model, **opts)


register("A", "attention", _attention, "softmax attention, causal, RoPE (MHA/GQA/MQA via kv_heads)")
register("G", "global", _attention, "global softmax attention (Gemma-3's global layer; same as A)")
register("L", "local", _local, f"sliding-window softmax attention (window, default {DEFAULT_WINDOW}; rolling cache)")
register("D", "diff", lambda d, h, i, **o: DiffAttention(d, h, layer_idx=i, **o), "differential attention")
register("K", "mla", _mla, "multi-head latent attention (DeepSeek-V2: latent KV cache, decoupled RoPE)")
register("F", "linear", lambda d, h, i, **o: LinearAttention(d, h, **o), "linear attention (feature_map=...)")
register("R", "retnet", lambda d, h, i, **o: RetNet(d, h, **o), "RetNet multi-scale retention")
register("E", "gla", lambda d, h, i, **o: GLA(d, h, **o), "gated linear attention")
register("M", "mamba2", _mamba2, "Mamba-2 (SSD; headdim 64)")
register("N", "deltanet", lambda d, h, i, **o: DeltaNet(d, h, **o), "DeltaNet (delta rule)")
register("Y", "gated_deltanet", lambda d, h, i, **o: GatedDeltaNet(d, h, **o), "Gated DeltaNet")
register("S", "nsa", lambda d, h, i, **o: NSA(d, h, **o),
         "Native Sparse Attention (compressed + selected + sliding-window branches, gated)")
register("H", "lsh", lambda d, h, i, **o: LSHAttention(d, h, **o), "Reformer LSH attention (shared QK, hashed chunks)")


def lookup(key: str) -> MixerSpec:
    """A spec by letter or name."""
    if key in REGISTRY:
        return REGISTRY[key]
    for spec in REGISTRY.values():
        if spec.name == key:
            return spec
    raise ValueError(f"layers: unknown mixer {key!r}; expected one of "
                     + ", ".join(f"{s.letter} ({s.name})" for s in REGISTRY.values()))


def parse_layers(layers) -> list[MixerSpec]:
    """``"MMMAMMMA"`` (one letter per layer) or a list of letters / names -> specs."""
    if isinstance(layers, str):
        items = list(layers)
    elif isinstance(layers, (list, tuple)) and all(isinstance(x, str) for x in layers):
        items = list(layers)
    else:
        raise ValueError(f"layers: expected a string of mixer letters or a list of names, got {layers!r}")
    if not items:
        raise ValueError("layers: expected at least one layer, got none")
    return [lookup(x) for x in items]


def build_mixer(key: str, d_model: int, heads: int, layer_idx: int = 0, /, **options) -> nn.Module:
    """The mixer ``key`` (a letter or a name) for a model of width ``d_model`` with ``heads`` heads; ``options``
    are the mixer's own keyword arguments, its own head count (``heads``, MLA's ``n_heads``) overriding the
    model's (it collided with it)."""
    spec = lookup(key)
    for name in ("heads", "n_heads"):
        if name in options and not (spec.letter == "M" and name == "heads"):    # (Mamba-2 reads it itself)
            heads = options.pop(name)
    return spec.build(d_model, heads, layer_idx, **options)

"""Token mixers and building blocks.

Every mixer has one contract: ``forward(x, cache=None) -> y`` with ``x`` ``(batch, seq, d_model)``, and
``new_cache(batch, max_len, *, max_step=1)`` giving the cache it decodes with (static or rolling KV for softmax
attention, latent KV for MLA, a ``RecurrentState`` for the linear/recurrent family), for decoding steps of up to
``max_step`` tokens (a rolling cache's ring holds ``max_step - 1`` more slots; the others take any step).
``REGISTRY`` maps one-letter names to mixers for ``subquad.models.HybridLM``.
"""

from .attention import Attention
from .deltanet import DeltaNet, GatedDeltaNet
from .diff_attention import DiffAttention
from .gla import GLA
from .linear_attention import FEATURE_MAPS, LinearAttention
from .lsh_attention import LSHAttention
from .mamba2 import Mamba2
from .mlp import SwiGLU
from .norm import RMSNorm
from .nsa import NSA, NSACache
from .positions import RopeScaling, RotaryEmbedding, alibi_slopes, rotary_dim
from .registry import REGISTRY, MixerSpec, build_mixer, lookup, parse_layers, register
from .retnet import RetNet
from .short_conv import ShortConv
from .state import RecurrentState


def __getattr__(name):
    if name == "MLA":  # written alongside the latent cache; imported on first use
        from .mla import MLA
        return MLA
    raise AttributeError(name)


__all__ = ["Attention", "DiffAttention", "LinearAttention", "RetNet", "GLA", "Mamba2", "DeltaNet", "GatedDeltaNet",
           "LSHAttention", "MLA", "NSA", "NSACache", "FEATURE_MAPS", "RMSNorm", "SwiGLU", "ShortConv",
           "RecurrentState", "RotaryEmbedding", "RopeScaling", "alibi_slopes", "rotary_dim", "REGISTRY", "MixerSpec",
           "build_mixer", "lookup", "parse_layers", "register"]

"""Linear attention as a token mixer (Katharopoulos et al., 2020), with a choice of kernel feature map.

``o_t = phi(q_t) S_t / (phi(q_t) . z_t)`` with ``S_t = sum_j phi(k_j)^T v_j`` and ``z_t = sum_j phi(k_j)``: the
state ``(S, z)`` has a fixed size, so decoding costs O(1) per token. Feature maps: ``"elu1"``, ``"relu"``,
``"identity"`` (parameter-free), ``"favor"`` (Performer's positive orthogonal random features), ``"cosformer"``
(cos re-weighting by position; needs ``max_len``), ``"hedgehog"`` (learnable, softmax-mimicking; one map shared
by queries and keys, where Hedgehog's implementations learn a separate map for each).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import CosFormer, Favor, Hedgehog, linear_attention, linear_attention_step
from ..ops.linear.feature_maps import BUILTIN
from .attention import check_heads
from .state import RecurrentState, check_recurrent_cache

FEATURE_MAPS = tuple(BUILTIN) + ("favor", "cosformer", "hedgehog")


def make_feature_map(name: str, heads: int, head_dim: int, max_len: int, num_features: int | None,
                     normalize: bool = True):
    if name in BUILTIN:
        return BUILTIN[name]()
    if name == "favor":  # its per-query-row stabiliser cancels only under normalisation
        # features drawn from torch's generator, as weights are initialised: each layer its own (the fixed
        # default seed gave every layer of a model the same ones), the same under one torch.manual_seed
        seed = int(torch.randint(0, 2 ** 62, ()))
        return Favor(head_dim, num_features, seed, stabilize_queries=normalize)
    if name == "cosformer":
        return CosFormer(max_len)
    if name == "hedgehog":
        return Hedgehog(heads, head_dim, num_features)
    raise ValueError(f"feature_map: expected one of {FEATURE_MAPS}, got {name!r}")


class LinearAttention(nn.Module):
    """Args:
        d_model, heads: width and heads (``head_dim = d_model / heads``).
        feature_map: one of ``FEATURE_MAPS``.
        num_features: FAVOR+'s random features / Hedgehog's feature width (default ``head_dim``).
        max_len: cosFormer's horizon M (positions must stay below it).
        normalize: divide by ``phi(q) . z`` (the softmax-like form); False gives the unnormalised sum.
    """

    def __init__(self, d_model: int, heads: int, *, feature_map: str = "elu1", num_features: int | None = None,
                 max_len: int = 8192, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        _, self.head_dim = check_heads(d_model, heads, None, None)
        self.d_model, self.heads, self.normalize, self.backend = d_model, heads, normalize, backend
        self.feature_map_name = feature_map
        self.phi = make_feature_map(feature_map, heads, self.head_dim, max_len, num_features, normalize)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def new_cache(self, batch: int, max_len: int, **_) -> RecurrentState:
        return RecurrentState(batch, type(self).__name__)

    def forward(self, x: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        cache = check_recurrent_cache(cache, self, bsz)
        q, k, v = self.qkv_proj(x).view(bsz, seq_len, 3, self.heads, self.head_dim).unbind(2)
        if cache is None:
            o = linear_attention(q, k, v, self.phi, normalize=self.normalize, backend=self.backend)
        elif seq_len == 1:
            o, cache.state = linear_attention_step(q, k, v, cache.state, self.phi, normalize=self.normalize,
                                                   offset=cache.position, backend=self.backend)
        else:
            o, cache.state = linear_attention(q, k, v, self.phi, normalize=self.normalize, offset=cache.position,
                                              initial_state=cache.state, output_state=True, backend=self.backend)
        if cache is not None:
            cache.position += seq_len
        return self.o_proj(o.reshape(bsz, seq_len, self.d_model))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, feature_map={self.feature_map_name}"

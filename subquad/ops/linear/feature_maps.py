"""Kernel feature maps phi for linear attention: sim(q, k) = phi(q) . phi(k) replaces exp(q . k).

Every map is a ``FeatureMap`` module called as ``phi(x, is_query=..., offset=...)`` on ``(B, T, H, D)``:
``is_query`` lets FAVOR+ stabilise query rows (a per-row factor that cancels under normalisation only), ``offset`` is
the absolute position of the first token (cosFormer re-weights by position; decoding passes the step index).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """phi: (B, T, H, D) -> (B, T, H, D'); ``out_dim(D)`` says D'. ``positional``: phi depends on the tokens'
    positions (``offset`` is the first one's), so packed sequences take theirs from their own starts."""

    positional = False

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x: torch.Tensor, *, is_query: bool = False, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError


class Elu1(FeatureMap):
    """elu(x) + 1 (Katharopoulos et al., 2020): positive, smooth."""

    def forward(self, x, *, is_query=False, offset=0):
        return F.elu(x) + 1.0


class ReLU(FeatureMap):
    def forward(self, x, *, is_query=False, offset=0):
        return F.relu(x)


class Identity(FeatureMap):
    """No map: plain (unnormalised) linear attention on q, k as given."""

    def forward(self, x, *, is_query=False, offset=0):
        return x


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_features, dim) rows drawn as blocks of orthogonal directions with chi(dim)-distributed norms, so each
    row is marginally N(0, I) (Performer's orthogonal random features: lower variance than i.i.d. rows)."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        # QR leaves each column's sign to the algorithm (Householder's makes the first column's first entry always
        # negative), so the directions are not uniform and the kernel estimate is biased; diag(R) > 0 makes Q
        # Haar-distributed (Mezzadri, 2007)
        blocks.append((qmat * torch.diagonal(r).sign()).T)
    directions = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (directions * norms).float()


class Favor(FeatureMap):
    """Performer FAVOR+ positive random features (Choromanski et al., 2021).

    ``phi(x) = exp(w_i . x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * D^-1/4`` and orthogonal ``w_i``, so that
    ``E[phi(q) . phi(k)] = exp(q . k / sqrt(D))`` (the softmax kernel). ``redraw(seed)`` draws new features
    (Performer redraws during training).

    ``stabilize_queries``: queries subtract their row maximum before ``exp``, a per-row factor that cancels in
    normalised attention only; pass False for the unnormalised form (``normalize=False``), which it would scale
    row by row (the exponent is then bounded by ``|w_i|^2 / 2``, about ``D / 2``, only).
    """

    def __init__(self, head_dim: int, num_features: int | None = None, seed: int = 0, *,
                 stabilize_queries: bool = True):
        super().__init__()
        self.head_dim, self.stabilize_queries = head_dim, stabilize_queries
        self.num_features = num_features or head_dim
        self.register_buffer("projection", torch.empty(self.num_features, head_dim), persistent=True)
        self.redraw(seed)

    def redraw(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = orthogonal_gaussian(self.num_features, self.head_dim, gen)
        self.projection.copy_(w.to(self.projection.device))

    def out_dim(self, head_dim):
        return self.num_features

    def forward(self, x, *, is_query=False, offset=0):
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x: expected head_dim {self.head_dim}, got shape {tuple(x.shape)}")
        acc = torch.promote_types(x.dtype, torch.float32)                # fp64 inputs (a gradcheck) stay fp64
        xf = x.to(acc) * self.head_dim ** -0.25
        logits = xf @ self.projection.to(acc).T - 0.5 * xf.square().sum(-1, keepdim=True)
        if is_query and self.stabilize_queries:
            logits = logits - logits.amax(dim=-1, keepdim=True).detach()
        return (logits.exp() * self.num_features ** -0.5).to(x.dtype)


class CosFormer(FeatureMap):
    """cosFormer (Qin et al., 2022): ``relu(q_i) relu(k_j)^T cos(pi/2 * (i - j) / M)``, decomposed by
    ``cos(a - b) = cos a cos b + sin a sin b`` into ``phi(x_i) = [relu(x_i) cos(theta_i), relu(x_i) sin(theta_i)]``
    with ``theta_i = pi/2 * i / M`` (D' = 2D), so it stays linear. ``max_len`` is M: positions must stay below it.
    """

    positional = True

    def __init__(self, max_len: int):
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"max_len: expected a positive int, got {max_len}")
        self.max_len = max_len

    def out_dim(self, head_dim):
        return 2 * head_dim

    def forward(self, x, *, is_query=False, offset=0):
        seq = x.shape[1]
        if offset + seq > self.max_len:
            raise ValueError(f"x: positions {offset}..{offset + seq - 1} exceed max_len={self.max_len}")
        pos = torch.arange(offset, offset + seq, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        theta = (math.pi / 2 * pos / self.max_len).view(1, seq, 1, 1)
        r = F.relu(x)
        return torch.cat([r * theta.cos().to(x.dtype), r * theta.sin().to(x.dtype)], dim=-1)


class Hedgehog(FeatureMap):
    """Learnable Hedgehog map (Zhang et al., 2024): ``[softmax(x W_h), softmax(-x W_h)]`` per head, a softmax-like
    positive map trained to mimic softmax attention weights (distillation). W starts at the identity."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.feature_dim = feature_dim or head_dim
        weight = torch.zeros(heads, head_dim, self.feature_dim)
        weight[:, torch.arange(min(head_dim, self.feature_dim)), torch.arange(min(head_dim, self.feature_dim))] = 1
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, self.feature_dim))

    def out_dim(self, head_dim):
        return 2 * self.feature_dim

    def forward(self, x, *, is_query=False, offset=0):
        if x.shape[-2:] != (self.heads, self.head_dim):
            raise ValueError(f"x: expected (..., {self.heads}, {self.head_dim}), got {tuple(x.shape)}")
        z = torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([z.softmax(dim=-1), (-z).softmax(dim=-1)], dim=-1)


BUILTIN = {"elu1": Elu1, "relu": ReLU, "identity": Identity}


def resolve_feature_map(feature_map) -> FeatureMap | object:
    """A name of a parameter-free map ('elu1', 'relu', 'identity'), a FeatureMap, or any callable x -> phi(x)."""
    if isinstance(feature_map, str):
        if feature_map not in BUILTIN:
            raise ValueError(f"feature_map: expected one of {sorted(BUILTIN)} (or a FeatureMap such as Favor, "
                             f"CosFormer, Hedgehog, or a callable), got {feature_map!r}")
        return BUILTIN[feature_map]()
    if feature_map is None:
        return Identity()
    if not callable(feature_map):
        raise ValueError(f"feature_map: expected a name or a callable, got {type(feature_map).__name__}")
    return feature_map


def apply_feature_map(phi, x: torch.Tensor, *, is_query: bool, offset: int = 0,
                      lengths: list[int] | None = None) -> torch.Tensor:
    """``phi(x)``; ``lengths``: x's packed sequences, each at positions from ``offset`` for a positional map (from
    the pack's start, cosFormer's ``max_len`` was checked against the whole pack's length)."""
    if not isinstance(phi, FeatureMap):
        return phi(x)
    if lengths is None or len(lengths) < 2 or not phi.positional:
        return phi(x, is_query=is_query, offset=offset)
    return torch.cat([phi(part, is_query=is_query, offset=offset) for part in x.split(lengths, dim=1)], dim=1)

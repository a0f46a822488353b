"""Positions: rotary embeddings (RoPE) with partial rotary, context-extension scaling, and ALiBi slopes.

RoPE (Su et al., 2021) rotates pairs of channels of q and k by ``pos * inv_freq[i]`` so that the score
``q_m . k_n`` depends on ``m - n`` only. Pairs are ``(i, i + D/2)`` (GPT-NeoX / Llama, the default) or
``(2i, 2i + 1)`` (GPT-J, ``interleaved=True``).

* Partial rotary (GPT-NeoX, Phi): only the first ``dim`` channels of a head are rotated, the rest pass through.
* Decoupled RoPE (MLA, DeepSeek-V2): the position lives in a separate slice (``rope_dim`` channels of q, one key
  shared by all heads); build a ``RotaryEmbedding(rope_dim)`` and call it on that slice alone.
* Context extension (``RopeScaling``): ``linear`` position interpolation (Chen et al., 2023) divides positions
  by ``factor``; ``ntk`` (NTK-aware) raises the base to ``base * factor^(D/(D-2))`` so high frequencies keep
  their resolution; ``yarn`` (Peng et al., 2023) interpolates only the low frequencies (a ramp between
  ``beta_slow`` and ``beta_fast`` rotations over the original context) and scales the logits by
  ``0.1 ln(factor) + 1`` (applied to cos/sin, so to both q and k: the product carries its square, as in YaRN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCALINGS = ("linear", "ntk", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE past the context it was trained on.

    Args:
        kind: ``"linear"``, ``"ntk"`` or ``"yarn"``.
        factor: the new context over the original one (> 1 extends).
        original_max_position: the context the model was trained on (YaRN's frequency ramp uses it).
        beta_fast, beta_slow: YaRN's ramp bounds, in rotations over the original context.
    """

    kind: str
    factor: float
    original_max_position: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ValueError(f"kind: expected one of {SCALINGS}, got {self.kind!r}")
        if not (isinstance(self.factor, (int, float)) and self.factor >= 1.0):
            raise ValueError(f"factor: expected a number >= 1, got {self.factor!r}")


def _yarn_inv_freq(dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    """Frequencies that rotate more than ``beta_fast`` times over the original context are kept (extrapolated),
    those below ``beta_slow`` rotations are interpolated by ``factor``, a linear ramp in between."""
    def correction_dim(rotations: float) -> float:  # the channel pair whose wavelength fits `rotations` times
        return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    # dim - 1, not the last pair (dim / 2 - 1), as in YaRN's reference code and transformers: models trained with
    # them expect the ramp this gives where the clamp binds (a small base or rotary dim)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """RoPE over the first ``dim`` channels of each head.

    ``rope(x, positions)``: ``x`` ``(B, T, H, D)`` with ``D >= dim``; ``positions`` ``(T,)`` or ``(B, T)`` integer
    (absolute positions: with a cache, the sequence's length before the new tokens plus ``0..T-1``).
    Computed in fp32 (fp64 for fp64 input), returned in x's dtype.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: RopeScaling | None = None,
                 interleaved: bool = False):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim: expected a positive even int (rotated channels), got {dim!r}")
        if not base > 1:
            raise ValueError(f"base: expected a number > 1, got {base!r}")
        self.dim, self.base, self.scaling, self.interleaved = dim, float(base), scaling, interleaved
        eff_base = self.base
        if scaling is not None and scaling.kind == "ntk":
            eff_base = self.base * scaling.factor ** (dim / (dim - 2)) if dim > 2 else self.base
        if scaling is not None and scaling.kind == "yarn":
            inv_freq = _yarn_inv_freq(dim, self.base, scaling)
            self.attention_factor = 0.1 * math.log(scaling.factor) + 1.0
        else:
            inv_freq = eff_base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            self.attention_factor = 1.0
        self.position_scale = 1.0 / scaling.factor if scaling is not None and scaling.kind == "linear" else 1.0
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._inv_freq_fp32 = self.inv_freq.clone()

    def _apply(self, fn, recurse=True):
        # the frequencies stay fp32 through model.to(bfloat16): rounded to bf16 they move the angle at position
        # 4000 by ~1.7 rad (the device moves, the values do not)
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq_fp32.to(self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``positions.shape + (dim / 2,)`` in ``dtype`` (fp32, or fp64 for fp64 x)."""
        angles = (positions.to(dtype) * self.position_scale)[..., None] * self.inv_freq.to(positions.device, dtype)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] < self.dim:
            raise ValueError(f"x: expected shape (batch, seq, heads, head_dim >= {self.dim}), got {tuple(x.shape)}")
        if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[1] \
                or (positions.dim() == 2 and positions.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"positions: expected shape ({x.shape[1]},) or ({x.shape[0]}, {x.shape[1]}), got "
                             f"{tuple(positions.shape)}")
        acc = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.cos_sin(positions, acc)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        return apply_rotary(x, cos, sin, self.interleaved)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}, scaling={self.scaling}, interleaved={self.interleaved}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x`` ``(B, T, H, D)`` by ``cos``, ``sin`` ``(B | 1, T,
    rotated / 2)``: channel pairs ``(i, i + rotated / 2)`` (GPT-NeoX) or ``(2i, 2i + 1)`` (``interleaved``, GPT-J).
    Computed in ``cos``'s dtype, returned in x's; the other channels pass through."""
    half = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    rot, rest = x[..., :2 * half].to(cos.dtype), x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1) if rest.shape[-1] else out.to(x.dtype)


def rotary_dim(head_dim: int, partial_rotary: float = 1.0) -> int:
    """Channels rotated for a ``partial_rotary`` fraction of ``head_dim`` (rounded down to even, at least 2)."""
    if not 0 < partial_rotary <= 1:
        raise ValueError(f"partial_rotary: expected a fraction in (0, 1], got {partial_rotary!r}")
    return max(2, int(head_dim * partial_rotary) // 2 * 2)


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., 2022): the geometric sequence ``2^(-8 i / n)``, i = 1..n, for n a
    power of two; otherwise the slopes of the nearest lower power of two followed by every other slope of the
    next power (the reference implementation's rule). fp32 ``(heads,)``."""
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads: expected a positive int, got {heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(heads)))
    slopes = power_of_two(closest)
    if closest < heads:
        slopes += power_of_two(2 * closest)[0::2][:heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


__all__ = ["RotaryEmbedding", "RopeScaling", "SCALINGS", "apply_rotary", "rotary_dim", "alibi_slopes"]

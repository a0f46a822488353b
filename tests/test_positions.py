"""RoPE (full, partial, interleaved, context-extension scaling) and ALiBi slopes against their definitions."""

import math

import pytest
import torch

from subquad.nn import RopeScaling, RotaryEmbedding, alibi_slopes, rotary_dim


def naive_rope(x, positions, base=10000.0, dim=None):
    """Pairs (i, i + dim/2) rotated by pos * base^(-2i/dim), one angle at a time, fp64."""
    x = x.double().clone()
    d = dim or x.shape[-1]
    out = x.clone()
    for t, p in enumerate(positions.tolist()):
        for i in range(d // 2):
            ang = p * base ** (-2 * i / d)
            a, b = x[:, t, :, i], x[:, t, :, i + d // 2]
            out[:, t, :, i] = a * math.cos(ang) - b * math.sin(ang)
            out[:, t, :, i + d // 2] = a * math.sin(ang) + b * math.cos(ang)
    return out


def test_rope_matches_naive_rotation_and_partial_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 7, 100])
    torch.testing.assert_close(RotaryEmbedding(8)(x, pos), naive_rope(x, pos), atol=1e-6, rtol=1e-6)
    partial = RotaryEmbedding(rotary_dim(8, 0.5))(x, pos)
    torch.testing.assert_close(partial[..., 4:], x[..., 4:])
    torch.testing.assert_close(partial[..., :4], naive_rope(x[..., :4], pos), atol=1e-6, rtol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_interleaved_is_the_half_split_form_under_a_channel_permutation():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 2, 8)
    pos = torch.arange(4)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split channel i, i+4 -> interleaved 2i, 2i+1
    half = RotaryEmbedding(8)(x, pos)
    inter = RotaryEmbedding(8, interleaved=True)(x[..., perm], pos)
    torch.testing.assert_close(inter, half[..., perm])


def test_per_sequence_positions_batch_rows_independently():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 1, 8)
    rope = RotaryEmbedding(8)
    pos = torch.tensor([[0, 1, 2], [10, 11, 12]])
    out = rope(x, pos)
    torch.testing.assert_close(out[1:], rope(x[1:], torch.tensor([10, 11, 12])))


def test_linear_and_ntk_scaling():
    x = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    pos = torch.tensor([0, 4, 8])
    lin = RotaryEmbedding(8, scaling=RopeScaling("linear", 4.0))
    torch.testing.assert_close(lin(x, pos), RotaryEmbedding(8)(x, pos // 4), atol=1e-6, rtol=1e-6)
    ntk = RotaryEmbedding(8, scaling=RopeScaling("ntk", 4.0))
    torch.testing.assert_close(ntk(x, pos), naive_rope(x, pos, base=10000.0 * 4 ** (8 / 6)), atol=1e-6, rtol=1e-6)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    dim, factor = 64, 8.0
    plain = RotaryEmbedding(dim)
    yarn = RotaryEmbedding(dim, scaling=RopeScaling("yarn", factor, original_max_position=2048))
    assert torch.allclose(yarn.inv_freq[:4], plain.inv_freq[:4])            # fast rotations: unchanged
    assert torch.allclose(yarn.inv_freq[-4:], plain.inv_freq[-4:] / factor)  # slow rotations: interpolated
    assert yarn.attention_factor == pytest.approx(0.1 * math.log(factor) + 1)
    same = RotaryEmbedding(dim, scaling=RopeScaling("yarn", 1.0))
    assert torch.allclose(same.inv_freq, plain.inv_freq) and same.attention_factor == 1.0


def hf_yarn_inv_freq(dim, base, factor, original_max_position, beta_fast=32.0, beta_slow=1.0):
    """transformers' ``_compute_yarn_parameters`` (YaRN's reference code), written out in fp64."""
    def correction_dim(rotations):
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    high = high + 0.001 if high == low else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return extrapolated / factor * ramp + extrapolated * (1 - ramp)


@pytest.mark.parametrize("dim, base, factor, original", [(16, 100.0, 4.0, 1024), (64, 500.0, 8.0, 4096),
                                                         (64, 10000.0, 4.0, 2048)])
def test_yarn_frequencies_match_the_reference_formula(dim, base, factor, original):
    """A small base or rotary dim puts YaRN's upper ramp bound past the last pair, where the reference code
    clamps it to dim - 1: the ramp then leaves the last pairs partly extrapolated."""
    yarn = RotaryEmbedding(dim, base, RopeScaling("yarn", factor, original_max_position=original))
    want = hf_yarn_inv_freq(dim, base, factor, original)
    torch.testing.assert_close(yarn.inv_freq.double(), want, rtol=1e-6, atol=0)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = alibi_slopes(12)  # 8 slopes of base 2^-1, then the odd ones of the 16-head sequence (base 2^-0.5)
    torch.testing.assert_close(s12[:8], alibi_slopes(8))
    torch.testing.assert_close(s12[8:], torch.tensor([2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)]))


@pytest.mark.parametrize("bad", [dict(dim=7), dict(dim=8, base=1.0)])
def test_bad_rope_arguments(bad):
    with pytest.raises(ValueError):
        RotaryEmbedding(**bad)


def test_bad_scaling_and_shapes():
    with pytest.raises(ValueError, match="kind"):
        RopeScaling("bogus", 2.0)
    with pytest.raises(ValueError, match="factor"):
        RopeScaling("yarn", 0.5)
    with pytest.raises(ValueError, match="positions"):
        RotaryEmbedding(8)(torch.randn(1, 3, 1, 8), torch.arange(4))
    with pytest.raises(ValueError, match="heads"):
        alibi_slopes(0)


def test_rope_frequencies_stay_fp32_in_a_bf16_model():
    """``model.to(torch.bfloat16)`` cast the frequency buffer: at position 4000 the angles moved by up to
    ~1.7 rad. They stay fp32 (and follow the module's device)."""
    from torch import nn

    rope = RotaryEmbedding(64)
    model = nn.Sequential(nn.Linear(4, 4), rope).to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and rope.inv_freq.dtype == torch.float32
    want = RotaryEmbedding(64).cos_sin(torch.tensor([4000]))
    for got, ref in zip(rope.cos_sin(torch.tensor([4000])), want):
        torch.testing.assert_close(got, ref)
    model.float().half()
    assert rope.inv_freq.dtype == torch.float32


def test_attention_alibi_slopes_stay_fp32_in_a_bf16_model():
    from subquad.nn import Attention

    layer = Attention(48, 12, position="alibi").to(torch.bfloat16)
    assert layer.o_proj.weight.dtype == torch.bfloat16 and layer.alibi.dtype == torch.float32
    torch.testing.assert_close(layer.alibi, alibi_slopes(12))

"""Every token mixer: gradients (gradcheck in fp64 on tiny shapes), cached decoding == the whole sequence at
once, the cache each one asks for, bad input; oracle checks of the attention layers' and Mamba-2's math."""

import math

import pytest
import torch
import torch.nn.functional as F

from subquad import masks
from subquad.cache import RollingKVCache, StaticKVCache
from subquad.nn import (GLA, NSA, Attention, DeltaNet, DiffAttention, GatedDeltaNet, LinearAttention, LSHAttention,
                        Mamba2, MLA, RecurrentState, RetNet)

from oracles import softmax_attention

D = 16  # d_model of the tiny layers


def _mla():
    from subquad.nn.mla import MLA
    return MLA(D, 2, kv_lora_rank=8, qk_nope_dim=8, rope_dim=4, v_dim=8)


# name -> (factory, computes in fp32 inside even for fp64 input)
MIXERS = {
    "attention-mha": (lambda: Attention(D, 4), True),
    "attention-gqa": (lambda: Attention(D, 4, kv_heads=2, partial_rotary=0.5), True),
    "attention-mqa-alibi-softcap": (lambda: Attention(D, 4, kv_heads=1, position="alibi", softcap=5.0), True),
    "attention-window": (lambda: Attention(D, 2, window=3), True),
    "attention-strided": (lambda: Attention(D, 2, mask=masks.strided(3)), True),
    "attention-gqa-sinks": (lambda: Attention(D, 4, kv_heads=2, sinks=True), True),
    "attention-strided-sinks": (lambda: Attention(D, 2, mask=masks.strided(3), sinks=True), True),
    "diff-attention": (lambda: DiffAttention(D, 2, layer_idx=2), True),
    "diff-attention-window": (lambda: DiffAttention(D, 2, window=4), True),
    "mla": (_mla, True),
    "linear-elu1": (lambda: LinearAttention(D, 2), False),
    "linear-favor": (lambda: LinearAttention(D, 2, feature_map="favor", num_features=16), True),
    "linear-cosformer": (lambda: LinearAttention(D, 2, feature_map="cosformer", max_len=64), False),
    "linear-hedgehog": (lambda: LinearAttention(D, 2, feature_map="hedgehog"), False),
    "retnet": (lambda: RetNet(D, 2), False),
    "gla": (lambda: GLA(D, 2), False),
    "mamba2": (lambda: Mamba2(D, d_state=8, headdim=8), False),
    "deltanet": (lambda: DeltaNet(D, 2), False),
    "gated-deltanet": (lambda: GatedDeltaNet(D, 2), False),
    # blocks of 2 over 11 tokens: the fourth block of top_k=4 is chosen by importance, beside the three forced
    "nsa": (lambda: NSA(D, 4, kv_heads=2, block=2, compress_block=2, compress_stride=1, top_k=4, window=3), False),
    # (sequences within one chunk, the default's 64 tokens: exact attention, so cached decoding is the whole
    # sequence's; tests/test_lsh.py checks shorter chunks, where a step is the forward over its prefix)
    "lsh": (lambda: LSHAttention(D, 2, n_buckets=4, n_hashes=2), True),
}


def make(name):
    factory, fp32_inside = MIXERS[name]
    torch.manual_seed(0)
    try:
        layer = factory()
    except ImportError:
        pytest.skip("subquad.nn.mla not available")
    for p in layer.parameters():  # away from zero-initialised gates so every path carries signal
        if p.dim() == 1 and float(p.detach().abs().sum()) == 0:
            torch.nn.init.normal_(p, 0, 0.1)
    return layer.double(), fp32_inside


@pytest.mark.parametrize("name", list(MIXERS))
def test_cached_decoding_equals_the_whole_sequence(name):
    layer, fp32 = make(name)
    torch.manual_seed(1)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2, 16)
    # prefill, single steps, a two-token step, single steps again
    pieces = [x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:9], x[:, 9:10], x[:, 10:11]]
    out = torch.cat([layer(p, cache) for p in pieces], dim=1)
    tol = 1e-5 if fp32 else 1e-10
    torch.testing.assert_close(out, full, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradients(name):
    layer, fp32 = make(name)
    torch.manual_seed(2)
    x = torch.randn(1, 5, D, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname}: zero gradient"
    x = torch.randn(1, 4, D, dtype=torch.float64, requires_grad=True)
    if fp32:  # fp32 accumulation inside: a coarser finite difference, looser tolerance
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-3, atol=2e-3, rtol=2e-2, fast_mode=True)
    else:
        assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_windowed_layers_take_a_rolling_cache_of_window_slots_and_stay_o_window():
    layer = Attention(D, 2, window=4)
    cache = layer.new_cache(1, 10_000)
    assert isinstance(cache, RollingKVCache) and cache.k.shape[1] == 4
    assert isinstance(Attention(D, 2).new_cache(1, 32), StaticKVCache)
    for _ in range(12):
        layer(torch.randn(1, 1, D), cache)
    assert cache.k.shape[1] == 4


def test_recurrent_state_has_a_fixed_size():
    layer = Mamba2(D, d_state=8, headdim=8)
    cache = layer.new_cache(1, 0)
    layer(torch.randn(1, 3, D), cache)
    size = cache.nbytes
    for _ in range(5):
        layer(torch.randn(1, 1, D), cache)
    assert cache.nbytes == size and cache.position == 8


@pytest.mark.parametrize("layer, cache, match", [
    (lambda: Attention(D, 2), lambda: RecurrentState(1, "Mamba2"), "StaticKVCache"),
    (lambda: Attention(D, 2), lambda: RollingKVCache(1, 4, 2, 8, dtype=torch.float32), "StaticKVCache"),
    (lambda: Attention(D, 2, window=8), lambda: RollingKVCache(1, 4, 2, 8, dtype=torch.float32), "window >= 8"),
    (lambda: Attention(D, 2), lambda: StaticKVCache(1, 8, 1, 8, dtype=torch.float32), "heads_kv"),
    (lambda: Mamba2(D, d_state=8, headdim=8), lambda: StaticKVCache(1, 8, 2, 8), "RecurrentState of a Mamba2"),
    (lambda: RetNet(D, 2), lambda: RecurrentState(1, "GLA"), "RetNet"),
    (lambda: GLA(D, 2), lambda: RecurrentState(3, "GLA"), "batch 1"),
    (lambda: NSA(D, 2, block=2, compress_block=2, compress_stride=2), lambda: StaticKVCache(1, 8, 2, 8), "NSACache"),
    (lambda: LSHAttention(D, 2), lambda: RollingKVCache(1, 4, 2, 8, dtype=torch.float32), "StaticKVCache"),
])
def test_a_cache_of_the_wrong_kind_is_refused(layer, cache, match):
    with pytest.raises(ValueError, match=match):
        layer()(torch.randn(1, 2, D), cache())


@pytest.mark.parametrize("make_layer, match", [
    (lambda: Attention(10, 3), "d_model"),
    (lambda: Attention(16, 4, kv_heads=3), "kv_heads"),
    (lambda: Attention(16, 4, position="xpos"), "position"),
    (lambda: Attention(16, 4, window=0), "window"),
    (lambda: DiffAttention(12, 4), "d_model"),
    (lambda: RetNet(10, 4), "d_model"),
    (lambda: Mamba2(16, heads=5), "heads"),
    (lambda: LinearAttention(16, 2, feature_map="softmax"), "feature_map"),
    (lambda: Attention(16, 4, softcap=0.0), "softcap"),
    (lambda: DiffAttention(16, 2, window=0), "window"),
    (lambda: GLA(16, 2, gate_normalizer=0.0), "gate_normalizer"),
    (lambda: Mamba2(16, headdim=0), "headdim"),
    (lambda: Mamba2(16, headdim=8, ngroups=0), "ngroups"),
    (lambda: Attention(16, 4, dropout=1.0), "dropout_p"),
    (lambda: DiffAttention(16, 2, dropout=-0.1), "dropout_p"),
    (lambda: MLA(16, 2, 8, qk_nope_dim=4, rope_dim=4, v_dim=4, dropout=2.0), "dropout_p"),
    (lambda: NSA(16, 2, compress_stride=5), "compress_stride"),
    (lambda: NSA(16, 2, position="alibi"), "position"),
    (lambda: LSHAttention(16, 2, n_buckets=3), "n_buckets"),
    (lambda: LSHAttention(16, 2, position="alibi"), "position"),
    (lambda: LSHAttention(16, 2, seed="x"), "seed"),
])
def test_bad_arguments(make_layer, match):
    """Refused by the constructor, not at the first forward (softcap, window) nor as NaN outputs
    (gate_normalizer=0) or a ZeroDivisionError (headdim, ngroups = 0)."""
    with pytest.raises(ValueError, match=match):
        make_layer()


def test_attention_layer_matches_the_dense_oracle():
    """GQA + ALiBi + softcap + a sliding window, against dense fp64 attention on the layer's projections."""
    torch.manual_seed(3)
    layer = Attention(D, 4, kv_heads=2, position="alibi", softcap=4.0, window=3).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    q = layer.q_proj(x).view(2, 7, 4, 4)
    k, v = layer.kv_proj(x).view(2, 7, 2, 2, 4).unbind(2)
    o, _ = softmax_attention(q, k, v, causal=True, mask=masks.sliding_window(3), softcap=4.0,
                             alibi_slopes=layer.alibi)
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(2, 7, D)), atol=1e-5, rtol=1e-5)


def test_diff_attention_is_the_difference_of_two_softmax_maps():
    torch.manual_seed(4)
    layer = DiffAttention(D, 2, layer_idx=1).double()
    x = torch.randn(1, 6, D, dtype=torch.float64)
    h, d, t = 2, 4, 6
    pos = torch.arange(t)
    q = layer.rope(layer.q_proj(x).view(1, t, 2 * h, d), pos).view(1, t, h, 2, d)
    k = layer.rope(layer.k_proj(x).view(1, t, 2 * h, d), pos).view(1, t, h, 2, d)
    v = layer.v_proj(x).view(1, t, h, 2 * d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def amap(i):
        s = torch.einsum("bqhd,bkhd->bhqk", q[..., i, :], k[..., i, :]) / math.sqrt(d)
        return s.masked_fill(~causal, float("-inf")).softmax(-1)

    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + 0.8 - 0.6 * math.exp(-0.3))
    o = torch.einsum("bhqk,bkhd->bqhd", amap(0) - lam * amap(1), v)
    o = F.rms_norm(o, (2 * d,), layer.head_norm.weight, eps=1e-5) * (1 - layer.lambda_init)
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(1, t, D)), atol=1e-5, rtol=1e-5)


def test_unnormalised_favor_layer_is_the_direct_favor_sum():
    """Without normalisation nothing cancels a per-query-row factor (FAVOR+'s stabiliser): the layer must give
    scale * sum_{s <= t} (phi(q_t) . phi(k_s)) v_s with phi(x) = exp(w x' - |x'|^2 / 2) / sqrt(m), x' = x D^-1/4."""
    torch.manual_seed(6)
    layer = LinearAttention(D, 2, feature_map="favor", num_features=16, normalize=False).double()
    x = torch.randn(1, 6, D, dtype=torch.float64)
    d = D // 2
    q, k, v = layer.qkv_proj(x).view(1, 6, 3, 2, d).unbind(2)
    w = layer.phi.projection.double()

    def phi(t):
        t = t * d ** -0.25
        return torch.exp(t @ w.T - 0.5 * t.square().sum(-1, keepdim=True)) / math.sqrt(w.shape[0])

    scores = torch.einsum("bthf,bshf->bhts", phi(q), phi(k)).tril()
    o = torch.einsum("bhts,bshd->bthd", scores, v) * d ** -0.5
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(1, 6, D)), atol=1e-6, rtol=1e-5)


def test_mamba2_layer_matches_a_token_loop():
    """h_t = exp(dt A) h + dt B^T x, y = C h + D x, gated RMSNorm: written out per token in fp64."""
    torch.manual_seed(5)
    layer = Mamba2(D, d_state=4, headdim=8, ngroups=2).double()
    u = torch.randn(1, 6, D, dtype=torch.float64)
    di, n, heads, p = layer.d_inner, 4, layer.heads, 8
    z, xbc, dt = layer.in_proj(u).split([di, di + 2 * 2 * n, heads], dim=-1)
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (3, 0)), layer.conv.weight.unsqueeze(1), layer.conv.bias,
                          groups=xbc.shape[-1])).transpose(1, 2)
    x, b, c = xbc.split([di, 2 * n, 2 * n], dim=-1)
    dt = F.softplus(dt + layer.dt_bias)
    a = -torch.exp(layer.A_log)
    hstate = torch.zeros(heads, n, p, dtype=torch.float64)
    ys = []
    for t in range(6):
        xt = x[0, t].view(heads, p)
        bt = b[0, t].view(2, n).repeat_interleave(heads // 2, 0)
        ct = c[0, t].view(2, n).repeat_interleave(heads // 2, 0)
        hstate = torch.exp(dt[0, t] * a)[:, None, None] * hstate + dt[0, t][:, None, None] * bt[:, :, None] * xt[:, None]
        ys.append(torch.einsum("hn,hnp->hp", ct, hstate) + layer.D[:, None] * xt)
    y = torch.stack(ys).view(1, 6, di)
    # mamba_ssm's RMSNormGated(group_size=d_inner // ngroups): one RMS per group of heads
    y = F.rms_norm((y * F.silu(z)).view(1, 6, 2, di // 2), (di // 2,), eps=1e-5).view(1, 6, di)
    y = y * layer.norm.weight
    torch.testing.assert_close(layer(u), layer.out_proj(y), atol=1e-10, rtol=1e-10)


def test_mamba2_gated_norm_is_per_group_of_heads():
    """With ngroups > 1 each group's channels are normalised by their own RMS (mamba_ssm's Mamba2 builds its
    RMSNormGated with group_size = d_inner // ngroups): scaling one group's output by 100 leaves the other
    group's normalised values unchanged, where one RMS over all of d_inner would shrink them ~100-fold."""
    torch.manual_seed(7)
    layer = Mamba2(D, d_state=4, headdim=8, ngroups=2).double()
    di = layer.d_inner
    y = torch.randn(1, 3, di, dtype=torch.float64)
    gate = torch.randn(1, 3, di, dtype=torch.float64)
    scaled = y.clone()
    scaled[..., : di // 2] *= 100.0
    a, b = layer.norm(y * F.silu(gate)), layer.norm(scaled * F.silu(gate))
    torch.testing.assert_close(b[..., di // 2:], a[..., di // 2:], atol=1e-12, rtol=1e-10)
    assert layer.norm.weight.shape == (di,)


@pytest.mark.parametrize("make_layer", [lambda: Attention(D, 4, dropout=0.4), lambda: DiffAttention(D, 2, dropout=0.4),
                                        lambda: MLA(D, 2, 8, qk_nope_dim=4, rope_dim=4, v_dim=4, dropout=0.4)],
                         ids=["attention", "diff", "mla"])
def test_attention_dropout_only_while_training(make_layer):
    torch.manual_seed(0)
    layer = make_layer()
    assert layer.dropout == 0.4     # as given, as nn.Dropout keeps p (calls use it as a multiple of 1/256)
    x = torch.randn(2, 9, D)
    layer.eval()
    quiet = layer(x)
    layer.dropout = 0.0
    layer.train()
    torch.testing.assert_close(quiet, layer(x))     # no dropout: training gives the eval output
    layer.dropout = 0.4
    assert not torch.allclose(layer(x), quiet)
    if isinstance(layer, Attention):
        assert "dropout=0.4\n" in repr(layer)


def test_retnet_keeps_its_decays_in_bfloat16():
    """A bf16 RetNet decays as the fp32 one: its slow heads' 1 - 2^-12 must not round to 1 (no decay) when the
    model is cast; after 1024 tokens the slow heads' gamma^T (e^-2 .. e^-0.25) shape the late outputs."""
    torch.manual_seed(0)
    layer = RetNet(16, 8)
    x = torch.randn(1, 1024, 16)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to(torch.bfloat16)(x.bfloat16()).float()
    torch.testing.assert_close(out[:, -64:], ref[:, -64:], atol=0.05, rtol=0)   # 0.15 with the rounded decays


@pytest.mark.parametrize("layer", [Attention, DiffAttention, MLA])
def test_dropout_on_a_backend_without_it_is_refused_at_construction(layer):
    """It failed only at the first training forward."""
    with pytest.raises(ValueError, match="dropout_p: runs on the 'triton' and 'reference' backends"):
        layer(32, 2, dropout=0.1, backend="flex")
    layer(32, 2, dropout=0.0, backend="flex")


def test_favor_layers_draw_their_own_features_reproducibly():
    """Each FAVOR+ layer its own random features (a fixed seed gave every layer the same), drawn from torch's
    generator as the weights are: one torch.manual_seed builds the same model."""
    def build():
        torch.manual_seed(3)
        return [LinearAttention(D, 2, feature_map="favor", num_features=16) for _ in range(2)]

    first, second = build(), build()
    assert not torch.equal(first[0].phi.projection, first[1].phi.projection)
    for a, b in zip(first, second):
        assert torch.equal(a.phi.projection, b.phi.projection)

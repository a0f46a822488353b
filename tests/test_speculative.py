"""Speculative decoding (``subquad.models.speculative_generate``) and the cache rewinds it rests on: greedy tokens
equal the target's own, for every rewindable mixer and for drafts that agree fully, partly or never; sampling
keeps the target's distribution; eos; rolling windows shorter than the drafts; bad arguments."""

import copy
import importlib

import pytest
import torch

from subquad.cache import RollingKVCache, StaticKVCache
from subquad.models import HybridLM, speculative_generate
from subquad.models.hybrid import probabilities
from subquad.models.rewind import RewindableCaches

OPTIONS = {"L": {"window": 4}, "M": {"d_state": 8}, "K": {"kv_lora_rank": 8, "rope_dim": 4},
           "S": {"block": 2, "compress_block": 2, "compress_stride": 1, "top_k": 3, "window": 3}}


def _mla_available() -> bool:
    try:
        importlib.import_module("subquad.nn.mla")
    except ImportError:
        return False
    return True


# every letter whose cache rewinds, in a few stacks (K only where MLA is available)
STACKS = ["MAL", "ERDNYF", "GSMD"] + (["KAE"] if _mla_available() else [])


def tiny(layers, seed=0, vocab=64, **kw):
    """Untied embeddings: a tied untrained model mostly repeats its last token, where any draft agrees."""
    torch.manual_seed(seed)
    return HybridLM(vocab, 16, layers, heads=2, mixer_options={**OPTIONS, **kw}, tie_embeddings=False).double()


def perturbed(model, scale, seed=5):
    """A copy of ``model`` with Gaussian noise of ``scale`` on every weight: a draft that agrees only partly."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return out


def prompt(batch=2, length=7, vocab=64):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layers", STACKS)
def test_a_draft_equal_to_the_target_is_always_accepted(layers):
    target = tiny(layers)
    ids = prompt()
    got, stats = speculative_generate(target, target, ids, 14, num_draft=3, temperature=0)
    assert torch.equal(got, target.generate(ids, 14, temperature=0))
    # 14 tokens: 3 rounds of 3 drafts and a bonus token, then one of the single draft that fits and its bonus
    assert (stats.rounds, stats.drafted, stats.accepted) == (4, 2 * 10, 2 * 10) and stats.acceptance_rate == 1.0


@pytest.mark.parametrize("layers", STACKS)
@pytest.mark.parametrize("draft_layers, scale", [(None, 0.002), ("EL", None)])
def test_greedy_tokens_are_the_targets_whatever_the_draft(layers, draft_layers, scale):
    """A perturbed copy of the target agrees on some drafts (rewinds in the middle of a round), an unrelated
    model on next to none (every round rewinds to its first token): the tokens are the target's either way."""
    target = tiny(layers)
    draft = perturbed(target, scale) if draft_layers is None else tiny(draft_layers, seed=1)
    for batch in (1, 2):
        ids = prompt(batch)
        got, stats = speculative_generate(target, draft, ids, 20, num_draft=3, temperature=0)
        assert torch.equal(got, target.generate(ids, 20, temperature=0))
        assert stats.accepted < stats.drafted
        if draft_layers is None:
            assert stats.accepted > 0


@pytest.mark.parametrize("num_draft", [1, 2, 9])
def test_any_number_of_drafts(num_draft):
    """One draft a round, and more drafts than the tokens asked for (the last round drafts what fits)."""
    target = tiny("MAL")
    draft = perturbed(target, 0.003)
    ids = prompt(1)
    got, stats = speculative_generate(target, draft, ids, 6, num_draft=num_draft, temperature=0)
    assert torch.equal(got, target.generate(ids, 6, temperature=0))
    assert stats.accepted + stats.rounds == 6      # each round: the drafts kept and one token of the target's
    assert 0 < stats.accepted < stats.drafted


def test_a_rolling_window_shorter_than_the_drafts():
    """Local layers of window 2 with 5 drafts a round: the verifying step writes 6 tokens into the ring and a
    rewind goes back up to 5, past the whole window; the ring is made for it (window + 5 slots)."""
    target = tiny("LLMLG", L={"window": 2})
    draft = perturbed(target, 0.002)
    ids = prompt(2, 9)
    caches = RewindableCaches(target, 2, 40, 6).caches
    assert [c.slots for c in caches if isinstance(c, RollingKVCache)] == [7, 7, 7]
    got, stats = speculative_generate(target, draft, ids, 30, num_draft=5, temperature=0)
    assert torch.equal(got, target.generate(ids, 30, temperature=0))
    assert 0 < stats.accepted < stats.drafted


def test_eos_ends_the_rows_as_generate_does():
    target = tiny("MAL")
    draft = perturbed(target, 0.001)
    ids = prompt(2)
    free = target.generate(ids, 12, temperature=0)[:, 7:]
    # an eos that row 0 emits at its 4th token (for the first time) and row 1 later or never
    eos = int(free[0, 3])
    assert eos not in free[0, :3].tolist()
    alone, _ = speculative_generate(target, draft, ids[:1], 12, num_draft=3, temperature=0, eos_token_id=eos)
    assert torch.equal(alone, target.generate(ids[:1], 12, temperature=0, eos_token_id=eos))
    assert alone.shape[1] == 7 + 4
    both, _ = speculative_generate(target, draft, ids, 12, num_draft=3, temperature=0, eos_token_id=eos)
    assert torch.equal(both, target.generate(ids, 12, temperature=0, eos_token_id=eos))
    assert (both[0, 7 + 3:] == eos).all()


def _joint(model, prefix, tokens, vocab, **processing):
    """The exact distribution of ``model``'s next ``tokens`` tokens after ``prefix`` ``(1, n)``, over the
    ``vocab ** tokens`` sequences in lexicographic order: one forward over every continuation."""
    rest = torch.cartesian_prod(*[torch.arange(vocab)] * tokens).view(-1, tokens)
    ids = torch.cat([prefix.expand(len(rest), -1), rest], 1)
    probs = probabilities(model(ids)[:, prefix.shape[1] - 1:-1].float(), **processing)
    return probs.gather(-1, rest[..., None])[..., 0].prod(1)


@pytest.mark.parametrize("same", [False, True])
def test_sampling_keeps_the_targets_distribution(same):
    """The theorem of speculative sampling: each token has the target's distribution, whatever the draft.
    8000 rows of one prompt (each row draws its own tokens) sample 3 tokens over a vocabulary of 4 (top 3 kept,
    so a token never drawn by the target must never appear); every one of the 64 sequences' frequency is within
    5 standard deviations of the target's probability. A different draft (rejections, residual draws), one
    further from the target than that, and the target as its own draft (every draft accepted, then the bonus
    token)."""
    vocab, rows, processing = 4, 8000, dict(temperature=0.03, top_k=3)
    target = tiny("MA", vocab=vocab)
    draft = target if same else tiny("E", seed=3, vocab=vocab)
    start = torch.tensor([[1, 2, 3]])
    ids, stats = speculative_generate(target, draft, start.expand(rows, -1), 3, num_draft=2,
                                      generator=torch.Generator().manual_seed(0), **processing)
    freq = torch.bincount((ids[:, 3:] * torch.tensor([16, 4, 1])).sum(1), minlength=64).double() / rows
    with torch.no_grad():
        want = _joint(target, start, 3, vocab, **processing).double()
        drafts_own = _joint(draft, start, 3, vocab, **processing).double()
    tolerance = 5 * (want * (1 - want) / rows).sqrt()
    assert ((freq - want).abs() <= tolerance).all(), (freq - want).abs().max()
    assert (freq[want == 0] == 0).all() and (want == 0).sum() >= 16
    if same:
        assert stats.accepted == stats.drafted
    else:
        assert ((drafts_own - want).abs() > tolerance).any()
        # (the 8000 rows keep, each round, the fewest drafts any of them accepted: none)
        assert stats.accepted < stats.drafted


def test_rewound_caches_continue_as_if_the_dropped_tokens_never_came():
    """Every rewindable layer kind: after a checkpoint, wrong tokens fed in steps of one and of three, then a
    rewind keeping the first right one, the right continuation gives the logits of one forward over it all."""
    layers = "MALERDNYFGSK" if _mla_available() else "MALERDNYFGS"
    model = tiny(layers)
    seq = prompt(2, 12)
    wrong = (seq + 1) % 64
    caches = RewindableCaches(model, 2, 16, 5)
    head = caches.forward(seq[:, :5])
    caches.checkpoint()
    first = caches.forward(seq[:, 5:6])
    caches.forward(wrong[:, 6:7])
    caches.forward(wrong[:, 7:10])
    caches.rewind(6)
    with pytest.raises(ValueError, match=r"length: expected a length in \[5, 6\]"):
        caches.rewind(4)
    tail = caches.forward(seq[:, 6:12])
    assert caches.length == 12
    torch.testing.assert_close(torch.cat([head, first, tail], 1), model(seq), atol=1e-7, rtol=1e-7)


def test_kv_cache_rewind():
    static = StaticKVCache(2, 8, 1, 4, torch.float32)
    static.update(torch.ones(2, 5, 1, 4), torch.ones(2, 5, 1, 4))
    static.rewind(torch.tensor([2, 4]))
    assert static.seqlens.tolist() == [2, 4]
    for bad in (None, 6, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="positions"):
            static.rewind(bad)
    ring = RollingKVCache(1, 4, 1, 4, torch.float32, max_step=3)
    ring.update(torch.ones(1, 10, 1, 4), torch.ones(1, 10, 1, 4))
    with pytest.raises(ValueError, match="can rewind at most 2 tokens, got 3"):
        ring.rewind(7)
    ring.rewind(8)
    with pytest.raises(ValueError, match="at most 3 tokens behind the furthest one written"):
        ring.rewind(6)      # (2 behind the length, 4 behind the furthest written)
    assert ring._lengths == [8]


def test_bad_arguments():
    target, ids = tiny("MA"), prompt(1)
    cases = [
        (dict(draft=tiny("EA", vocab=32)), r"draft: expected a HybridLM of the target's vocab_size \(64\)"),
        (dict(num_draft=0), "num_draft: expected a positive int"),
        (dict(num_draft=True), "num_draft: expected a positive int"),
        (dict(draft=tiny("MH")), r"draft: expected layers whose caches can be rewound .* with H"),
        (dict(target=tiny("HA")), r"target: expected layers whose caches can be rewound .* with H"),
        (dict(target=target.blocks[0]), "target: expected a HybridLM"),
        (dict(prompt_ids=ids[0]), r"prompt_ids: expected \(batch, prompt_len >= 1\), got \(7,\)"),
        (dict(prompt_ids=ids + 64), r"prompt_ids: expected token ids in \[0, 64\)"),
        (dict(temperature=-1.0), "temperature"),
        (dict(eos_token_id=64), "eos_token_id"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            speculative_generate(**{**dict(target=target, draft=target, prompt_ids=ids, max_new_tokens=4), **change})
    with pytest.raises(ValueError, match="max_step: expected a positive int"):
        target.new_caches(1, 8, max_step=0)

"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023; gpt-fast's ``speculative_decode``): a small
draft model proposes a few tokens one at a time, the target scores them all in one forward, and the longest
prefix the target agrees with is kept, so each target forward yields one to ``num_draft + 1`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hybrid import HybridLM, _is_int, check_sampling, check_token_ids, probabilities
from .rewind import RewindableCaches, check_rewindable


@dataclass
class SpeculativeStats:
    """What a ``speculative_generate`` call did. ``rounds``: target forwards after the prompt's; ``drafted``: draft
    tokens proposed and ``accepted``: those kept, both summed over the rows still generating (before their eos)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """``accepted / drafted`` (NaN before any draft)."""
        return self.accepted / self.drafted if self.drafted else math.nan


@torch.no_grad()
def speculative_generate(target: HybridLM, draft: HybridLM, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                         num_draft: int = 4, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Sample ``max_new_tokens`` after ``prompt_ids`` ``(batch, prompt_len)`` from ``target``, ``draft`` (a smaller
    HybridLM of the same vocabulary) proposing them.

    Each round the draft proposes ``num_draft`` tokens, one forward each over its caches, and the target scores the
    last token so far and the drafts in one forward of ``num_draft + 1`` tokens over its own. With ``p`` and ``q``
    the target's and the draft's distributions (``generate``'s ``temperature``, ``top_k`` and ``top_p`` applied to
    both: ``subquad.models.hybrid.probabilities``), draft ``x`` is accepted with probability
    ``min(1, p(x) / q(x))``; at the first rejection the token is drawn from ``max(0, p - q)`` normalised instead,
    and when every draft is accepted the target's last distribution gives one more. Each token then has the
    target's own distribution (the papers' theorem), so the draft changes the speed only. ``temperature=0`` makes
    ``p`` and ``q`` one-hot: a draft is kept when it is the target's argmax, and the tokens are
    ``target.generate(prompt_ids, max_new_tokens, temperature=0)``'s (up to floating-point ties, as the target
    scores several tokens in one forward where ``generate`` scores one).

    Both models' caches then go back to the tokens kept (``subquad.models.rewind``): KV caches rewind their
    lengths, recurrent layers (``M E R N Y F``) restore a state cloned before the round and run their mixer again
    over the kept tokens; LSH attention (``H``) is refused. A sliding-window layer's ring is made
    ``num_draft`` slots longer so that it can go back that far.

    Rows: every row keeps the same number of tokens a round, the fewest any row still generating accepted plus one
    (a row that accepted more takes its next draft as that one, which it had accepted). That keeps one length for
    all the caches (a recurrent state has one position for the batch) and each row's tokens the target's; the
    rounds run as long as the least agreeing row needs. ``eos_token_id``: as ``generate``, a row that emits it
    emits it from then on, and generation stops when every row has.

    Returns ``(ids, stats)``: ``ids`` ``(batch, prompt_len + steps)``, ``steps`` being ``max_new_tokens`` unless
    every row ended earlier (``generate``'s shape), and a ``SpeculativeStats``.
    """
    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, HybridLM):
            raise ValueError(f"{name}: expected a HybridLM, got {type(model).__name__}")
        check_rewindable(model, name)
    vocab = target.config["vocab_size"]
    if draft.config["vocab_size"] != vocab:
        raise ValueError(f"draft: expected a HybridLM of the target's vocab_size ({vocab}), got vocab_size "
                         f"{draft.config['vocab_size']}")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids: expected (batch, prompt_len >= 1), got {shape}")
    if not _is_int(num_draft) or num_draft < 1:
        raise ValueError(f"num_draft: expected a positive int, got {num_draft!r}")
    check_token_ids(prompt_ids, vocab)
    check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, vocab)
    stats = SpeculativeStats()
    if not max_new_tokens:
        return prompt_ids, stats
    bsz, prompt_len = prompt_ids.shape
    max_len = prompt_len + max_new_tokens
    target_caches = RewindableCaches(target, bsz, max_len, num_draft + 1, "target")
    draft_caches = RewindableCaches(draft, bsz, max_len, num_draft + 1, "draft")
    ids = prompt_ids
    if prompt_len > 1:
        # (the last prompt token is the first round's to score: its logits give the first new token)
        target_caches.forward(ids[:, :-1])
        draft_caches.forward(ids[:, :-1])
    finished = torch.zeros(bsz, dtype=torch.bool, device=ids.device)

    def distribution(logits):
        return probabilities(logits.float(), temperature, top_k, top_p)

    def draw(probs):
        """A token from each row of ``probs`` ``(batch, vocab)`` -> ``(batch,)``."""
        if temperature == 0:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    while ids.shape[1] < max_len and not bool(finished.all()):
        k = min(num_draft, max_len - ids.shape[1] - 1)      # (the round's tokens, k + 1 at most, must fit)
        target_caches.checkpoint()
        draft_caches.checkpoint()
        drafts = ids.new_empty(bsz, k)
        q = torch.empty(bsz, k, vocab, device=ids.device, dtype=torch.float32)
        step = ids[:, draft_caches.length:]     # what the draft has not seen: the last token, or the last two
        for i in range(k):
            q[:, i] = distribution(draft_caches.forward(step)[:, -1])
            drafts[:, i] = draw(q[:, i])
            step = drafts[:, i:i + 1]
        p = distribution(target_caches.forward(torch.cat([ids[:, -1:], drafts], 1)))
        accepted = _accepted(drafts, q, p, temperature == 0, generator)
        # a finished row's tokens become eos whatever it accepts: it does not hold the others back
        n = int(accepted.masked_fill(finished, k).min())
        if n == k:
            last = draw(p[:, k])
        else:
            residual = (p[:, n] - q[:, n]).clamp(min=0)
            # (empty where p <= q everywhere: such a row accepted its draft, and takes it below)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, n])
            last = torch.where(accepted > n, drafts[:, n], draw(residual))
        new = torch.cat([drafts[:, :n], last[:, None]], 1)
        stats.rounds += 1
        active = int((~finished).sum())
        stats.drafted += k * active
        stats.accepted += n * active
        if eos_token_id is not None:
            # (a finished row's caches keep the tokens it accepted, not these eos: nothing it computes is used)
            new = new.masked_fill(finished[:, None], eos_token_id)
            eos = new == eos_token_id
            new = new.masked_fill(eos.cumsum(1) > eos.int(), eos_token_id)
            finished = finished | eos.any(1)
        ids = torch.cat([ids, new], 1)
        target_caches.rewind(ids.shape[1] - 1)
        draft_caches.rewind(min(draft_caches.length, ids.shape[1] - 1))
    if eos_token_id is not None and bool(finished.all()):
        # generate's length: up to the step at which the last row emitted its eos
        first = (ids[:, prompt_len:] == eos_token_id).int().argmax(1)
        ids = ids[:, :prompt_len + int(first.max()) + 1]
    return ids, stats


def _accepted(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, greedy: bool, generator) -> torch.Tensor:
    """``(batch,)``: how many of each row's ``drafts`` ``(batch, k)`` lead the accepted ones, draft ``x`` at ``j``
    accepted with probability ``min(1, p[:, j, x] / q[:, j, x])``. Greedy (one-hot ``p``, ``q``): when ``p`` is 1,
    without a random draw."""
    index = drafts[..., None]
    p_x = p[:, :drafts.shape[1]].gather(-1, index)[..., 0]
    q_x = q.gather(-1, index)[..., 0]
    u = torch.zeros_like(q_x) if greedy else torch.rand(q_x.shape, generator=generator, device=q_x.device)
    return (u * q_x < p_x).cumprod(1).sum(1)

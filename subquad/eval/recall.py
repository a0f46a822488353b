"""Associative recall: train a small HybridLM on MQAR (Zoology's multi-query associative recall) and measure the
fraction of queried keys whose value it predicts.

MQAR separates the mechanisms where language modelling loss barely does: softmax attention looks the key up
exactly, a sliding window only finds the pairs still inside its window, and a fixed-size state (linear
attention, recurrences) must compress every pair into ``d_k x d_v`` numbers per head.

    result = train_and_eval_mqar("AA", seq_len=16, num_pairs=4, vocab_size=16, d_model=64, steps=200)
    result.accuracy      # 0.9-1.0 for softmax attention at this size (seeds 0-3); chance is 1 / num_pairs
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..data import IGNORE, mqar
from ..models import HybridLM
from ..train import TrainConfig, lr_at, make_optimizer

#: held-out batches are drawn from this seed plus the run's, so that no training batch is ever evaluated
HELD_OUT_SEED = 10_000


def answer_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """``(correct, answers)``: among the positions whose target is not ``IGNORE``, how many the argmax of
    ``logits`` ``(batch, seq, vocab)`` predicts. Every other position is ignored, whatever it predicts."""
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"logits: expected (batch, seq, vocab) over targets {tuple(targets.shape)}, got "
                         f"{tuple(logits.shape)}")
    answers = targets != IGNORE
    correct = logits.argmax(-1)[answers] == targets[answers]
    return int(correct.sum()), int(answers.sum())


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The fraction of answers (targets other than ``IGNORE``) that ``model`` predicts, over ``(ids, targets)``
    batches of a synthetic recall task (``subquad.data.mqar`` or ``needle``); the model sees ``ids`` and is
    scored where it reads a query, at the same position (the targets are not shifted)."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    correct = answers = 0
    for ids, targets in batches:
        hits, n = answer_hits(model(ids), targets.to(ids.device))
        correct, answers = correct + hits, answers + n
    if isinstance(model, torch.nn.Module):
        model.train(was_training)
    if answers == 0:
        raise ValueError("batches: expected at least one answer position (a target other than IGNORE), got none")
    return correct / answers


def fit_recall(model: HybridLM, sample: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]], *,
               steps: int, lr: float = 3e-3, warmup: int = 20, weight_decay: float = 0.1, seed: int = 0,
               device: torch.device | str = "cpu") -> list[float]:
    """Train ``model`` in place for ``steps`` batches ``sample(generator)``, the cross-entropy taken at the answer
    positions only (the haystack and the listed pairs are random: there is nothing else to learn). AdamW with
    warm-up and cosine decay, as ``subquad train``. Returns the loss of every step."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    schedule = TrainConfig(steps=steps, lr=lr, warmup=min(warmup, steps), weight_decay=weight_decay)
    opt = make_optimizer(model, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        ids, targets = (t.to(device) for t in sample(gen))
        loss = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def mqar_batches(count: int, batch: int, *, num_pairs: int, seq_len: int, vocab_size: int,
                 seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` MQAR batches from their own generator (``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return [mqar(batch, num_pairs, seq_len, vocab_size, gen) for _ in range(count)]


@dataclass
class RecallResult:
    """One pattern's MQAR run. ``chance`` is ``1 / num_pairs``: a model that has learned to answer with one of
    the values listed in its context, picked at random (the uniform guess over the value half of the vocabulary,
    ``2 / vocab_size``, is lower)."""

    pattern: str
    accuracy: float
    chance: float
    params: int
    seconds: float
    losses: list[float] = field(repr=False)
    config: dict = field(repr=False)


def train_and_eval_mqar(pattern: str, *, seq_len: int = 16, num_pairs: int = 4, vocab_size: int = 16,
                        d_model: int = 64, heads: int | None = None, mixer_options: dict | None = None,
                        steps: int = 200, batch_size: int = 64, lr: float = 3e-3, warmup: int = 20,
                        eval_batches: int = 8, seed: int = 0, threads: int | None = None,
                        device: str = "cpu") -> RecallResult:
    """Train a ``HybridLM(vocab_size, d_model, pattern)`` on fresh MQAR batches for ``steps`` steps, then measure
    its recall on ``eval_batches`` held-out batches. The same arguments give the same result on the CPU (the
    global RNG is left as it was). ``threads``: torch's CPU threads (1 is far faster on a CPU shared with other
    jobs)."""
    from ..train import pick_device

    if not isinstance(eval_batches, int) or eval_batches <= 0:
        raise ValueError(f"eval_batches: expected a positive int, got {eval_batches!r}")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0:
            raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
        torch.set_num_threads(threads)
    dev = pick_device(device)
    mqar(1, num_pairs, seq_len, vocab_size)  # checks the task's sizes before a model is built
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HybridLM(vocab_size, d_model, pattern, heads=heads, mixer_options=mixer_options).to(dev)

    def sample(gen):
        return mqar(batch_size, num_pairs, seq_len, vocab_size, gen)

    losses = fit_recall(model, sample, steps=steps, lr=lr, warmup=warmup, seed=seed, device=dev)
    held_out = mqar_batches(eval_batches, batch_size, num_pairs=num_pairs, seq_len=seq_len, vocab_size=vocab_size,
                            seed=HELD_OUT_SEED + seed)
    accuracy = recall_accuracy(model, [(ids.to(dev), targets.to(dev)) for ids, targets in held_out])
    config = dict(seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size, d_model=d_model, heads=heads,
                  mixer_options=mixer_options or {}, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    return RecallResult(pattern, accuracy, 1 / num_pairs, model.num_params(), time.perf_counter() - start, losses,
                        config)

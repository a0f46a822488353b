"""Needle in a haystack: retrieval accuracy over a grid of context lengths x needle depths.

The needle is ``[marker, value]`` at a relative depth of a random haystack; the sequence ends with the marker and
the model must answer the value (``subquad.data.needle``). A sliding window fails as soon as the needle is more
than a window from the end; a fixed-size state fades with distance; softmax attention should be flat, up to the
lengths it was trained on.

    model = train_needle_model("AA", seq_len=16, steps=300)      # 1.00 at 16 tokens, 0.6-0.8 at 64
    grid = needle_grid(model, lengths=[16, 32, 64], depths=[0, 0.5, 1])
    grid.plot("needle.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import needle
from ..models import HybridLM
from .recall import fit_recall, recall_accuracy


@dataclass
class NeedleGrid:
    """``accuracy[i][j]``: the fraction of ``trials`` needles retrieved at ``depths[i]`` in contexts of
    ``lengths[j]`` tokens (depth 0: the needle opens the context; 1: one haystack token separates it from the
    final marker)."""

    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    trials: int

    def plot(self, path, title: str = "needle in a haystack") -> Path:
        """A heat map (depth down, length across) written as a PNG to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(self.lengths), 1.0 + 0.5 * len(self.depths)))
        image = ax.imshow(self.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(self.lengths)), [str(n) for n in self.lengths])
        ax.set_yticks(range(len(self.depths)), [f"{d:.0%}" for d in self.depths])
        for i, row in enumerate(self.accuracy):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="retrieval accuracy")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def check_grid(lengths, depths, trials: int) -> tuple[list[int], list[float]]:
    """``needle_grid``'s lengths and depths as lists, checked with ``trials`` (``subquad eval needle`` checks them
    before it trains the model)."""
    lengths, depths = list(lengths), list(depths)
    if not lengths or not all(isinstance(n, int) and n >= 6 for n in lengths):
        raise ValueError(f"lengths: expected context lengths (ints >= 6), got {lengths!r}")
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"depths: expected fractions in [0, 1], got {depths!r}")
    if not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"trials: expected a positive int, got {trials!r}")
    return lengths, depths


def needle_grid(model, lengths, depths, *, vocab_size: int | None = None, trials: int = 64, seed: int = 0,
                device: torch.device | str | None = None) -> NeedleGrid:
    """Retrieval accuracy of ``model`` (``ids (batch, seq)`` -> logits ``(batch, seq, vocab)``) for every length
    and depth, ``trials`` needles each. ``vocab_size`` defaults to the model's (a HybridLM's ``config``). Each cell
    draws its haystacks from its own generator, so a cell does not change when the grid around it does."""
    lengths, depths = check_grid(lengths, depths, trials)
    if vocab_size is None:
        vocab_size = getattr(model, "config", {}).get("vocab_size")
        if vocab_size is None:
            raise ValueError("vocab_size: the model has no config['vocab_size']; pass vocab_size=")
    if device is None:
        weight = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = weight.device if weight is not None else "cpu"
    accuracy = []
    for depth in depths:
        row = []
        for length in lengths:
            gen = torch.Generator().manual_seed(_cell_seed(seed, length, depth))
            ids, targets = needle(trials, length, vocab_size, depth, gen)
            row.append(recall_accuracy(model, [(ids.to(device), targets.to(device))]))
        accuracy.append(row)
    return NeedleGrid(lengths, depths, accuracy, trials)


def _cell_seed(seed: int, length: int, depth: float) -> int:
    """A cell's generator seed from its own length and depth (to a millionth), not its place in the grid, so
    that adding or removing lengths or depths leaves the other cells' needles as they were."""
    return ((seed * 1_000_003 + length) * 1_000_003 + round(depth * 1_000_000)) % (1 << 63)


def train_needle_model(pattern: str, *, seq_len: int = 16, vocab_size: int = 16, d_model: int = 64,
                       heads: int | None = None, mixer_options: dict | None = None, steps: int = 300,
                       batch_size: int = 128, lr: float = 3e-3, warmup: int = 20, seed: int = 0,
                       device: str = "cpu") -> HybridLM:
    """A ``HybridLM(vocab_size, d_model, pattern)`` trained on needles of ``seq_len`` tokens at random depths
    (loss at the final marker only). Deterministic for a ``seed`` on the CPU; the global RNG is left as it was."""
    from ..train import pick_device

    dev = pick_device(device)
    needle(1, seq_len, vocab_size)  # checks the sizes before a model is built
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HybridLM(vocab_size, d_model, pattern, heads=heads, mixer_options=mixer_options).to(dev)

    def sample(gen):
        return needle(batch_size, seq_len, vocab_size, None, gen)

    fit_recall(model, sample, steps=steps, lr=lr, warmup=warmup, seed=seed, device=dev)
    return model

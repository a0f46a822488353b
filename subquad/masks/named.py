"""The named patterns of the literature, built from the building blocks of ``patterns`` (so each prints as
what the user asked for, and the kernels and the planner recognise their parts)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._checks import integer_or_none
from .patterns import (
    INF,
    Band,
    BlockLayout,
    Document,
    Named,
    Pattern,
    PeriodicColumns,
    Positions,
    Predicate,
    RandomBlocks,
    Residue,
    SameBlock,
    Segments,
    Tensor,
    _Prefix,
)


def _positive(name: str, value) -> int:
    if integer_or_none(value, 1) is None:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _global_positions(global_tokens) -> torch.Tensor:
    """``global_tokens`` as a 1-D int64 tensor of distinct positions (a boolean or fractional input would
    otherwise be cast to positions silently: a Hugging Face-style mask [T, F, F, T] to tokens 0 and 1)."""
    if isinstance(global_tokens, torch.Tensor):
        if global_tokens.dim() != 1 or global_tokens.dtype.is_floating_point or global_tokens.dtype == torch.bool:
            raise ValueError(f"global_tokens: expected a 1-D integer tensor of positions, got shape "
                             f"{tuple(global_tokens.shape)} {global_tokens.dtype} (for a boolean mask of global "
                             f"tokens pass mask.nonzero().flatten())")
        return torch.unique(global_tokens.long())
    if not isinstance(global_tokens, Sequence) or isinstance(global_tokens, str) \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in global_tokens):
        raise ValueError(f"global_tokens: expected a sequence or 1-D tensor of integer positions (e.g. range(16)), "
                         f"got {global_tokens!r}")
    return torch.unique(torch.tensor(list(global_tokens), dtype=torch.long))


causal = Band(0, INF, name="causal")
full = Band(-INF, INF, name="full")


def sliding_window(window: int, causal: bool = True) -> Pattern:
    """Mistral's window: each query sees the ``window`` most recent keys (itself included). Non-causal:
    keys within ``window // 2`` positions on either side (Longformer's convention)."""
    window = _positive("window", window)
    if causal:
        return Named("sliding_window", Band(0, window - 1), {"window": window, "causal": True})
    half = window // 2
    return Named("sliding_window", Band(-half, half), {"window": window, "causal": False})


def window(left: int, right: int) -> Pattern:
    """FlashAttention's ``window_size=(left, right)``: keys from ``left`` positions before the query's to
    ``right`` after it (positions as everywhere: queries aligned to the end of the keys); -1 leaves a side
    unbounded. ``window(w - 1, 0)`` is ``sliding_window(w)``."""
    for name, value in (("left", left), ("right", right)):
        if integer_or_none(value, -1) is None:
            raise ValueError(f"{name}: expected an integer >= 0, or -1 for unbounded, got {value!r}")
    left, right = int(left), int(right)
    return Named("window", Band(-INF if right < 0 else -right, INF if left < 0 else left),
                 {"left": left, "right": right})


def strided(stride: int, causal: bool = True) -> Pattern:
    """Sparse Transformer's strided pattern: the last ``stride`` keys, plus every ``stride``-th key
    (positions ``stride-1, 2*stride-1, ...``) — the local head and the strided head in one mask."""
    stride = _positive("stride", stride)
    band = Band(0, stride - 1) if causal else Band(-(stride - 1), stride - 1)
    inner = band | PeriodicColumns(stride, [stride - 1])
    if causal:
        inner = inner & Band(0, INF, name="causal")
    return Named("strided", inner, {"stride": stride, "causal": causal})


def fixed(block: int, summary: int, causal: bool = True) -> Pattern:
    """Sparse Transformer's fixed pattern: keys in the query's own block of ``block`` positions, plus the
    last ``summary`` positions of every block (the summary columns)."""
    block = _positive("block", block)
    summary = _positive("summary", summary)
    if summary > block:
        raise ValueError(f"summary: expected at most block={block} summary positions, got {summary}")
    inner = SameBlock(block) | PeriodicColumns(block, range(block - summary, block))
    if causal:
        inner = inner & Band(0, INF, name="causal")
    return Named("fixed", inner, {"block": block, "summary": summary, "causal": causal})


def dilated(window: int, dilation: int, causal: bool = True) -> Pattern:
    """A dilated window (LongNet, dilated sliding window): keys within ``window`` positions whose distance
    to the query is a multiple of ``dilation`` (causal: ``ceil(window / dilation)`` keys per query)."""
    window = _positive("window", window)
    dilation = _positive("dilation", dilation)
    band = Band(0, window - 1) if causal else Band(-(window // 2), window // 2)
    return Named("dilated", band & Residue(dilation), {"window": window, "dilation": dilation, "causal": causal})


def block_sparse(layout: torch.Tensor, block: int) -> Pattern:
    """A block layout: ``layout[qb, kb]`` (optionally per batch and head) keeps a ``block x block`` tile. The
    pattern keeps a copy of ``layout``."""
    return BlockLayout(layout, _positive("block", block))


def longformer(window: int, global_tokens: Sequence[int] | torch.Tensor = (), causal: bool = False) -> Pattern:
    """Longformer: a sliding window plus global tokens that see, and are seen by, every position."""
    window = _positive("window", window)
    tokens = _global_positions(global_tokens)
    inner = _window_and_globals(window, tokens, causal)
    if causal:
        inner = inner & Band(0, INF, name="causal")
    return Named("longformer", inner, {"window": window, "global_tokens": tokens.numel(), "causal": causal})


def _window_and_globals(window: int, tokens: torch.Tensor, causal: bool) -> Pattern:
    """Longformer's union before causality (which the callers apply last, once: the planner reads a union
    of parts intersected with causal)."""
    inner = sliding_window(window, causal=causal).inner
    if tokens.numel():
        inner = inner | Positions(tokens, "kv") | Positions(tokens, "q")
    return inner


def bigbird(window: int, global_tokens: Sequence[int] | torch.Tensor = (), random_blocks: int = 3,
            seed: int = 0, block: int = 64, causal: bool = False) -> Pattern:
    """BigBird: sliding window + global tokens + ``random_blocks`` seeded random key blocks per query block
    (causal: among the blocks up to the query's own, whatever the sequence's length; see ``RandomBlocks``).
    The window is ``longformer``'s (causal: the ``window`` most recent keys)."""
    window = _positive("window", window)
    block = _positive("block", block)
    if integer_or_none(random_blocks, 0) is None:
        raise ValueError(f"random_blocks: expected an integer >= 0, got {random_blocks!r}")
    if integer_or_none(seed) is None:
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    random_blocks, seed = int(random_blocks), int(seed)
    tokens = _global_positions(global_tokens)
    inner = _window_and_globals(window, tokens, causal)
    if random_blocks:
        inner = inner | RandomBlocks(random_blocks, block, seed, causal=causal)
    if causal:
        inner = inner & Band(0, INF, name="causal")
    return Named("bigbird", inner, {"window": window, "global_tokens": tokens.numel(),
                                    "random_blocks": random_blocks, "block": block, "seed": seed, "causal": causal})


def document(seq_ids: torch.Tensor) -> Pattern:
    """Packed variable-length sequences: attend only within the same ``seq_ids`` value. The pattern keeps a
    copy of ``seq_ids`` (its BlockMask and plans are cached by the pattern: ids edited in place afterwards
    would not reach them)."""
    return Document(seq_ids)


class _Lengths(Segments):
    """Each sequence's first ``lengths[b]`` tokens, apart from the rest (``padding``): prepared into the document
    pattern of two segments per row (its ids need the length), which the kernels' document term, FlexAttention
    and FA4's varlen path run as they run packing."""

    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths

    def prepare(self, ctx):
        # (the values' check reads them, which a traced call cannot: checked eagerly only)
        if self.lengths.shape[0] not in (1, ctx.batch) or (
                not torch.compiler.is_compiling() and int(self.lengths.max()) > ctx.seq_kv):
            raise ValueError(f"lengths: expected shape ({ctx.batch},) with values in [0, {ctx.seq_kv}], got "
                             f"{tuple(self.lengths.shape)} with max {int(self.lengths.max())}")
        ids = (torch.arange(ctx.seq_kv).view(1, -1) >= self.lengths.view(-1, 1)).long()
        return Document(ids).prepare(ctx)

    def __repr__(self):
        return f"lengths({self.lengths.tolist()})"


def padding(lengths) -> Pattern:
    """Right-padded sequences: row ``b``'s first ``lengths[b]`` tokens attend among themselves only; the
    padding after them attends among itself (its outputs are meant to be ignored; a row of keys hidden from
    every query would be all padding anyway). ``lengths``: ``(batch,)`` integers, or a list. Combine with
    ``causal`` or any pattern by ``&``. The pattern keeps a copy of ``lengths``."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.numel() == 0 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool \
            or int(lengths.min()) < 0:
        raise ValueError(f"lengths: expected a non-empty 1-D tensor of integers >= 0 (one per sequence), got "
                         f"{tuple(lengths.shape)} {lengths.dtype}")
    return Named("padding", _Lengths(lengths.to(torch.long, copy=True)), {"lengths": lengths.tolist()})


def prefix_lm(prefix_len: int) -> Pattern:
    """Prefix-LM: the first ``prefix_len`` positions are seen by everyone (bidirectional prefix), the rest
    is causal."""
    if integer_or_none(prefix_len, 0) is None:
        raise ValueError(f"prefix_len: expected an integer >= 0, got {prefix_len!r}")
    prefix_len = int(prefix_len)
    inner = Band(0, INF, name="causal") | _Prefix(prefix_len)
    return Named("prefix_lm", inner, {"prefix_len": prefix_len})


def from_tensor(mask: torch.Tensor) -> Pattern:
    """A boolean mask ``(seq_q, seq_kv)`` (optionally with leading heads / batch) as a pattern. The pattern keeps
    a copy: its BlockMasks are cached, and an edit of the tensor in place would reach its element predicate but
    not them. (``attention(mask=tensor)`` builds a new pattern on every call and copies nothing.)"""
    if isinstance(mask, torch.Tensor):
        mask = mask.clone()
    return Tensor(mask)


def from_predicate(fn: Callable, name: str | None = None) -> Pattern:
    """A user predicate ``fn(b, h, q_pos, k_pos) -> bool tensor`` as a pattern, evaluated on broadcastable
    index tensors at absolute positions (queries at ``i + seq_kv - seq_q``); its blocks are classified by
    evaluating it, and its partial blocks run as bitmasks in the kernels."""
    if not callable(fn):
        raise ValueError(f"fn: expected a callable fn(b, h, q_pos, k_pos) -> bool tensor, got {fn!r}")
    return Predicate(fn, name)

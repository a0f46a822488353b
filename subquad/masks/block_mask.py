"""BlockMask: the block summary of a pattern, the plan every softmax kernel follows.

For each (batch, head, query block) it lists the key blocks that are *full* (every pair kept: no masking
needed) and *partial* (some pairs kept: the pattern's predicate is applied element by element). Key blocks
in neither list are never loaded. The transposed lists (per key block, its query blocks) serve the
backward pass that accumulates dK and dV.

Built on the device from the pattern's analytic block bounds: the largest object is the
``(nQB, nKB)`` grid of block kinds, never an N^2 tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .patterns import BuildContext, Pattern

EMPTY, PARTIAL, FULL = 0, 1, 2


def _index_lists(kind: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the last two dims, the columns equal to ``which``, left-packed and padded with -1."""
    hit = kind == which
    num = hit.sum(-1, dtype=torch.int32)
    width = max(int(num.max()) if num.numel() else 0, 1)
    # A stable sort moves the hit columns to the front in increasing order.
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    idx = torch.where(torch.arange(width, device=kind.device) < num.unsqueeze(-1), order,
                      torch.full_like(order, -1))
    return num.contiguous(), idx.to(torch.int32).contiguous()


def canonical_device(device) -> torch.device:
    """``device`` with its index: ``"cuda"`` is the current CUDA device, as a tensor's ``.device`` says."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class BlockMask:
    """Block summary of ``pattern`` for ``seq_q`` queries against ``seq_kv`` keys.

    ``kind`` has shape ``(Bm, Hm, nQB, nKB)`` with ``Bm`` in (1, batch) and ``Hm`` in (1, heads): patterns
    that are the same for every sequence or head are stored once and broadcast.
    """

    pattern: Pattern
    kind: torch.Tensor
    seq_q: int
    seq_kv: int
    block_q: int
    block_kv: int
    batch: int
    heads: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, pattern: Pattern, *, batch: int, heads: int, seq_q: int, seq_kv: int,
              block_q: int = 128, block_kv: int = 128, device=None) -> "BlockMask":
        if seq_q <= 0 or seq_kv <= 0:
            raise ValueError(f"seq_q, seq_kv: expected positive lengths, got {seq_q}, {seq_kv}")
        for name, size in (("block_q", block_q), ("block_kv", block_kv)):
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"{name}: expected a positive integer block size, got {size!r}")
        if seq_q > seq_kv:
            # Queries are aligned to the end of the keys; more queries than keys has no position to sit at.
            raise ValueError(f"seq_q: expected at most seq_kv={seq_kv} queries (queries are aligned to the end "
                             f"of the keys), got {seq_q}")
        device = torch.device(device or "cpu")
        ctx = BuildContext(batch, heads, seq_q, seq_kv, device)
        pat = pattern.prepare(ctx)
        n_qb, n_kb = math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv)
        q0 = torch.arange(n_qb, device=device).view(-1, 1) * block_q + ctx.q_offset
        q1 = torch.clamp(q0 + block_q - 1, max=seq_kv - 1)
        k0 = torch.arange(n_kb, device=device).view(1, -1) * block_kv
        k1 = torch.clamp(k0 + block_kv - 1, max=seq_kv - 1)
        any_, all_ = pat.block_bounds(ctx, q0, q1, k0, k1)
        # EMPTY 0, PARTIAL 1, FULL 2 as a sum of booleans: no int64 grid at long N.
        kind = (any_ | all_).to(torch.int8) + all_.to(torch.int8)
        while kind.dim() < 4:
            kind = kind.unsqueeze(0)
        bm = batch if (pat.varies_with_batch and kind.shape[0] > 1) else 1
        hm = heads if (pat.varies_with_heads and kind.shape[1] > 1) else 1
        kind = kind[:bm, :hm].expand(bm, hm, n_qb, n_kb).contiguous()
        return cls(pat, kind, seq_q, seq_kv, block_q, block_kv, batch, heads)

    # -- shape ------------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return self.kind.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kind.shape[3]

    @property
    def q_offset(self) -> int:
        return self.seq_kv - self.seq_q

    def matches(self, batch: int, heads: int, seq_q: int, seq_kv: int) -> bool:
        return (self.seq_q, self.seq_kv) == (seq_q, seq_kv) and self.kind.shape[0] in (1, batch) \
            and self.kind.shape[1] in (1, heads)

    # -- index lists (cached) ---------------------------------------------------------------------------
    def _lists(self, name: str, transpose: bool, which: int):
        key = (name, transpose, which)
        if key not in self._cache:
            k = self.kind.transpose(-1, -2) if transpose else self.kind
            self._cache[key] = _index_lists(k, which)
        return self._cache[key]

    @property
    def full_kv(self):
        """``(num, idx)``: per (b, h, query block) the full key blocks; ``idx`` is padded with -1."""
        return self._lists("kv", False, FULL)

    @property
    def partial_kv(self):
        return self._lists("kv", False, PARTIAL)

    @property
    def full_q(self):
        """Transposed: per (b, h, key block) the query blocks that see it fully (for dK/dV)."""
        return self._lists("q", True, FULL)

    @property
    def partial_q(self):
        return self._lists("q", True, PARTIAL)

    def to(self, device) -> "BlockMask":
        device = canonical_device(device)
        if self.kind.device == device:
            return self
        return BlockMask.build(self.pattern, batch=self.batch, heads=self.heads, seq_q=self.seq_q,
                               seq_kv=self.seq_kv, block_q=self.block_q, block_kv=self.block_kv, device=device)

    # -- summaries --------------------------------------------------------------------------------------
    def _area_of(self, blocks: torch.Tensor) -> int:
        """Number of (query, key) pairs covered by the blocks where ``blocks`` (a bool grid like ``kind``) is
        True: every block is block_q x block_kv except the short last row and column. Vector sums only (no
        int64 grid of block areas at long N)."""
        last_q = self.seq_q - self.block_q * (self.num_q_blocks - 1)
        last_k = self.seq_kv - self.block_kv * (self.num_kv_blocks - 1)
        per_row = blocks.sum(-1, dtype=torch.int64) * self.block_kv - blocks[..., -1].to(torch.int64) * (self.block_kv - last_k)
        return int(per_row.sum() * self.block_q - per_row[..., -1].sum() * (self.block_q - last_q))

    def block_density(self) -> float:
        """Fraction of the (query, key) grid that the kernels visit (full + partial blocks)."""
        return self._area_of(self.kind != EMPTY) / (self.seq_q * self.seq_kv * self.kind.shape[0] * self.kind.shape[1])

    def kept_pairs(self) -> int:
        """Exact number of kept (query, key) pairs summed over the stored (batch, head) slices, broadcast to
        the full batch and heads. Partial blocks are counted element by element (there are O(N/block))."""
        total = self._area_of(self.kind == FULL)
        num, idx = self.partial_kv
        dev = self.kind.device
        for b in range(self.kind.shape[0]):
            for h in range(self.kind.shape[1]):
                for qb in range(self.num_q_blocks):
                    n = int(num[b, h, qb])
                    if n == 0:
                        continue
                    q = torch.arange(qb * self.block_q, min((qb + 1) * self.block_q, self.seq_q), device=dev)
                    kbs = idx[b, h, qb, :n].long()
                    k = (kbs.view(-1, 1) * self.block_kv + torch.arange(self.block_kv, device=dev)).flatten()
                    k = k[k < self.seq_kv]
                    m = self.pattern.predicate(torch.tensor(b, device=dev), torch.tensor(h, device=dev),
                                               q.view(-1, 1) + self.q_offset, k.view(1, -1))
                    total += int(m.expand(q.numel(), k.numel()).sum())     # (a predicate of one side broadcasts)
        scale = (self.batch // self.kind.shape[0]) * (self.heads // self.kind.shape[1])
        return total * scale

    def density(self) -> float:
        """Fraction of all (query, key) pairs that the pattern keeps (exact)."""
        return self.kept_pairs() / (self.seq_q * self.seq_kv * self.batch * self.heads)

    def to_dense(self) -> torch.Tensor:
        """The element mask ``(Bm, Hm, seq_q, seq_kv)`` (small N only)."""
        if self.seq_q * self.seq_kv > 1 << 26:
            raise ValueError(f"to_dense: {self.seq_q} x {self.seq_kv} is too large to materialise")
        dev = self.kind.device
        b = torch.arange(self.kind.shape[0], device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.kind.shape[1], device=dev).view(1, -1, 1, 1)
        q = torch.arange(self.seq_q, device=dev).view(1, 1, -1, 1) + self.q_offset
        k = torch.arange(self.seq_kv, device=dev).view(1, 1, 1, -1)
        m = self.pattern.predicate(b, h, q, k)
        return m.expand(self.kind.shape[0], self.kind.shape[1], self.seq_q, self.seq_kv)

    def plot(self, path, batch: int = 0, head: int = 0) -> None:
        """Write a PNG of the block kinds (white: skipped, grey: partial, black: full); for small N the
        element mask is drawn beside it."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        small = self.seq_q * self.seq_kv <= 1 << 22
        fig, axes = plt.subplots(1, 2 if small else 1, figsize=(10 if small else 5, 5), squeeze=False)
        kinds = self.kind[min(batch, self.kind.shape[0] - 1), min(head, self.kind.shape[1] - 1)].cpu()
        axes[0, 0].imshow(kinds.float().numpy(), cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
        axes[0, 0].set_title(f"blocks {self.block_q}x{self.block_kv}: density {self.block_density():.3f}")
        axes[0, 0].set_xlabel("key block")
        axes[0, 0].set_ylabel("query block")
        if small:
            dense = self.to_dense()[min(batch, self.kind.shape[0] - 1), min(head, self.kind.shape[1] - 1)].cpu()
            axes[0, 1].imshow(dense.float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            axes[0, 1].set_title("kept pairs")
            axes[0, 1].set_xlabel("key")
            axes[0, 1].set_ylabel("query")
        fig.suptitle(repr(self.pattern)[:100])
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def __repr__(self) -> str:
        counts = [int((self.kind == k).sum()) for k in (FULL, PARTIAL)]
        return (f"BlockMask({self.pattern!r}, seq_q={self.seq_q}, seq_kv={self.seq_kv}, "
                f"blocks={self.block_q}x{self.block_kv}, full={counts[0]}, partial={counts[1]}, "
                f"block_density={self.block_density():.3f})")

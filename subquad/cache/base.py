"""The shared part of every KV cache: per-sequence lengths, argument checks, memory accounting.

Eager updates keep a host copy of the lengths, so that checks and bookkeeping never wait on the device.
Traced updates (``torch.compile``: a compiled decoding step) cannot: a host value read inside a compiled
function is a constant that changes every step (a recompile per token). They append at the device lengths
instead, unchecked, and leave the host copy stale; the next eager use reads it back once.
"""

from __future__ import annotations

import torch

from .view import KVView


def check_sizes(**sizes) -> None:
    """Each size a positive int, named in the ValueError."""
    for name, val in sizes.items():
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")


def write_rows(buf: torch.Tensor, rows: torch.Tensor | None, start: int, new: torch.Tensor) -> None:
    """``buf[b, rows[b, t]] = new[b, t]``; without ``rows`` (every sequence starts at ``start``) a plain slice."""
    if rows is None:
        buf[:, start:start + new.shape[1]] = new
        return
    bidx = torch.arange(buf.shape[0], device=buf.device).view(-1, 1).expand_as(rows)
    buf[bidx, rows] = new


def write_pages(pool: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """``new[b, t]`` to position ``rows[b, t]`` of sequence ``b`` in a paged ``pool`` ``(pages, page_size, ...)``:
    page ``block_table[b, row // page_size]``, offset ``row % page_size``."""
    page_size = pool.shape[1]
    pool[block_table.long().gather(1, rows // page_size), rows % page_size] = new


class KVCache:
    """Base class: subclasses allocate storage in ``__init__`` and implement ``update``, ``view`` and
    ``buffers``."""

    batch: int
    heads_kv: int
    head_dim: int
    head_dim_v: int

    def _init_lengths(self, batch: int, device) -> None:
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self._host_lengths = [0] * batch
        self._host_stale = False

    @property
    def _lengths(self) -> list[int]:
        """The lengths on the host, read back once after traced updates."""
        if self._host_stale:
            self._sync_host()
        return self._host_lengths

    def _sync_host(self) -> None:
        self._host_lengths = [int(n) for n in self.seqlens.tolist()]
        self._host_stale = False

    def _set_lengths(self, lengths: list[int]) -> None:
        self._host_lengths = list(lengths)
        self._host_stale = False
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=True)

    def _traced_rows(self, t: int, positions) -> torch.Tensor:
        """A traced update's ``(batch, t)`` int64 positions (from ``positions``, else appended at the device
        lengths); the lengths become their ends. Unchecked: no host read is possible."""
        if positions is None:
            start = self.seqlens.long()
        elif isinstance(positions, int) and not isinstance(positions, bool):
            start = torch.full((self.batch,), positions, dtype=torch.long, device=self.seqlens.device)
        elif isinstance(positions, torch.Tensor) and positions.shape == (self.batch,) \
                and not positions.dtype.is_floating_point and positions.dtype != torch.bool:
            start = positions.to(device=self.seqlens.device, dtype=torch.long)
        else:
            raise self._bad_positions(positions)
        rows = start.view(-1, 1) + torch.arange(t, device=start.device)
        self.seqlens.copy_(rows[:, -1] + 1)
        self._host_stale = True
        return rows

    def _pin_addresses(self) -> None:
        """Tell ``torch.compile`` that the storage never moves: a compiled step captured in a CUDA graph
        (``mode="reduce-overhead"``) then writes it in place rather than copying it in and out each call."""
        for t in (*self.buffers(), self.seqlens):
            torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        """Forget every sequence (storage is kept; lengths go back to 0)."""
        self._set_lengths([0] * self.batch)

    def rewind(self, positions) -> None:
        """Forget each sequence's tokens from ``positions`` on (an int, or ``(batch,)`` ints, each at most its
        length): the lengths go back to ``positions`` and the next update appends there, over the forgotten
        tokens, as ``update(positions=...)`` would. For a model, whose layers append at their caches' lengths:
        speculative decoding drops its rejected draft tokens this way. Eager only."""
        if positions is None:     # (``_start_positions`` reads None as "append": no rewind at all)
            raise self._bad_positions(positions)
        self._set_lengths(self._start_positions(positions))

    def buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the cache holds (storage plus bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in self.buffers()) + \
            self.seqlens.numel() * self.seqlens.element_size()

    def _check_shapes(self, k: torch.Tensor, v: torch.Tensor, device) -> None:
        b = self.batch
        for name, t, dim in (("k", k, self.head_dim), ("v", v, self.head_dim_v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != b or t.shape[2] != self.heads_kv \
                    or t.shape[3] != dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({b}, new_tokens, {self.heads_kv}, {dim}), got {shape}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name}: expected a floating-point dtype (cast to the cache's), got {t.dtype}")
        if k.shape[1] != v.shape[1] or k.shape[1] == 0:
            raise ValueError(f"k, v: expected the same non-zero number of new tokens, got {k.shape[1]} and {v.shape[1]}")
        if k.device != device or v.device != device:
            raise ValueError(f"k, v: expected device {device}, got {k.device} and {v.device}")

    def _check_update(self, k: torch.Tensor, v: torch.Tensor, positions, device) -> list[int]:
        """Validate ``update``'s arguments; return the start position of each sequence's new tokens."""
        self._check_shapes(k, v, device)
        return self._start_positions(positions)

    def _start_positions(self, positions) -> list[int]:
        if positions is None:
            return list(self._lengths)
        if isinstance(positions, int) and not isinstance(positions, bool):
            starts = [positions] * self.batch
        elif isinstance(positions, torch.Tensor) and positions.shape == (self.batch,) \
                and not positions.dtype.is_floating_point and positions.dtype != torch.bool:
            starts = [int(p) for p in positions.tolist()]
        else:
            raise self._bad_positions(positions)
        if any(p < 0 or p > n for p, n in zip(starts, self._lengths)):
            raise ValueError("positions: expected 0 <= positions <= seqlens (append, or rewrite the tail after "
                             f"rejected draft tokens), got {starts} with seqlens {self._lengths}")
        return starts

    def _start_rows(self, starts: list[int], t: int, device) -> torch.Tensor | None:
        """An eager update's ``(batch, t)`` positions for ``write_rows``: None when every sequence starts at
        ``starts[0]`` (a plain slice)."""
        if len(set(starts)) == 1:
            return None
        return torch.tensor(starts, device=device).view(-1, 1) + torch.arange(t, device=device)

    def _bad_positions(self, positions) -> ValueError:
        got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) \
            else type(positions).__name__
        return ValueError(f"positions: expected an int or an integer (not bool) tensor of shape ({self.batch},), got "
                          f"{got}")

    def update(self, k: torch.Tensor, v: torch.Tensor, positions=None) -> KVView:
        raise NotImplementedError

    def view(self) -> KVView:
        raise NotImplementedError

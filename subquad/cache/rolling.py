"""Rolling-window KV cache (Mistral): a ring of slots, so memory stays O(window) however long the stream.

Slot ``s`` holds the token at absolute position ``p`` with ``p % slots == s``: for a sequence of length
``L``, slot ``s`` holds position ``L - 1 - ((L - 1 - s) mod slots)`` when that is ``>= max(0, L - slots)``.
With ``slots = window + max_step - 1``, every one of ``T <= max_step`` new queries (positions
``L - T .. L - 1``) finds its ``window`` most recent keys still in the ring, so sliding-window attention over
the ring is exact; the decode kernel reads the ring in place and derives positions as above.
"""

from __future__ import annotations

import torch

from .base import KVCache, check_sizes, write_rows
from .view import KVView


class RollingKVCache(KVCache):
    """Ring buffer for sliding-window attention over ``window`` keys.

    Args:
        window: the attention window (keys a query sees, itself included).
        max_step: the most new tokens one decode step appends (1; up to 16 for speculative decoding).
            Larger updates (prefill) are accepted too: they return a dense view of the kept tail plus the
            new tokens, and the ring keeps the last ``slots`` of them.
    """

    def __init__(self, batch: int, window: int, heads_kv: int, head_dim: int, dtype=torch.bfloat16, device=None,
                 max_step: int = 1, head_dim_v: int | None = None):
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        check_sizes(batch=batch, window=window, heads_kv=heads_kv, head_dim=head_dim, max_step=max_step,
                    head_dim_v=head_dim_v)
        self.batch, self.window, self.heads_kv, self.head_dim = batch, window, heads_kv, head_dim
        self.max_step = max_step
        self.slots = window + max_step - 1
        self.head_dim_v = head_dim_v
        self.k = torch.zeros(batch, self.slots, heads_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, self.slots, heads_kv, self.head_dim_v, dtype=dtype, device=device)
        self._init_lengths(batch, self.k.device)
        # one past the last position written, per sequence: after a rewind the slots of the rejected drafts
        # (positions from the new length on) no longer hold the older tokens that share them. On the host for
        # eager updates, on the device for traced ones (as the lengths)
        self._host_written = [0] * batch
        self.written = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self._pin_addresses()

    def reset(self) -> None:
        super().reset()
        self._set_written([0] * self.batch)

    @property
    def _written(self) -> list[int]:
        if self._host_stale:
            self._sync_host()
        return self._host_written

    def _set_written(self, written: list[int]) -> None:
        self._host_written = written
        self.written.copy_(torch.tensor(written, dtype=torch.int32), non_blocking=True)

    def _sync_host(self) -> None:
        super()._sync_host()
        self._host_written = [int(w) for w in self.written.tolist()]

    def buffers(self):
        return [self.k, self.v, self.written]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions=None) -> KVView:
        """Write ``k``/``v`` ``(batch, T, heads_kv, head_dim)`` at positions ``positions ... positions+T-1``
        (default: append; at most ``max_step - 1`` tokens back, rewriting rejected drafts, and at most
        ``max_step`` behind the furthest token written). Traced
        (``torch.compile``): decoding steps of at most ``max_step`` tokens, the rewind unchecked."""
        if torch.compiler.is_compiling():
            return self._traced_update(k, v, positions)
        starts = self._check_update(k, v, positions, self.k.device)
        t = k.shape[1]
        self._check_ring_reach(starts)
        dense = None
        if t > self.max_step:
            dense = self._prefill_view(k, v, starts)
        # Only the last `slots` new tokens survive in the ring; earlier ones would be overwritten anyway.
        keep = min(t, self.slots)
        dev = self.k.device
        pos = torch.tensor(starts, device=dev).view(-1, 1) + torch.arange(t - keep, t, device=dev)
        write_rows(self.k, pos % self.slots, 0, k[:, t - keep:].to(self.k.dtype))
        write_rows(self.v, pos % self.slots, 0, v[:, t - keep:].to(self.v.dtype))
        self._set_written([max(w, s + t) for w, s in zip(self._written, starts)])
        self._set_lengths([s + t for s in starts])
        return dense if dense is not None else self.view()

    def rewind(self, positions) -> None:
        """``KVCache.rewind``, as far back as ``update`` can write: at most ``max_step - 1`` tokens, and at most
        ``max_step`` behind the furthest token written."""
        if positions is not None:
            self._check_ring_reach(self._start_positions(positions))
        super().rewind(positions)

    def _check_ring_reach(self, starts: list[int]) -> None:
        """Refuse writes at ``starts`` whose window the ring no longer holds."""
        for s, n, w in zip(starts, self._lengths, self._written):
            if n - s > self.max_step - 1:
                raise ValueError(f"positions: a ring of window {self.window} and max_step {self.max_step} can "
                                 f"rewind at most {self.max_step - 1} tokens, got {n - s}")
            if w - s > self.max_step:
                # rewinds in a row: the rejected drafts from s + max_step on overwrote keys that the window of
                # the token at s still sees
                raise ValueError(f"positions: a ring of window {self.window} and max_step {self.max_step} keeps "
                                 f"the keys of at most {self.max_step} tokens behind the furthest one written "
                                 f"({w}), got {s}")

    def _traced_update(self, k, v, positions) -> KVView:
        self._check_shapes(k, v, self.k.device)
        if k.shape[1] > self.max_step:
            raise ValueError(f"k: a traced update of a ring takes at most max_step={self.max_step} new tokens, got "
                             f"{k.shape[1]} (run the prefill eagerly)")
        slots = self._traced_rows(k.shape[1], positions) % self.slots
        write_rows(self.k, slots, 0, k.to(self.k.dtype))
        write_rows(self.v, slots, 0, v.to(self.v.dtype))
        torch.maximum(self.written, self.seqlens, out=self.written)
        return self.view()

    def _prefill_view(self, k, v, starts) -> KVView:
        """Dense view for more new tokens than the ring serves: the ``window - 1`` most recent kept tokens,
        then the new ones (positions are relative to the view's first token; only differences matter)."""
        self._set_lengths(starts)  # the ring as it was before this update
        old_k, old_v, old_n = self.view().dense()
        tail = [min(s, self.window - 1) for s in starts]
        t = k.shape[1]
        n = max(tail) + t
        out_k = k.new_zeros(self.batch, n, self.heads_kv, self.head_dim, dtype=self.k.dtype)
        out_v = v.new_zeros(self.batch, n, self.heads_kv, self.head_dim_v, dtype=self.v.dtype)
        old = [int(x) for x in old_n.tolist()]
        for b, keep in enumerate(tail):
            out_k[b, :keep] = old_k[b, old[b] - keep:old[b]]
            out_v[b, :keep] = old_v[b, old[b] - keep:old[b]]
            out_k[b, keep:keep + t] = k[b]
            out_v[b, keep:keep + t] = v[b]
        lengths = torch.tensor([keep + t for keep in tail], dtype=torch.int32, device=self.k.device)
        return KVView(out_k, out_v, lengths, "dense", window=self.window, max_seqlen=n)

    def view(self) -> KVView:
        if torch.compiler.is_compiling():
            # (the default min(seqlens, slots) unless a rewind left rejected drafts in slots)
            kept = torch.minimum(self.seqlens, self.slots - (self.written - self.seqlens))
            return KVView(self.k, self.v, self.seqlens, "ring", window=self.window, kept=kept)
        kept = None
        if any(w > n for w, n in zip(self._written, self._lengths)):
            kept = torch.tensor([min(n, self.slots - (w - n)) for w, n in zip(self._written, self._lengths)],
                                dtype=torch.int32).to(self.k.device, non_blocking=True)
        return KVView(self.k, self.v, self.seqlens, "ring", window=self.window, max_seqlen=max(self._lengths),
                      kept=kept)

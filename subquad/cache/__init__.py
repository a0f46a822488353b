"""KV caches for generation, one contract for every layout.

Every cache holds per-sequence lengths and is used the same way at each step::

    view = cache.update(k_new, v_new)          # (batch, T, heads_kv, head_dim) each; appends T tokens
    o = subquad.decode(q_new, view)            # (batch, T, heads_q, head_dim), T <= 16, causal in the T
    k, v, lengths = view.dense()               # or plain tensors in position order (prefill, references)

* ``update(k, v, positions=None) -> KVView``: writes the new tokens of each sequence at ``positions``
  (``(batch,)`` ints, default: each sequence's current length, i.e. append; a smaller value rewrites the
  tail, e.g. after rejected speculative tokens) and returns what the new queries attend over. The view
  aliases the cache's storage and is valid until the next update.
* ``.seqlens``: ``(batch,)`` int32 on the cache's device, tokens per sequence including the new ones.
  The ``T`` new queries sit at positions ``seqlens - T .. seqlens - 1``.
* ``reset()``: every length back to 0 (paged: every page back to the pool).
* ``rewind(positions)``: the lengths back to ``positions`` (as far as ``update`` could write), so that the next
  update appends over the tokens dropped: how a model, whose layers append, drops rejected draft tokens.
* ``.nbytes``: device memory held.

Layouts (``KVView.layout``):

* ``StaticKVCache(batch, max_len, heads_kv, head_dim, dtype, device)``: dense ``(B, max_len, H, D)``.
* ``RollingKVCache(batch, window, heads_kv, head_dim, dtype, device, max_step=1)``: a ring of
  ``window + max_step - 1`` slots, memory O(window); position ``p`` lives in slot ``p % slots`` (see
  ``rolling.py`` for why sliding-window attention over the ring is exact).
* ``PagedKVCache(num_pages, page_size, heads_kv, head_dim, dtype, device, batch=...)``: a shared pool of
  pages plus a ``(batch, max_pages)`` block table; ``free(seq)`` returns a sequence's pages.
* ``LatentKVCache(batch, max_len, kv_lora_rank, rope_dim, dtype, device)``: MLA's ``[c_kv, k_rope]`` rows;
  ``update(c_kv, k_rope)``; its view is one KV head with K the whole row and V its first ``kv_lora_rank``
  columns.
"""

from .base import KVCache
from .latent import LatentKVCache
from .paged import PagedKVCache
from .rolling import RollingKVCache
from .static import StaticKVCache
from .view import LAYOUTS, KVView

__all__ = ["KVCache", "KVView", "LAYOUTS", "StaticKVCache", "RollingKVCache", "PagedKVCache", "LatentKVCache"]

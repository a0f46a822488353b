"""A HybridLM's caches that can go back to an earlier length, as speculative decoding needs after rejected drafts.

A model's layers append to their caches at the caches' own lengths, so going back depends on the cache:

* KV caches (``A``, ``G``, ``L``, ``D``, ``K``, ``S``: static, rolling, latent and NSA caches): ``KVCache.rewind``
  sets the lengths back and the next step writes over the dropped tokens. A ring (``L``; ``A`` or ``D`` with a
  window) reaches back ``max_step - 1`` tokens, so the caches are made for steps of ``max_step`` tokens.
* Recurrent states (``M``, ``E``, ``R``, ``N``, ``Y``, ``F``): a state has folded every token in and cannot drop
  the last few. ``checkpoint`` clones each state (as many bytes as one decoding step reads, little beside a
  forward), the forwards after it keep each recurrent mixer's input, and ``rewind`` puts the clone back and runs
  those mixers alone over the kept tokens' inputs. Every layer is causal, so those inputs are what the kept tokens
  would have had without the dropped ones after them; nothing else runs again. (Keeping the state after every
  token would spare the re-run, but the chunked kernels that score several tokens at once return only the last.)
* ``H`` (LSH attention) is refused: which keys share a query's chunk depends on every token hashed with it, the
  later tokens of the same step included, so one forward over several tokens does not give what one token at a
  time gives, and speculative decoding scores its drafts in one forward.
"""

from __future__ import annotations

import functools

import torch

from ..cache import KVCache
from ..nn.state import RecurrentState

#: the layer letters whose caches go back (see the module's docstring)
REWINDABLE = "AGLDKSMERNYF"


def check_rewindable(model, name: str) -> None:
    """Refuse a ``model`` with a layer whose cache cannot go back, the ValueError naming argument ``name``."""
    refused = sorted(set(model.layer_letters) - set(REWINDABLE))
    if refused:
        raise ValueError(f"{name}: expected layers whose caches can be rewound (letters {REWINDABLE}), got layers "
                         f"{model.layer_letters!r} with {''.join(refused)}")


class RewindableCaches:
    """``model``'s caches for ``batch`` sequences of up to ``max_len`` tokens, all of one length, fed in steps of
    up to ``max_step`` tokens (prefills of any length), which can go back to any length since the last
    ``checkpoint``::

        caches = RewindableCaches(model, batch, max_len, max_step)
        caches.checkpoint()
        logits = caches.forward(ids)        # model(ids, caches.caches), keeping what a rewind needs
        caches.rewind(caches.length - 2)    # forget the last two tokens
    """

    def __init__(self, model, batch: int, max_len: int, max_step: int, name: str = "model"):
        check_rewindable(model, name)
        self.model = model
        self.caches = model.new_caches(batch, max_len, max_step=max_step)
        self._recurrent = [(blk.mixer, cache) for blk, cache in zip(model.blocks, self.caches)
                           if isinstance(cache, RecurrentState)]
        self.length = 0
        self.checkpoint()

    def checkpoint(self) -> None:
        """Make the current length the earliest that ``rewind`` goes back to."""
        self._mark = self.length
        self._saved = [_clone((cache.state, cache.conv, cache.position)) for _, cache in self._recurrent]
        self._inputs = [[] for _ in self._recurrent]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``model(ids, caches)``: the logits of ``ids`` ``(batch, T)`` after the tokens so far."""
        hooks = [mixer.register_forward_pre_hook(functools.partial(self._keep_input, i))
                 for i, (mixer, _) in enumerate(self._recurrent)]
        try:
            logits = self.model(ids, self.caches)
        finally:
            for hook in hooks:
                hook.remove()
        self.length += ids.shape[1]
        return logits

    def _keep_input(self, i: int, mixer, args) -> None:
        self._inputs[i].append(args[0])

    def rewind(self, length: int) -> None:
        """Forget the tokens from ``length`` on (between the last checkpoint's length and the current one)."""
        if not self._mark <= length <= self.length:
            raise ValueError(f"length: expected a length in [{self._mark}, {self.length}] (from the last "
                             f"checkpoint to now), got {length}")
        if length == self.length:
            return
        for cache in self.caches:
            if isinstance(cache, KVCache):
                cache.rewind(length)
        keep = length - self._mark
        for i, ((mixer, cache), saved) in enumerate(zip(self._recurrent, self._saved)):
            # (a clone again: a kernel may update its state in place, and the checkpoint serves later rewinds)
            cache.state, cache.conv, cache.position = _clone(saved)
            kept = torch.cat(self._inputs[i], 1)[:, :keep]
            self._inputs[i] = [kept]
            if keep:
                mixer(kept, cache)
        self.length = length


def _clone(x):
    """A copy of a recurrent cache's fields: tensors cloned, tuples of them (linear attention's ``(S, z)``) too."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(t) for t in x)
    return x

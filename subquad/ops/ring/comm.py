"""Passing tensors one step around the ring of a process group, asynchronously.

Each rank sends to the next rank and receives from the previous one in one ``batch_isend_irecv``, so that a
transfer runs while the current block is being computed. Sends and receives are posted together on every
rank, which keeps the ring free of the deadlock that blocking sends in one order would risk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ring:
    """A process group seen as a ring: ``rank`` sends to ``rank + 1`` and receives from ``rank - 1``."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # (P2P ops name peers by their rank in the default group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def pass_on(self, *tensors: torch.Tensor) -> "Transfer":
        """Starts sending ``tensors`` to the next rank and receiving their like from the previous one (a ring of
        one rank passes them to itself: no transfer)."""
        if self.world == 1:
            return Transfer([], None, list(tensors))
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return Transfer(dist.batch_isend_irecv(ops), sent, received)


class Transfer:
    """A transfer under way; ``wait()`` returns the received tensors. Holds the sent ones until then, so that
    their memory is not reused while a send reads it."""

    def __init__(self, works, sent, received):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._sent = None
        return self._received

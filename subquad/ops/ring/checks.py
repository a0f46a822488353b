"""Checks shared by the multi-device ops: the process group, and the comparison of the ranks' inputs that makes
every rank raise the same ValueError (a rank that went on alone would wait forever in a collective)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .comm import Ring

#: the dtypes whose shards can meet in one group, numbered for the ranks' comparison of their inputs
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
#: the dimensions of a tensor's shape that the ranks compare (the ops' tensors have at most four)
_DIMS = 4


def ring_of(group) -> Ring:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group first), got none")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        # new_group returns this marker, not a group, on the ranks it leaves out
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("group: expected a process group that this rank belongs to, got "
                             "GroupMember.NON_GROUP_MEMBER (new_group's value on the ranks it leaves out)")
        raise ValueError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return Ring(dist.group.WORLD if group is None else group)


def _shape_facts(t) -> list[int]:
    """A tensor's dimension count and shape padded to ``_DIMS`` entries; ``-1`` for None (or not a tensor)."""
    if not isinstance(t, torch.Tensor) or t.dim() > _DIMS:
        return [-1] + [0] * _DIMS
    return [t.dim()] + list(t.shape) + [0] * (_DIMS - t.dim())


def _shown(facts: list[int]):
    return None if facts[0] < 0 else tuple(facts[1:1 + facts[0]])


def check_across_ranks(ring: Ring, problem: ValueError | None, options: dict | None = None, **tensors) -> None:
    """Every rank raises when any rank's input is wrong, and the named tensors (None allowed) must be alike on
    every rank: one shape each (equal shards of one sequence), the first one's dtype, and whether any of them
    wants a gradient (the backward is a collective: a rank that had none to run left the others waiting in it).
    ``options``: the call's other arguments by name, equal on every rank (a rank with another ``causal`` or
    ``scale`` gave a silently wrong result)."""
    first = next(iter(tensors.values()))
    wants_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                 for t in tensors.values())
    options = options or {}
    facts = [int(problem is not None), _DTYPE_CODES.get(getattr(first, "dtype", None), 0), int(wants_grad),
             zlib.crc32(repr(sorted(options.items())).encode())]
    facts += sum((_shape_facts(t) for t in tensors.values()), [])
    facts = torch.tensor(facts, dtype=torch.int64, device=first.device if isinstance(first, torch.Tensor) else "cpu")
    gathered = [torch.empty_like(facts) for _ in range(ring.world)]
    dist.all_gather(gathered, facts, group=ring.group)
    if problem is not None:
        raise problem
    gathered = [g.tolist() for g in gathered]
    names = list(tensors)
    for rank, other in enumerate(gathered):
        if other[0]:
            raise ValueError(f"{', '.join(names)}: rank {rank} of the group was given input it rejects (its "
                             f"ValueError says why)")
    mine = gathered[ring.rank]
    for rank, other in enumerate(gathered):
        if other[2] != mine[2]:
            raise ValueError(f"{', '.join(names)}: expected gradients wanted on every rank or on none (its backward "
                             f"is a collective), got requires_grad {bool(mine[2])} on rank {ring.rank} and "
                             f"{bool(other[2])} on rank {rank}")
        if other[3] != mine[3]:
            raise ValueError(f"{', '.join(options)}: expected the same on every rank, got {options} on rank "
                             f"{ring.rank} and others on rank {rank}")
        for i, name in enumerate(names):
            at = slice(4 + i * (1 + _DIMS), 4 + (i + 1) * (1 + _DIMS))
            if other[at] != mine[at]:
                raise ValueError(f"{name}: expected the same shape on every rank (equal shards of one sequence), "
                                 f"got {_shown(mine[at])} on rank {ring.rank} and {_shown(other[at])} on rank "
                                 f"{rank}")
        if other[1] != mine[1]:
            raise ValueError(f"{names[0]}: expected one dtype on every rank, got {first.dtype} on rank {ring.rank} "
                             f"and another on rank {rank}")

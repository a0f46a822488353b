"""Spawned gloo ranks on the CPU, for the tests of ops that shard one sequence over a process group: each rank runs
a test module's function of ``(rank, world)`` and saves what it returns; the parent loads every rank's result,
once per function and world size (spawning four ranks that import torch takes ~20 s on two cores)."""

from __future__ import annotations

import datetime
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_entry(rank: int, world: int, init_file: str, out_dir: str, body: Callable[[int, int], dict],
                backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # a collective one rank never joins fails after the timeout instead of hanging the suite
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.save(body(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    # every rank has saved: leave without tearing the group down. A CI run (two busy cores) once lost a rank to
    # SIGABRT, "terminate called without an active exception", a gloo thread destroyed while joinable at exit,
    # after the work was done; the process's exit closes its sockets all the same
    dist.barrier()
    os._exit(0)


_RUNS: dict[tuple, list[dict]] = {}


def run_ranks(body: Callable[[int, int], dict], world: int, tmp_path_factory, backend: str = "gloo") -> list[dict]:
    """What ``body(rank, world)`` returned on each of ``world`` spawned ranks (``body``: a module-level function,
    which the spawned processes import by name; it returns CPU tensors). ``backend="nccl"``: rank ``r`` on GPU
    ``r``."""
    key = (body.__module__, body.__qualname__, world, backend)
    if key not in _RUNS:
        d = tmp_path_factory.mktemp(f"{body.__name__.strip('_')}{world}")
        mp.spawn(_rank_entry, args=(world, str(d / "init"), str(d), body, backend), nprocs=world, join=True)
        _RUNS[key] = [torch.load(d / f"rank{r}.pt") for r in range(world)]
    return _RUNS[key]


def value_errors(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """The message of the ValueError each call raises (on this rank), by name; calls that raise none are left out."""
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
    return messages


def assert_gathered(expected: dict, gather: Callable[[str], torch.Tensor | None], tol: float, label: str) -> None:
    """Each ``expected[key]`` (None: the op gives no gradient there) against ``gather(key)``, the ranks' values put
    together for the whole sequence, compared in the expected value's dtype."""
    for key, want in expected.items():
        got = gather(key)
        if want is None:
            assert got is None, f"{label}, {key}: a gradient where the op has none"
            continue
        torch.testing.assert_close(got.to(want.dtype), want, atol=tol, rtol=tol,
                                   msg=lambda m: f"{label}, {key}: {m}")

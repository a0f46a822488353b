"""Autotuning spaces of the chunk kernels: a few tile / warp / pipeline-depth choices each (the first call per
shape key benchmarks them). The interpreter gets the first choice only (it would time every one on the CPU), and
so does ``SUBQUAD_LINEAR_AUTOTUNE=0`` (GPU test runs: every test shape would be tuned anew)."""

from __future__ import annotations

import os

import triton

from ..grid import interpreting


def configs(space: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """space: (meta-parameters, num_warps, num_stages) triples."""
    cfgs = [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in space]
    first_only = interpreting() or os.environ.get("SUBQUAD_LINEAR_AUTOTUNE") == "0"
    return cfgs[:1] if first_only else cfgs


# BV = 128: with a decay per key dimension each V block reloads the chunk's fp32 decays (twice k's bytes)
STATE = configs([({"BV": 32}, 4, 2), ({"BV": 64}, 4, 2), ({"BV": 64}, 4, 3), ({"BV": 64}, 8, 2), ({"BV": 32}, 2, 3),
                 ({"BV": 128}, 8, 2)])
TILES = configs([({"BK": 64, "BV": 64}, 4, 2), ({"BK": 64, "BV": 64}, 4, 3), ({"BK": 64, "BV": 128}, 8, 2),
                 ({"BK": 128, "BV": 64}, 8, 2), ({"BK": 128, "BV": 128}, 8, 2)])
# the fused forward's programs are as few as the state pass's: narrower V tiles give more of them
FUSED = configs([({"BV": 64}, 4, 2), ({"BV": 64}, 8, 2), ({"BV": 64}, 4, 3), ({"BV": 32}, 4, 2), ({"BV": 32}, 4, 3),
                 ({"BV": 128}, 8, 2)])
COLUMNS = configs([({"BV": 64}, 4, 2), ({"BV": 64}, 4, 3), ({"BV": 128}, 8, 2), ({"BV": 32}, 4, 3)])
INTRA = configs([({}, 4, 1), ({}, 8, 1), ({}, 2, 1)])
WY = configs([({}, 4, 1), ({}, 8, 1), ({}, 2, 1), ({}, 4, 2)])
# the WY forward also chooses whether a chunk's k and v are held whole (wy_fwd's HOLD), where they are at most
# 128 wide (``hold_at_most_128``)
WY_FWD = configs([({"HOLD": False}, 4, 1), ({"HOLD": False}, 8, 1), ({"HOLD": False}, 2, 1),
                  ({"HOLD": False}, 4, 2), ({"HOLD": True}, 4, 1), ({"HOLD": True}, 8, 1)])


def hold_at_most_128(configs, named_args, **meta):
    """Autotuning prune: a chunk's k and v are held whole only up to 128 wide (64 x 256 tiles would spill)."""
    if max(meta.get("K", named_args.get("K", 0)), meta.get("V", named_args.get("V", 0))) <= 128:
        return configs
    return [c for c in configs if not c.kwargs.get("HOLD")] or configs[:1]

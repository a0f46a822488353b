"""The flash kernels' in-kernel mask terms (under TRITON_INTERPRET=1 on CPU, natively on a GPU): global tokens and
block layouts evaluated in the kernels, not by a bitmask, and a layout left to the BlockMask's lists where its
cells hold whole blocks; outputs, LSE and gradients against the reference."""

from __future__ import annotations

import pytest
import torch

from subquad import masks
from test_flash import BLOCK, DEV, _check, _qkv, _uses_terms, pytestmark  # noqa: F401  (the same skip)


# (mask, causal, seq_q, seq_kv, heads_q, heads_kv, deterministic); global tokens contiguous (comparisons) or
# scattered (flags), lengths not multiples of the block, GQA, fewer queries than keys, the dQ programs
GLOBAL_CASES = {
    "longformer_run": (lambda: masks.longformer(12, list(range(5))), False, 90, 90, 2, 2, False),
    "longformer_run_causal_gqa": (lambda: masks.longformer(16, [0, 1, 2]), True, 75, 75, 4, 2, True),
    "longformer_scattered": (lambda: masks.longformer(10, [0, 37, 61]), False, 83, 83, 2, 1, False),
    "longformer_scattered_causal": (lambda: masks.longformer(14, [4, 40], causal=True), False, 50, 77, 2, 2, False),
    "bigbird_run": (lambda: masks.bigbird(12, [0, 1], random_blocks=2, block=16), False, 90, 90, 2, 2, False),
    "bigbird_scattered_causal_gqa": (lambda: masks.bigbird(10, [2, 50], random_blocks=1, block=16, seed=3,
                                                           causal=True), False, 70, 70, 4, 2, True),
    "block_sparse_per_head": (lambda: masks.block_sparse(
        torch.rand(4, 5, 5, generator=torch.Generator().manual_seed(6)) < 0.4, 16), False, 72, 72, 4, 2, False),
}


@pytest.mark.parametrize("name", list(GLOBAL_CASES))
def test_global_token_terms(name):
    """Longformer / BigBird / block layouts through the in-kernel terms (no bitmask): out, lse, dq/dk/dv."""
    make, causal, nq, nkv, hq, hkv, det = GLOBAL_CASES[name]
    mask = make()
    _check(*_qkv(1, nq, nkv, hq, hkv, 32, torch.bfloat16, seed=7), mask=mask, causal=causal, deterministic=det,
           plan=False)
    _uses_terms(mask, causal, 1, hq, nq, nkv)


def _cells(n, cell, seed):
    cells = -(-n // cell)
    return torch.rand(cells, cells, generator=torch.Generator().manual_seed(seed)) < 0.5


# (mask, causal, seq_q, seq_kv, whether the kernels leave the layout to the BlockMask's lists)
_N = 5 * BLOCK - 7
LAYOUT_CASES = {
    "block_sparse": (lambda: masks.block_sparse(_cells(_N, 2 * BLOCK, 1), 2 * BLOCK), False, _N, _N, True),
    "bigbird": (lambda: masks.bigbird(12, [0], random_blocks=1, block=BLOCK), False, _N, _N, False),
    "block_sparse_causal": (lambda: masks.block_sparse(_cells(_N, 2 * BLOCK, 1), 2 * BLOCK), True, _N, _N, False),
    "cells_smaller_than_blocks": (lambda: masks.block_sparse(_cells(_N, BLOCK // 2, 2), BLOCK // 2), False, _N, _N,
                                  False),
    "queries_off_the_cells": (lambda: masks.block_sparse(_cells(_N, 2 * BLOCK, 3), 2 * BLOCK), False, _N - 10, _N,
                              False),
}


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_layout_term_left_to_the_lists(name):
    """A block layout alone whose cells hold whole BlockMask blocks has only full blocks: the kernels drop the
    layout term (block-sparse is then a plain list walk, its last tile masked by the lengths) and still match the
    reference in out, lse and gradients, at a length that is not a multiple of the block. Other terms OR-ed in
    (BigBird), causal, or cells smaller than or misaligned with the blocks keep it (dropped there, the causal
    case's diagonal blocks would lose their pairs)."""
    from subquad.ops.softmax.flash import _block_mask_args

    make, causal, nq, nkv, dropped = LAYOUT_CASES[name]
    mask = make()
    _check(*_qkv(1, nq, nkv, 2, 1, 32, torch.bfloat16, seed=9), mask=mask, causal=causal, plan=False)
    bm = masks.resolve(mask, causal=causal, batch=1, heads=2, seq_q=nq, seq_kv=nkv, device=DEV, block_q=BLOCK,
                       block_kv=BLOCK)
    assert (_block_mask_args(bm, None, None).layout is None) == dropped

"""Patterns suite (GPU): scattered-key patterns through the planner, beside the plain BlockMask path and
FlexAttention with the same masks, in one run.

Strided (causal; local 256 and every 256th key), fixed (block 128, summary 8), dilated (window 4096,
dilation 4), Longformer (window 512, 16 global tokens) and BigBird (window 512, 16 global tokens, 3 random
blocks of 64) at N = 16k (batch 2) and 64k (batch 1), 16 heads, D = 128, bf16, fwd and fwd+bwd. FLOPs count
the kept pairs only (effective TFLOP/s), exactly, from the plan.

Impls: ``subquad-planned`` (the Triton kernels as ``subquad.attention`` runs them by default: the planner where it
plans, the pattern's BlockMask where it does not: Longformer's and BigBird's leading global tokens stay in-kernel
terms), ``subquad-blockmask`` (``plan=False``: the pattern's BlockMask through the same kernel; 16k only),
``subquad-blockmask128`` (Longformer and BigBird: their BlockMask at 128 x 128 blocks, where the engine chooses
64 x 64 for them: what the choice gains),
``flex-triton`` and, where flash-attn-4 is installed, ``flex-flash`` (FlexAttention's two backends). The subquad
rows pin ``backend="triton"``: under ``"auto"`` the measured dispatch table sends Longformer and BigBird to FA4 or
FlexAttention, and the rows would time a peer under subquad's name (the backends suite measures ``auto``).
"""

from __future__ import annotations

import importlib.util

import torch

from ... import attention, masks
from ...masks.plan import plan as make_plan
from .. import peers
from ..attention_cases import exact_rows, qkv_inputs, sample_rows
from ..harness import Case, attention_flops, suite

GLOBAL = list(range(16))


def _patterns():
    """name -> (pattern, FlexAttention mask_mod for the same pairs)."""

    def strided(b, h, q, k):
        return (q >= k) & ((q - k < 256) | (k % 256 == 255))

    def fixed(b, h, q, k):
        return (q >= k) & ((q // 128 == k // 128) | (k % 128 >= 120))

    def dilated(b, h, q, k):
        return (q >= k) & (q - k < 4096) & ((q - k) % 4 == 0)

    def longformer(b, h, q, k):
        return ((q - k).abs() <= 256) | (k < 16) | (q < 16)

    return {
        "strided256": (masks.strided(256), strided),
        "fixed128x8": (masks.fixed(128, 8), fixed),
        "dilated4096x4": (masks.dilated(4096, 4), dilated),
        "longformer512+16": (masks.longformer(512, GLOBAL), longformer),
        "bigbird512+16+3x64": (masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0), None),
    }


def _bigbird_mask_mod(pattern, n, device):
    """BigBird's random layout, read from the prepared pattern, as a FlexAttention mask_mod."""
    from ...masks.composition import Union
    from ...masks.patterns import BlockLayout, BuildContext
    from ...masks.plan import _terms

    prepared = pattern.prepare(BuildContext(1, 1, n, n, torch.device(device)))
    layout = next(t for t in _terms(prepared, Union) if isinstance(t, BlockLayout)).layout[0, 0].to(device)

    def mod(b, h, q, k):
        return ((q - k).abs() <= 256) | (k < 16) | (q < 16) | layout[q // 64, k // 64]

    return mod


def _flex_mask_mod(pattern, mask_mod):
    """The flex ``mask_mod`` factory of a case (BigBird's reads its seeded random layout)."""
    return lambda n, device: mask_mod or _bigbird_mask_mod(pattern, n, device)


def _subquad(pattern, use_plan):
    def run(inputs):
        return attention(inputs["q"], inputs["k"], inputs["v"], mask=pattern, plan=use_plan, backend="triton")

    return run


def _subquad_blocks(pattern, block):
    """The pattern's BlockMask built at ``block`` x ``block`` through the same kernels, whatever block the engine
    would choose: BigBird's random blocks are 64 wide, so at 128 a tile keeps 45% of the pairs it visits and 76%
    of the visited tiles are masked; at 64, 82% and 28% (16k; the same shares at 64k)."""
    built = {}

    def run(inputs):
        q = inputs["q"]
        key = (q.shape[1], q.device)
        if key not in built:
            built[key] = pattern.block_mask(q.shape[1], q.shape[1], block_q=block, block_kv=block, device=q.device)
        return attention(q, inputs["k"], inputs["v"], mask=built[key], backend="triton")

    return run


@suite("patterns", device="cuda")
def pattern_cases(quick: bool):
    shapes = [(1, 4096)] if quick else [(2, 16384), (1, 65536)]
    heads, dim, dtype = 16, 128, torch.bfloat16
    flash_installed = importlib.util.find_spec("flash_attn") is not None
    for name, (pattern, mask_mod) in _patterns().items():
        for batch, n in shapes:
            pl = make_plan(pattern, n)
            pairs = float(sum(pl.kept_pairs()) if pl is not None else
                          masks.resolve(pattern, causal=False, batch=1, heads=1, seq_q=n, seq_kv=n,
                                        device="cpu").kept_pairs())
            rows = sample_rows(n)
            for mode in ("fwd", "fwdbwd"):
                flex_mod = _flex_mask_mod(pattern, mask_mod)
                impls = {"subquad-planned": _subquad(pattern, None),
                         "flex-triton": peers.flex(flex_mod, "TRITON")}
                if n <= 16384:
                    # the BlockMask path builds a bitmask for every partial tile: minutes at 64k
                    impls["subquad-blockmask"] = _subquad(pattern, False)
                if name.startswith(("bigbird", "longformer")):
                    impls["subquad-blockmask128"] = _subquad_blocks(pattern, 128)
                if flash_installed:
                    impls["flex-flash"] = peers.flex(flex_mod, "FLASH")
                yield Case(case=name, mode=mode, batch=batch, seqlen=n, heads_q=heads, heads_kv=heads,
                           head_dim=dim, dtype=dtype,
                           make_inputs=qkv_inputs(batch, n, heads, heads, dim, dtype, grad=mode == "fwdbwd"),
                           impls=impls, flops=attention_flops(batch, heads, pairs, dim, mode),
                           reference=exact_rows(pattern, rows), error_rows=rows,
                           extra={"density": round(pairs / (n * n), 6),
                                  "plan": [c.role for c in pl.components] if pl is not None else ["blockmask"]})

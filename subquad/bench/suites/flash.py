"""Flash suite (GPU): the flash engine against SDPA (flash = FlashAttention-2, cuDNN, efficient) and
FlexAttention with the same masks, in one run.

* dense causal and full at N = 1k, 4k, 16k, 64k with B*N = 32k tokens;
* causal sliding window 4096 at 16k and 64k (batch 1: time should grow ~4x);
* Longformer (window 512, 16 global tokens) and BigBird (window 512, 16 global tokens, 3 random blocks of
  64) at 16k, through the BlockMask path (``plan=False``; the planner has its own suite, ``patterns``);
* block-sparse layouts of 128x128 blocks at densities 0.1, 0.25, 0.5 at 16k (batch 2), beside dense full.

16 heads, D = 128, bf16, fwd and fwd+bwd. FLOPs count kept pairs only (effective TFLOP/s); errors are
checked against fp64 on sampled rows.
"""

from __future__ import annotations

import torch

from ... import attention, masks
from .. import peers
from ..attention_cases import attention_case
from ..harness import suite

HEADS, DIM, DTYPE = 16, 128, torch.bfloat16
GLOBAL = list(range(16))


def _layout(n: int, density: float, seed: int = 0) -> torch.Tensor:
    nb = n // 128
    g = torch.Generator().manual_seed(seed)
    return torch.rand(nb, nb, generator=g) < density


def _subquad(pattern, causal=False, deterministic=False):
    def run(inputs):
        return attention(inputs["q"], inputs["k"], inputs["v"], causal=causal, mask=pattern, backend="triton",
                         plan=False, deterministic=deterministic)

    return run


def _bigbird_layout(pattern, n, device):
    from ...masks.composition import Union
    from ...masks.patterns import BlockLayout, BuildContext
    from ...masks.plan import _terms

    prepared = pattern.prepare(BuildContext(1, 1, n, n, torch.device(device)))
    return next(t for t in _terms(prepared, Union) if isinstance(t, BlockLayout)).layout[0, 0].to(device)


def _cases():
    """(name, pattern, causal flag for SDPA or None, flex mask_mod factory, shapes)."""
    causal_mod = lambda n, dev: (lambda b, h, q, k: q >= k)  # noqa: E731
    window_mod = lambda n, dev: (lambda b, h, q, k: (q >= k) & (q - k < 4096))  # noqa: E731
    lf_mod = lambda n, dev: (lambda b, h, q, k: ((q - k).abs() <= 256) | (k < 16) | (q < 16))  # noqa: E731
    bigbird = masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0)

    def bb_mod(n, dev):
        lay = _bigbird_layout(bigbird, n, dev)
        return lambda b, h, q, k: ((q - k).abs() <= 256) | (k < 16) | (q < 16) | lay[q // 64, k // 64]

    dense = [(32, 1024), (8, 4096), (2, 16384), (1, 65536)]
    out = [("causal", None, True, causal_mod, dense), ("full", None, False, None, dense),
           ("window4096", masks.sliding_window(4096), None, window_mod, [(1, 16384), (1, 65536)]),
           ("longformer512+16", masks.longformer(512, GLOBAL), None, lf_mod, [(2, 16384)]),
           ("bigbird512+16+3x64", bigbird, None, bb_mod, [(2, 16384)])]
    for rho in (0.1, 0.25, 0.5):
        lay = _layout(16384, rho)

        def bs_mod(n, dev, lay=lay):
            cells = lay.to(dev)
            return lambda b, h, q, k: cells[q // 128, k // 128]

        out.append((f"block_sparse{rho}", masks.block_sparse(lay, 128), None, bs_mod, [(2, 16384)]))
    return out


@suite("flash", device="cuda")
def flash_cases(quick: bool):
    for name, pattern, sdpa_causal, mod, shapes in _cases():
        if quick:
            shapes = [(1, 4096)]
        for batch, n in shapes:
            for mode in ("fwd", "fwdbwd"):
                causal = sdpa_causal is True
                impls = {"subquad-triton": _subquad(pattern, causal=causal)}
                if mode == "fwdbwd":
                    impls["subquad-triton-det"] = _subquad(pattern, causal=causal, deterministic=True)
                if sdpa_causal is not None:
                    for b in ("flash", "cudnn", "efficient"):
                        impls[f"sdpa-{b}"] = peers.sdpa(b, sdpa_causal)
                impls["flex"] = peers.flex(mod)
                ref_pattern = masks.causal if causal else pattern
                yield attention_case(name, ref_pattern, mode, batch=batch, seqlen=n, heads_q=HEADS, heads_kv=HEADS,
                                     head_dim=DIM, dtype=DTYPE, impls=impls,
                                     extra={})

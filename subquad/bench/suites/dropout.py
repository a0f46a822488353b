"""Dropout suite (GPU): what attention dropout costs the flash kernels, and FlashAttention-2's cost beside it.

Causal attention and a causal window of 4096 keys at N = 4k and 16k with B*N = 32k tokens, 16 heads, D = 128,
bf16, fwd and fwd+bwd:

* ``subquad``: ``attention(dropout_p=0.1)`` (a fresh seed each call, drawn on the device);
* ``subquad-p0``: the same call without dropout (the ratio between the two is dropout's cost);
* ``sdpa-flash``: SDPA's flash backend (FlashAttention-2) with ``dropout_p=0.1``, causal rows only (SDPA has no
  window);
* ``sdpa-flash-p0``: the same without dropout.

Outputs under dropout are random draws: no error is checked here (``tests/test_dropout.py`` checks the kernels
against the reference on the same dropped pairs).
"""

from __future__ import annotations

import torch

from ... import attention
from ..attention_cases import qkv_inputs
from ..harness import Case, attention_flops, suite

HEADS, DIM, DTYPE, P = 16, 128, torch.bfloat16, 0.1


def _subquad(p: float, window: int | None):
    def run(inputs):
        return attention(inputs["q"], inputs["k"], inputs["v"], causal=True, backend="triton", dropout_p=p,
                         window_size=(window - 1, 0) if window else (-1, -1))

    return run


def _sdpa_flash(p: float):
    def run(inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        q, k, v = (inputs[x].transpose(1, 2) for x in ("q", "k", "v"))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p).transpose(1, 2)

    return run


@suite("dropout", device="cuda")
def dropout_cases(quick: bool):
    shapes = [(1, 4096)] if quick else [(8, 4096), (2, 16384)]
    for window in (None, 4096):
        for batch, n in shapes:
            w = n if window is None else min(window, n)
            pairs = w * (w + 1) / 2 + (n - w) * w       # per sequence and head
            for mode in ("fwd", "fwdbwd"):
                impls = {"subquad": _subquad(P, window), "subquad-p0": _subquad(0.0, window)}
                if window is None:
                    impls.update({"sdpa-flash": _sdpa_flash(P), "sdpa-flash-p0": _sdpa_flash(0.0)})
                yield Case(case="causal" if window is None else f"window{window}", mode=mode, batch=batch,
                           seqlen=n, heads_q=HEADS, heads_kv=HEADS, head_dim=DIM, dtype=DTYPE,
                           make_inputs=qkv_inputs(batch, n, HEADS, HEADS, DIM, DTYPE, grad=mode == "fwdbwd"),
                           impls=impls, flops=attention_flops(batch, HEADS, pairs, DIM, mode),
                           extra={"dropout_p": P})

"""The default CPU run of ``subquad bench``: exact causal attention against the patterns at growing N, on
the reference path (fp32, batch 1, 4 heads, head_dim 64). Dense causal grows as N^2; patterns whose kept
pairs grow linearly grow linearly in time and memory."""

from __future__ import annotations

import torch

from ... import attention, masks
from ..attention_cases import attention_case
from ..harness import suite

SHAPE = dict(batch=1, heads_q=4, heads_kv=4, head_dim=64, dtype=torch.float32)


def _impl(pattern, causal):
    def run(inputs):
        return attention(inputs["q"], inputs["k"], inputs["v"], causal=causal, mask=pattern, backend="reference")

    return {"subquad-reference": run}


@suite("cpu-patterns", device="cpu", default=True)
def cpu_patterns(quick: bool):
    lengths = {
        "causal": [256, 1024] if quick else [1024, 4096, 16384],
        "window4096": [512, 1024] if quick else [4096, 16384, 65536],
        "other": [512, 1024] if quick else [4096, 16384],
    }
    window = 256 if quick else 4096
    cases = [("causal", None, True, lengths["causal"]),
             (f"window{window}", masks.sliding_window(window), False, lengths["window4096"])]
    cases += [(name, pat, False, lengths["other"]) for name, pat in (
        ("strided256", masks.strided(256)),
        ("fixed128x16", masks.fixed(128, 16)),
        ("dilated1024x4", masks.dilated(1024, 4)),
        ("longformer512+16", masks.longformer(512, list(range(16)), causal=True)),
        ("bigbird512+16+3", masks.bigbird(512, list(range(16)), random_blocks=3, seed=0, causal=True)),
    )]
    for name, pattern, causal, ns in cases:
        for n in ns:
            yield attention_case(name, masks.causal if causal else pattern, "fwd", seqlen=n, impls=_impl(pattern, causal),
                                 **SHAPE)

"""Drawn calls of the Triton flash kernels against the reference (``test_flash``'s checks and tolerances): each
draw crosses the options that ``test_flash``'s listed cases take one or two at a time."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_flash import DEV, _check, _qkv, pytestmark  # noqa: F401  (pytestmark: the same skip off Triton)

from subquad import masks


@st.composite
def _drawn_call(draw):
    """A call's shape and options: lengths off the tiles, more queries than keys too, GQA/MQA, head dims, a
    pattern (planned or BlockMask), softcap, ALiBi, the deterministic backward."""
    nq, nkv = draw(st.integers(1, 100)), draw(st.integers(1, 100))
    hq, hkv = draw(st.sampled_from([(2, 1), (4, 2), (3, 3), (4, 1)]))
    # more queries than keys: full attention (the reference's BlockMask takes no pattern there)
    kind = draw(st.sampled_from(["none", "window", "block_sparse", "document", "longformer", "bigbird", "strided",
                                 "fixed", "prefix_lm"])) if nq <= nkv else "none"
    causal = draw(st.booleans()) and nq <= nkv
    if kind == "none":
        mask = None
    elif kind == "window":
        mask = masks.sliding_window(draw(st.integers(1, 80)), causal=draw(st.booleans()))
    elif kind == "block_sparse":
        g = torch.Generator().manual_seed(draw(st.integers(0, 9)))
        mask = masks.block_sparse(torch.rand(-(-nq // 32), -(-nkv // 32), generator=g) < 0.4, 32)
    elif kind == "document":
        cuts = draw(st.lists(st.integers(1, max(nkv - 1, 1)), max_size=3))
        mask = masks.document(sum(((torch.arange(nkv) >= c).long() for c in cuts), torch.zeros(nkv, dtype=torch.long)))
    elif kind == "longformer":
        tokens = draw(st.lists(st.integers(0, nq - 1), max_size=2, unique=True))
        mask = masks.longformer(draw(st.integers(1, 40)), tokens)
    elif kind == "bigbird":
        mask = masks.bigbird(draw(st.integers(1, 30)), [0], random_blocks=draw(st.integers(0, 2)), block=32,
                             seed=draw(st.integers(0, 3)))
    elif kind == "strided":
        mask = masks.strided(draw(st.integers(1, 24)))
    elif kind == "fixed":
        block = draw(st.integers(2, 24))
        mask = masks.fixed(block, draw(st.integers(1, block)))
    else:
        mask = masks.prefix_lm(draw(st.integers(0, nkv)))
    return dict(b=draw(st.integers(1, 2)), nq=nq, nkv=nkv, hq=hq, hkv=hkv, d=draw(st.sampled_from([16, 32, 40, 64])),
                dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), causal=causal, mask=mask,
                softcap=draw(st.sampled_from([None, 5.0])), alibi=draw(st.booleans()),
                deterministic=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_drawn_call())
def test_drawn_calls(call):
    # test_flash's listed cases crossed at random: each draw a combination no listed case has
    q, k, v = _qkv(call["b"], call["nq"], call["nkv"], call["hq"], call["hkv"], call["d"], call["dtype"],
                   seed=call["seed"])
    alibi = torch.rand(call["hq"], generator=torch.Generator().manual_seed(call["seed"])).to(DEV) if call["alibi"] \
        else None
    _check(q, k, v, causal=call["causal"], mask=call["mask"], softcap=call["softcap"], alibi=alibi,
           deterministic=call["deterministic"], grad_lse=True)

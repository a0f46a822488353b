"""Drawn decode calls (``test_decode``'s caches, inputs and tolerance): the Triton kernel and the reference against
the fp64 oracle, each draw crossing options that ``test_decode``'s listed cases take one or two at a time."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode import DEV, _cache, _close, _fill, _inputs, _oracle, needs_triton

from subquad.ops.decode import decode


@st.composite
def _drawn_call(draw):
    """A decode call: the cache layout, per-sequence lengths (some as short as the new tokens), 1-16 new tokens,
    GQA/MQA, head dims off the tiles, window, softcap, ALiBi (shared or per sequence), sinks, and the kernel's
    splits and key tile."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 16))
    hq, hkv = draw(st.sampled_from([(2, 1), (4, 2), (3, 3), (8, 2), (4, 1)]))
    return dict(layout=draw(st.sampled_from(["static", "paged"])), b=b, t=t, hq=hq, hkv=hkv,
                d=draw(st.sampled_from([16, 24, 32, 48])),
                lengths=draw(st.lists(st.integers(t, 70), min_size=b, max_size=b)),
                window=draw(st.one_of(st.none(), st.integers(1, 40))), softcap=draw(st.sampled_from([None, 2.5])),
                alibi=draw(st.sampled_from([None, "shared", "per_sequence"])), sinks=draw(st.booleans()),
                num_splits=draw(st.integers(1, 4)), block_n=draw(st.sampled_from([16, 32])),
                seed=draw(st.integers(0, 99)))


@needs_triton
@settings(max_examples=25, deadline=None, derandomize=True)
@given(_drawn_call())
def test_drawn_decode_calls(call):
    b, t, hq, lengths = call["b"], call["t"], call["hq"], call["lengths"]
    q, k, v = _inputs(b, t, hq, call["hkv"], call["d"], max(lengths), seed=call["seed"])
    view, _ = _fill(_cache(call["layout"], b, call["hkv"], call["d"], 72, max_step=t), k, v, lengths, t)
    g = torch.Generator().manual_seed(call["seed"])
    slopes = {None: None, "shared": torch.rand(hq, generator=g),
              "per_sequence": torch.rand(b, hq, generator=g)}[call["alibi"]]
    kw = dict(window=call["window"], softcap=call["softcap"],
              alibi_slopes=None if slopes is None else slopes.to(DEV),
              sinks=torch.randn(hq, generator=g).to(DEV) if call["sinks"] else None)
    want = _oracle(q, k, v, lengths, **kw)
    out, lse = decode(q, view, backend="triton", return_lse=True, num_splits=call["num_splits"],
                      block_n=call["block_n"], **kw)
    ref, ref_lse = decode(q, view, backend="reference", return_lse=True, **kw)
    _close(ref, want, 1e-5)
    _close(out, ref)
    _close(lse, ref_lse)

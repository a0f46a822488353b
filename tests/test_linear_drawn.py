"""Drawn calls of the chunked linear engine's Triton kernels (GLA's decay kinds and the delta rule) against the
fp64 reference, outputs and gradients: each draw crosses options that ``test_linear_kernels`` and
``test_delta_kernels`` take one or two at a time (forward form, chunk, length off the chunk, packed sequences with
empty ones, head dims, decay strength, initial state)."""

from __future__ import annotations

import pytest
import torch
from conftest import set_forward_form
from hypothesis import given, settings
from hypothesis import strategies as st
from test_delta_kernels import _run as run_delta
from test_linear_kernels import DEV, pytestmark  # noqa: F401  (pytestmark: the same skip off Triton)
from test_linear_kernels import _run as run_gla

NAMES = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state"]


@st.composite
def _drawn_call(draw):
    op = draw(st.sampled_from(["gla", "delta"]))
    packed = draw(st.booleans())
    t = draw(st.integers(1, 90))
    # packed: one row of sequences cut at drawn offsets (repeats give empty sequences)
    cuts = sorted(draw(st.lists(st.integers(0, t), max_size=3))) if packed else []
    return dict(op=op, b=1 if packed else draw(st.integers(1, 2)), t=t, cu=[0, *cuts, t] if packed else None,
                h=draw(st.integers(1, 2)), dk=draw(st.sampled_from([16, 32])), dv=draw(st.sampled_from([16, 32, 48])),
                decay=draw(st.sampled_from(["none", "head", "scalar", "vector"] if op == "gla" else
                                           ["none", "scalar"])),
                low=draw(st.sampled_from([-0.05, -1.0, -8.0])), chunk=draw(st.sampled_from([16, 32, 64])),
                form=draw(st.sampled_from(["fused", "two-pass", "split", "split-two-pass"])),
                initial_state=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def _leaves(call):
    g = torch.Generator().manual_seed(call["seed"])
    b, t, h, dk, dv = call["b"], call["t"], call["h"], call["dk"], call["dv"]
    # delta rule: keys of unit norm, as its models feed it (the reference's own tests do the same)
    q, k = torch.randn(b, t, h, dk, generator=g), torch.randn(b, t, h, dk, generator=g)
    if call["op"] == "delta":
        k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(b, t, h, dv, generator=g)
    beta = torch.rand(b, t, h, generator=g) if call["op"] == "delta" else None
    shape = {"none": None, "head": (h,), "scalar": (b, t, h), "vector": (b, t, h, dk)}[call["decay"]]
    decay = None if shape is None else torch.rand(*shape, generator=g) * call["low"]
    n_states = b if call["cu"] is None else len(call["cu"]) - 1
    s0 = torch.randn(n_states, h, dk, dv, generator=g) if call["initial_state"] else None
    return [None if x is None else x.to(DEV) for x in (q, k, v, beta, decay, s0)]


def _run(call, backend):
    """``test_delta_kernels``' or ``test_linear_kernels``' run (the fp64 reference, the same output seeds): outputs
    and gradients in ``NAMES``' order (GLA has no beta)."""
    q, k, v, beta, decay, s0 = _leaves(call)
    kw = dict(chunk_size=call["chunk"], cu_seqlens=None if call["cu"] is None else torch.tensor(call["cu"], device=DEV))
    if call["op"] == "delta":
        return run_delta(backend, [q, k, v, beta, decay, s0], **kw)
    o, s, dq, dk, dv, ddecay, ds0 = run_gla(backend, [q, k, v, decay, s0], **kw)
    return [o, s, dq, dk, dv, None, ddecay, ds0]


@settings(max_examples=20, deadline=None, derandomize=True)
@given(_drawn_call())
def test_drawn_linear_calls(call):
    with pytest.MonkeyPatch.context() as mp:
        set_forward_form(mp, call["form"])
        got = _run(call, "triton")
    want = _run(call, "reference")
    # a per-head decay's gradient sums every token's term; the kernels get each term from the q.dq - k.dk identity,
    # within ~1e-5 of fp64 at these sizes, so the sum's tolerance grows with the tokens it sums
    decay_atol = 2e-4 * max(1.0, call["b"] * call["t"] / 16) if call["decay"] == "head" else 2e-4
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), atol=decay_atol if name == "dlog_decay" else 2e-4,
                                       rtol=2e-4, msg=lambda m: f"{name}: {m}")

"""The chunked reference of the decayed linear-attention engine against the fp64 token-by-token oracle, and the
public wrappers (linear_attention, retention, ssd, steps) against their definitions."""

import pytest
import torch

import subquad
from subquad.ops.linear import retnet_gammas
from subquad.ops.linear.checks import expand_log_decay
from oracles import gla_recurrence, linear_attention_quadratic

B, T, H, DK, DV = 2, 45, 2, 8, 6


def _inputs(kind, seed=0, t=T, low=-0.5):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, t, H, DK, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, t, H, DV, generator=gen, dtype=torch.float64)
    shape = {"none": None, "head": (H,), "scalar": (B, t, H), "vector": (B, t, H, DK)}[kind]
    g = None if shape is None else torch.rand(*shape, generator=gen, dtype=torch.float64) * low
    return q, k, v, g


@pytest.mark.parametrize("kind", ["none", "head", "scalar", "vector"])
@pytest.mark.parametrize("chunk", [16, 32])
def test_gla_reference_matches_recurrence(kind, chunk):
    q, k, v, g = _inputs(kind)
    s0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    o, s = subquad.gla(q.float(), k.float(), v.float(), None if g is None else g.float(), scale=0.7,
                       initial_state=s0.float(), output_state=True, chunk_size=chunk, backend="reference")
    o_ref, s_ref = gla_recurrence(q, k, v, expand_log_decay(g, q), 0.7, s0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("low", [-60.0, -1e-6])
def test_gla_reference_decay_near_zero_and_one(low):
    q, k, v, g = _inputs("vector", low=low)
    o, s = subquad.gla(q.float(), k.float(), v.float(), g.float(), output_state=True, chunk_size=16,
                       backend="reference")
    o_ref, s_ref = gla_recurrence(q, k, v, g, DK ** -0.5)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


def test_gla_reference_gradients_match_recurrence():
    q, k, v, g = _inputs("vector", t=20)
    s0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
    o, s = subquad.gla(*leaves[:4], initial_state=leaves[4], output_state=True, chunk_size=16,
                       backend="reference")
    (o.square().sum() + s.sum()).backward()
    got = [t.grad for t in leaves]
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
    o2, s2 = gla_recurrence(*leaves2[:4], DK ** -0.5, leaves2[4])
    (o2.square().sum() + s2.sum()).backward()
    for a, b in zip(got, leaves2):
        torch.testing.assert_close(a, b.grad, atol=1e-8, rtol=1e-8)


def test_gla_state_handoff_equals_one_call():
    q, k, v, g = _inputs("scalar")
    o_all, s_all = subquad.gla(q, k, v, g, output_state=True, chunk_size=16, backend="reference")
    o1, s1 = subquad.gla(q[:, :20], k[:, :20], v[:, :20], g[:, :20], output_state=True, chunk_size=16,
                         backend="reference")
    o2, s2 = subquad.gla(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], initial_state=s1, output_state=True,
                         chunk_size=16, backend="reference")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all)
    torch.testing.assert_close(s2, s_all.double() if s2.dtype == torch.float64 else s_all)


def test_gla_varlen_equals_separate_calls():
    q, k, v, g = _inputs("vector")
    lens = [7, 0, 30, 8]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    s0 = torch.randn(len(lens), H, DK, DV, dtype=torch.float64)
    o, s = subquad.gla(q[:1], k[:1], v[:1], g[:1], initial_state=s0, output_state=True, cu_seqlens=cu,
                       chunk_size=16, backend="reference")
    for i in range(len(lens)):
        a, b = cu[i].item(), cu[i + 1].item()
        o_i, s_i = gla_recurrence(q[:1, a:b], k[:1, a:b], v[:1, a:b], g[:1, a:b], DK ** -0.5, s0[i:i + 1])
        torch.testing.assert_close(o[:, a:b].double(), o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[i:i + 1].double(), s_i, atol=1e-5, rtol=1e-5)


def test_retention_is_gla_with_constant_decay():
    q, k, v, _ = _inputs("none")
    gamma = retnet_gammas(H).double()
    o = subquad.retention(q, k, v, gamma, backend="reference")
    o_ref, _ = gla_recurrence(q, k, v, gamma.log().view(1, 1, H, 1).expand(B, T, H, 1), DK ** -0.5)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)


def test_retention_keeps_fp64_decays():
    """An fp64 gamma's log is taken in fp64 (it was rounded to fp32): a gradcheck through retention holds."""
    q, k, v, _ = _inputs("none", t=6)
    gamma = torch.tensor([0.9, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: subquad.retention(q, k, v, g, backend="reference"), (gamma,))


def test_ssd_matches_mamba2_recurrence():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, 4, 5, generator=gen, dtype=torch.float64)
    dt = torch.rand(B, T, 4, generator=gen, dtype=torch.float64)
    a = -torch.rand(4, generator=gen, dtype=torch.float64) * 2
    bm, cm = (torch.randn(B, T, 2, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    y, s = subquad.ssd(x, dt, a, bm, cm, output_state=True, backend="reference")
    h = torch.zeros(B, 4, 3, 5, dtype=torch.float64)   # (B, H, N, P)
    for t in range(T):
        bt, ct = bm[:, t].repeat_interleave(2, 1), cm[:, t].repeat_interleave(2, 1)
        h = (dt[:, t] * a).exp()[..., None, None] * h + bt.unsqueeze(-1) * (dt[:, t, :, None] * x[:, t]).unsqueeze(-2)
        torch.testing.assert_close(y[:, t], torch.einsum("bhn,bhnp->bhp", ct, h))
    torch.testing.assert_close(s, h)
    y1, s1 = subquad.ssd_step(x[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], None, backend="reference")
    torch.testing.assert_close(y1, y[:, 0])


@pytest.mark.parametrize("fmap", ["elu1", "relu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_attention_matches_quadratic_form(fmap, normalize):
    q, k, v, _ = _inputs("none")
    phi = torch.nn.functional.relu if fmap == "relu" else (lambda x: torch.nn.functional.elu(x) + 1)
    for causal in (True, False):
        o = subquad.linear_attention(q, k, v, fmap, causal=causal, normalize=normalize, scale=0.5,
                                     backend="reference")
        ref = linear_attention_quadratic(phi(q) * (1 if normalize else 0.5), phi(k), v, causal=causal,
                                         normalize=normalize, eps=1e-6 / 0.5)
        torch.testing.assert_close(o, ref, atol=1e-6, rtol=1e-6)


def test_linear_attention_state_handoff_and_steps():
    q, k, v, _ = _inputs("none")
    o_all = subquad.linear_attention(q, k, v, backend="reference")
    o1, st = subquad.linear_attention(q[:, :30], k[:, :30], v[:, :30], output_state=True, backend="reference")
    o2, st = subquad.linear_attention(q[:, 30:], k[:, 30:], v[:, 30:], initial_state=st, output_state=True,
                                      backend="reference")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all)
    state, outs = None, []
    for t in range(T):
        o_t, state = subquad.linear_attention_step(q[:, t], k[:, t], v[:, t], state, backend="reference")
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o_all)


def test_gla_step_matches_chunked():
    q, k, v, g = _inputs("vector")
    o, s = subquad.gla(q, k, v, g, output_state=True, backend="reference")
    o_steps, state = [], None
    for t in range(T):
        o_t, state = subquad.gla_step(q[:, t], k[:, t], v[:, t], state, g[:, t], backend="reference")
        o_steps.append(o_t)
    torch.testing.assert_close(torch.stack(o_steps, 1), o)
    torch.testing.assert_close(state, s)


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(B, T, H, DK + 1)), "k: expected shape"),
    (dict(v=torch.randn(B, T + 1, H, DV)), "v: expected shape"),
    (dict(log_decay=torch.randn(B, T)), "log_decay: expected"),
    (dict(initial_state=torch.randn(B, H, DV, DK)), "initial_state: expected shape"),
    (dict(chunk_size=48), "chunk_size"),
    (dict(backend="cuda"), "backend"),
    (dict(cu_seqlens=torch.tensor([0, 5, T])), "q: expected batch 1"),
])
def test_gla_bad_inputs(bad, match):
    args = dict(q=torch.randn(B, T, H, DK), k=torch.randn(B, T, H, DK), v=torch.randn(B, T, H, DV))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    log_decay = args.pop("log_decay", None)
    with pytest.raises(ValueError, match=match):
        subquad.gla(q, k, v, log_decay, **args)


def test_cu_seqlens_must_cover_sequence():
    q = torch.randn(1, T, H, DK)
    with pytest.raises(ValueError, match="cu_seqlens"):
        subquad.gla(q, q, q, cu_seqlens=torch.tensor([0, 5, T - 1]))


@pytest.mark.parametrize("op", ["gla", "delta_rule"])
def test_backward_does_not_slice_full_length_tensors(op):
    """Chunks and packed sequences come from one split each: no backward node slices a sequence-long
    tensor (one per chunk would make the backward quadratic in T)."""
    from autograd_graph import slices_of_length

    q, k, v = (torch.randn(1, 1000, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 300, 300, 1000])
    gate = (-torch.rand(1, 1000, 2)).requires_grad_()
    out = subquad.gla(q, k, v, gate, cu_seqlens=cu) if op == "gla" else \
        subquad.delta_rule(q, k, v, torch.rand(1, 1000, 2), gate, cu_seqlens=cu)
    out = out[0] if isinstance(out, tuple) else out
    assert slices_of_length(out, 1000) == 0



def test_linear_attention_gradients_match_quadratic_form():
    """With normalize the engine gets phi(q) already divided by its denominator, which depends on phi(q) and
    phi(k) too: gradients of q, k, v still those of the quadratic form."""
    q, k, v, _ = _inputs("none", t=20)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    subquad.linear_attention(*leaves, chunk_size=16, backend="reference").square().sum().backward()
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_quadratic(phi(leaves2[0]), phi(leaves2[1]), leaves2[2], eps=1e-6 * DK ** 0.5)
    ref.square().sum().backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-8, rtol=1e-8)


def test_linear_attention_half_precision_normalises_before_rounding():
    """The numerator phi(q_t) S_t grows with t: in fp16 it passed 65504 (inf) within a few tokens here (large
    phi(k), values of mean 4), so the engine gets normalised queries instead; these fall like 1/t and are kept out
    of fp16's subnormals (2% off at the last tokens here otherwise). Whole sequence, and a decoding step."""
    gen = torch.Generator().manual_seed(0)
    t = 512
    q = torch.randn(1, t, H, DK, generator=gen).half()
    k = (1000 + torch.randn(1, t, H, DK, generator=gen)).half()
    v = (4 + torch.randn(1, t, H, DV, generator=gen)).half()
    want = subquad.linear_attention(q.float(), k.float(), v.float(), backend="reference")
    o = subquad.linear_attention(q, k, v, backend="reference")
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.float(), want, atol=0, rtol=2e-3)
    _, state = subquad.linear_attention(q[:, :-1], k[:, :-1], v[:, :-1], output_state=True, backend="reference")
    o_t, _ = subquad.linear_attention_step(q[:, -1], k[:, -1], v[:, -1], state, backend="reference")
    torch.testing.assert_close(o_t.float(), want[:, -1], atol=0, rtol=2e-3)


def test_linear_attention_packed_normaliser_independent_of_position():
    """Each packed sequence's running sum of phi(k) is one scan over the pack less the sum before the sequence:
    after a long sequence of large phi(k) that sum is ~1e6, whose fp32 difference kept no digit of a short
    sequence's own sums. The short sequence packed after it equals the same sequence alone."""
    gen = torch.Generator().manual_seed(0)
    long, short = 256, 5
    q, k = (torch.randn(1, long + short, H, DK, generator=gen) for _ in range(2))
    v = torch.randn(1, long + short, H, DV, generator=gen)
    k[:, :long] += 1e4
    cu = torch.tensor([0, long, long + short])
    o, (s, z) = subquad.linear_attention(q, k, v, output_state=True, cu_seqlens=cu, backend="reference")
    o_alone, (s_alone, z_alone) = subquad.linear_attention(q[:, long:], k[:, long:], v[:, long:], output_state=True,
                                                           backend="reference")
    torch.testing.assert_close(o[:, long:], o_alone)
    torch.testing.assert_close(z[1:], z_alone)
    torch.testing.assert_close(s[1:], s_alone)


def run_on_no_tokens(op, backend, with_state, cu_seqlens=None, device="cpu"):
    """``op`` on no tokens (``cu_seqlens``: packed sequences, all empty): its output, and its final and initial
    states as lists (S, or S and z with normalize); the initial ones None without."""
    bsz, n = (1, cu_seqlens.numel() - 1) if cu_seqlens is not None else (B, B)
    q, v = torch.randn(bsz, 0, H, DK, device=device), torch.randn(bsz, 0, H, DV, device=device)
    init = [torch.randn(n, H, DK, DV, device=device), torch.rand(n, H, DK, device=device)] if with_state else None
    if op == "gla_step":
        o, s = subquad.gla_step(q, q, v, init and init[0], backend=backend)
        return o, [s], init and init[:1]
    if op == "linear_attention":
        o, s = subquad.linear_attention(q, q, v, initial_state=init and tuple(init), output_state=True,
                                        cu_seqlens=cu_seqlens, backend=backend)
        return o, list(s), init
    o, s = getattr(subquad, op)(q, q, v, initial_state=init and init[0], output_state=True, cu_seqlens=cu_seqlens,
                                backend=backend)
    return o, [s], init and init[:1]


def check_no_tokens(op, backend, with_state, device="cpu"):
    for cu in [None] if op == "gla_step" else [None, torch.tensor([0, 0, 0], device=device)]:
        o, states, init = run_on_no_tokens(op, backend, with_state, cu, device)
        assert o.shape[1] == 0 and o.shape[-1] == DV and o.dtype == torch.float32
        for got, s0 in zip(states, init or [None] * len(states)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, torch.zeros_like(got) if s0 is None else s0, atol=0, rtol=0)


@pytest.mark.parametrize("op", ["gla", "retention", "linear_attention", "gla_step"])
@pytest.mark.parametrize("with_state", [False, True])
def test_no_tokens(op, with_state):
    """T = 0 (or packed sequences all empty): an empty output and the initial state as the final one (zeros
    without one), fp32."""
    check_no_tokens(op, "reference", with_state)


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda: subquad.gla_step(*(torch.randn(B, H, DK),) * 2, torch.randn(B, H, DV), None,
                                          -torch.rand(B, 1, H)),
                 rf"log_decay_t: expected .*\({B}, {H}\) .* for one token, got \({B}, 1, {H}\)", id="gla_step"),
    pytest.param(lambda: subquad.linear_attention_step(*(torch.randn(3, 4),) * 3),
                 r"q_t: expected shape \(batch, heads, head_dim\) for one token or \(batch, seq, heads, head_dim\), "
                 r"got \(3, 4\)", id="linear_attention_step_2d"),
    pytest.param(lambda: subquad.linear_attention_step(*(torch.randn(B, H, DK),) * 2, torch.randn(B, H, DV),
                                                       torch.zeros(B, H, DK, DV)),
                 r"state: expected \(S, z\) with normalize=True", id="linear_attention_step_bare_state"),
    pytest.param(lambda: subquad.linear_attention(*(torch.randn(3, T, H, DK),) * 2, torch.randn(3, T, H, DV),
                                                  initial_state=torch.zeros(3, H, DK, DV)),
                 rf"initial_state: expected \(S, z\) with normalize=True, S of shape \(3, {H}, {DK}, {DV}\) and z "
                 rf"of shape \(3, {H}, {DK}\), got \(3, {H}, {DK}, {DV}\)", id="linear_attention_bare_state"),
    pytest.param(lambda: subquad.ssd(torch.randn(B, T, H, 4).half(), torch.rand(B, T, H), -torch.ones(H),
                                     *(torch.randn(B, T, 1, 3),) * 2),
                 r"B: expected dtype torch.float16 \(as x\), got torch.float32", id="ssd_dtype"),
    pytest.param(lambda: subquad.ssd_step(torch.randn(B, H, 4), torch.rand(B, 1), -torch.ones(H),
                                          *(torch.randn(B, 1, 3),) * 2, None),
                 rf"dt_t: expected shape \({B}, {H}\), got \({B}, 1\)", id="ssd_step_dt"),
    pytest.param(lambda: subquad.ssd_step(torch.randn(B, H, 4), torch.rand(B, H), -torch.ones(H),
                                          torch.randn(B, 1, 3), torch.randn(B, 1, 2), None),
                 rf"C_t: expected shape \({B}, 1, 3\) \(as B_t\), got \({B}, 1, 2\)", id="ssd_step_c"),
    pytest.param(lambda: subquad.linear_attention(*(torch.randn(B, T, H, DK),) * 2, torch.randn(B, T, H, DV),
                                                  lambda x: x.sum(-1)),
                 rf"feature_map: expected phi\(q\), phi\(k\) of one shape \(B, T, H, D'\), got \({B}, {T}, {H}\)",
                 id="feature_map_3d"),
])
def test_bad_inputs_named_as_passed(call, match):
    """Errors name the argument and its shape as the caller passed them: not after a step's token axis is added,
    nor as the engine's q, k, v that a wrapper makes of them."""
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), "1e-6"])
@pytest.mark.parametrize("op", ["linear_attention", "linear_attention_step"])
def test_normaliser_eps_must_be_positive(op, eps):
    """With ReLU features a row's denominator is 0 until some phi(k) shares its support: eps 0 made the output
    0 / 0 (NaN), a negative one divided by it, a string raised a TypeError deep inside."""
    q, k, v = -torch.rand(1, 4, H, DK), -torch.rand(1, 4, H, DK), torch.randn(1, 4, H, DV)
    with pytest.raises(ValueError, match="eps: expected a positive finite number"):
        getattr(subquad, op)(q, k, v, feature_map="relu", eps=eps, backend="reference")


def test_retnet_gammas_follow_the_paper():
    """RetNet's decays 1 - 2^(-5 - h), h = 0..H-1 (the paper, torchscale, fla), not a spread over fixed bounds."""
    torch.testing.assert_close(-torch.log2(1 - retnet_gammas(4)), torch.tensor([5.0, 6.0, 7.0, 8.0]))


def test_auto_backend_keeps_fp64_on_the_reference():
    """On CUDA ``backend="auto"`` takes the Triton kernels, which compute in fp32: fp64 inputs (a gradcheck)
    stay on the fp64 reference."""
    from types import SimpleNamespace

    from subquad.ops.linear.checks import pick_backend

    cuda = {dtype: SimpleNamespace(is_cuda=True, dtype=dtype) for dtype in (torch.float64, torch.bfloat16)}
    assert pick_backend("auto", cuda[torch.float64], "subquad.ops.linear.chunk") == "reference"
    assert pick_backend("auto", cuda[torch.bfloat16], "subquad.ops.linear.chunk") == "triton"

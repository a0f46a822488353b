"""The chunked (WY) delta-rule reference against the fp64 recurrence with the explicit transition matrix."""

import pytest
import torch
import torch.nn.functional as F

import subquad
from oracles import delta_rule_recurrence

B, T, H, DK, DV = 2, 37, 2, 8, 6


def _inputs(gated, seed=0, t=T, low=-0.5):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, t, H, DK, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, t, H, DV, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, t, H, generator=gen, dtype=torch.float64)
    g = torch.rand(B, t, H, generator=gen, dtype=torch.float64) * low if gated else None
    return q, k, v, beta, g


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk", [16, 32])
def test_delta_reference_matches_recurrence(gated, chunk):
    q, k, v, beta, g = _inputs(gated)
    s0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    o, s = subquad.delta_rule(q.float(), k.float(), v.float(), beta.float(), None if g is None else g.float(),
                              initial_state=s0.float(), output_state=True, chunk_size=chunk, backend="reference")
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    o_ref, s_ref = delta_rule_recurrence(qn, kn, v, beta, g, DK ** -0.5, s0)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("low", [-60.0, -1e-6])
def test_delta_reference_decay_extremes(low):
    q, k, v, beta, g = _inputs(True, low=low)
    o, s = subquad.delta_rule(q, k, v, beta, g, output_state=True, chunk_size=16, backend="reference")
    o_ref, s_ref = delta_rule_recurrence(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta, g, DK ** -0.5)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_delta_reference_gradients_match_recurrence():
    q, k, v, beta, g = _inputs(True, t=20)
    s0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g, s0)]
    o, s = subquad.delta_rule(*leaves[:5], initial_state=leaves[5], output_state=True, chunk_size=16,
                              backend="reference")
    (o.square().sum() + s.sum()).backward()
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, beta, g, s0)]
    qn, kn = F.normalize(leaves2[0], dim=-1, eps=1e-6), F.normalize(leaves2[1], dim=-1, eps=1e-6)
    o2, s2 = delta_rule_recurrence(qn, kn, *leaves2[2:5], DK ** -0.5, leaves2[5])
    (o2.square().sum() + s2.sum()).backward()
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-8, rtol=1e-8)


def test_delta_state_handoff_varlen_and_steps():
    q, k, v, beta, g = _inputs(True)
    o_all, s_all = subquad.delta_rule(q, k, v, beta, g, output_state=True, chunk_size=16, backend="reference")
    o1, s1 = subquad.delta_rule(q[:, :20], k[:, :20], v[:, :20], beta[:, :20], g[:, :20], output_state=True,
                                chunk_size=16, backend="reference")
    o2, s2 = subquad.delta_rule(q[:, 20:], k[:, 20:], v[:, 20:], beta[:, 20:], g[:, 20:], initial_state=s1,
                                output_state=True, chunk_size=16, backend="reference")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all)
    torch.testing.assert_close(s2, s_all)
    # two sequences packed = the batch of two
    cat = lambda t: torch.cat([t[:1], t[1:]], dim=1)  # noqa: E731
    cu = torch.tensor([0, T, 2 * T])
    o_p, s_p = subquad.delta_rule(cat(q), cat(k), cat(v), cat(beta), cat(g), output_state=True, cu_seqlens=cu,
                                  backend="reference")
    torch.testing.assert_close(o_p, cat(o_all))
    torch.testing.assert_close(s_p, s_all)
    state, outs = None, []
    for t in range(T):
        o_t, state = subquad.delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], state, g[:, t],
                                             backend="reference")
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o_all)
    torch.testing.assert_close(state, s_all)


@pytest.mark.parametrize("bad, match", [
    (dict(beta=torch.rand(B, T)), "beta: expected"),
    (dict(log_decay=torch.rand(B, T, H, DK)), "log_decay: expected"),
    (dict(initial_state=torch.rand(B, H, DK)), "initial_state"),
    (dict(chunk_size=128), r"chunk_size: expected a power of two in \[16, 64\]"),
])
def test_delta_bad_inputs(bad, match):
    q, k, v, beta, g = _inputs(False)
    args = dict(beta=beta, log_decay=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        subquad.delta_rule(q, k, v, args.pop("beta"), args.pop("log_decay"), **args)


def check_delta_no_tokens(backend, with_state, device="cpu"):
    q, v = torch.randn(B, 0, H, DK, device=device), torch.randn(B, 0, H, DV, device=device)
    beta = torch.rand(B, 0, H, device=device)
    s0 = torch.randn(B, H, DK, DV, device=device) if with_state else None
    cu = torch.tensor([0, 0, 0], device=device)
    runs = [subquad.delta_rule(q, q, v, beta, initial_state=s0, output_state=True, backend=backend),
            subquad.delta_rule(q[:1], q[:1], v[:1], beta[:1], initial_state=s0, output_state=True, cu_seqlens=cu,
                               backend=backend),
            subquad.delta_rule_step(q, q, v, beta, s0, backend=backend)]
    for o, s in runs:
        assert o.shape[1] == 0 and o.shape[-1] == DV and s.dtype == torch.float32
        torch.testing.assert_close(s, torch.zeros_like(s) if s0 is None else s0, atol=0, rtol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_delta_no_tokens(with_state):
    """T = 0 (or packed sequences all empty; a step with no tokens): an empty output and the initial state as the
    final one (zeros without one), fp32."""
    check_delta_no_tokens("reference", with_state)


def test_delta_step_bad_beta_named_as_passed():
    """A one-token step's beta is checked before its token axis is added: the error names the shape passed."""
    q, v = torch.randn(B, H, DK), torch.randn(B, H, DV)
    with pytest.raises(ValueError, match=rf"beta_t: expected a tensor of shape \({B}, {H}\) for one token, got "
                                         rf"\({B}, 1, {H}\)"):
        subquad.delta_rule_step(q, q, v, torch.rand(B, 1, H), None)

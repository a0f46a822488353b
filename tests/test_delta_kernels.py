"""Triton delta-rule path (WY transform + engine kernels with the DELTA switch; interpreter on CPU) against
the chunked reference: outputs and gradients of q, k, v, beta, log_decay, initial_state."""

import pytest
import torch

import subquad
from subquad.ops.grid import interpreting

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, DK, DV = 2, 16, 32


def _inputs(gated, b, t, seed=0, low=-0.5, n_states=None, dk=DK, dv=DV):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, H, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, H, dv, generator=gen)
    beta = torch.rand(b, t, H, generator=gen)
    g = torch.rand(b, t, H, generator=gen) * low if gated else None
    s0 = torch.randn(n_states or b, H, dk, dv, generator=gen)
    return [None if x is None else x.to(DEV) for x in (q, k, v, beta, g, s0)]


def _run(backend, tensors, **kw):
    # the reference in fp64, as test_linear_kernels' (its fp32 CPU runs were seen off by more than the tolerance)
    dtype = torch.float64 if backend == "reference" else None
    leaves = [None if x is None else x.to(dtype or x.dtype).clone().requires_grad_() for x in tensors]
    q, k, v, beta, g, s0 = leaves
    o, s = subquad.delta_rule(q, k, v, beta, g, initial_state=s0, output_state=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o.shape, generator=gen).to(DEV), torch.randn(s.shape, generator=gen).to(DEV)
    ((o * do).sum() + (s * ds).sum()).backward()
    return [o, s] + [None if x is None else x.grad for x in leaves]


def _assert_match(got, want, atol=2e-4, rtol=2e-4):
    names = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state"]
    for name, a, b in zip(names, got, want):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gated, chunk, t", [(False, 16, 40), (True, 32, 45), (True, 64, 70), (True, 16, 100)])
def test_delta_kernel_matches_reference(gated, chunk, t, delta_forward_form):
    tensors = _inputs(gated, 2, t)
    _assert_match(_run("triton", tensors, chunk_size=chunk), _run("reference", tensors, chunk_size=chunk))


def test_delta_kernel_varlen_and_decay_near_zero(delta_forward_form):
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    tensors = _inputs(True, 1, 60, low=-30.0, n_states=4)
    got = _run("triton", tensors, chunk_size=16, cu_seqlens=cu)
    assert all(torch.isfinite(x).all() for x in got if x is not None)
    _assert_match(got, _run("reference", tensors, chunk_size=16, cu_seqlens=cu))


@pytest.mark.parametrize("gated", [False, True])
def test_delta_launches_split_past_the_grid_limit(gated, delta_forward_form, monkeypatch):
    """CUDA's 65,535 programs on grid axes 1 and 2 lowered to 3: packed sequences x heads (8; segments x heads in
    the split forms, the transition pass's too) in a launch per sequence (its 2 heads together) and chunks (5) in
    two, with their program offsets, in every forward form; outputs, final states and gradients match the
    reference."""
    from conftest import small_grid_limit, split_kernels

    launches = small_grid_limit(monkeypatch)
    cu = torch.tensor([0, 13, 13, 47, 60], device=DEV)
    tensors = _inputs(gated, 1, 60, n_states=4)
    _assert_match(_run("triton", tensors, chunk_size=16, cu_seqlens=cu),
                  _run("reference", tensors, chunk_size=16, cu_seqlens=cu))
    two_pass = delta_forward_form in ("two-pass", "split-two-pass")
    want = {"state_fwd", "state_bwd", "dv_bwd", "dqk_bwd", "output_fwd" if two_pass else "fused_fwd"}
    want |= {"state_fwd[transition]"} if delta_forward_form.startswith("split") else set()
    assert split_kernels(launches) == want | ({"decay_grad"} if gated else set())


@pytest.mark.parametrize("gated", [False, True])
def test_delta_recurrent_launches_split_past_the_grid_limit(gated, monkeypatch):
    """The decode step's batch x heads programs (4) in launches of at most 3."""
    from conftest import small_grid_limit, split_kernels

    launches = small_grid_limit(monkeypatch)
    test_delta_recurrent_kernel_matches_reference(gated)
    assert split_kernels(launches) == {"recurrent_step"}


@pytest.mark.parametrize("gated", [False, True])
def test_delta_recurrent_kernel_matches_reference(gated):
    q, k, v, beta, g, s0 = _inputs(gated, 2, 3)
    with torch.no_grad():
        o, s = subquad.delta_rule_step(q, k, v, beta, s0, g, backend="triton")
        o_ref, s_ref = subquad.delta_rule_step(q, k, v, beta, s0, g, backend="reference")
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def _check_bf16_gradients_on_gpu(gated):
    """bf16 outputs and gradients at K = V = 128, chunk 64, against the fp32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, d = 2, 300, 4, 128
    q, k, v = (torch.randn(b, t, h, d, generator=gen, device="cuda") for _ in range(3))
    beta = torch.rand(b, t, h, generator=gen, device="cuda")
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen, device="cuda") + 3.0) if gated else None
    s0 = torch.randn(b, h, d, d, generator=gen, device="cuda") * 0.1
    do = torch.randn(b, t, h, d, generator=gen, device="cuda")

    def grads(dtype, backend):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, beta)]
        extra = [None if g is None else g.clone().requires_grad_(), s0.clone().requires_grad_()]
        o, s = subquad.delta_rule(*leaves, extra[0], initial_state=extra[1], output_state=True, backend=backend)
        ((o.float() * do).sum() + s.sum()).backward()
        return [o] + [x.grad for x in leaves + extra if x is not None]

    for got, want in zip(grads(torch.bfloat16, "triton"), grads(torch.float32, "reference")):
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at model sizes: the GPU check of gated gradients")
@pytest.mark.parametrize("gated", [False, True])
def test_delta_kernel_bf16_gradients_on_gpu(gated, delta_forward_form):
    """Gated gradients checked on the GPU (Triton 3.6 Hopper trap), bf16, K = V = 128, chunk 64."""
    _check_bf16_gradients_on_gpu(gated)


def _hold_whole_chunks(monkeypatch):
    """wy_fwd's HOLD (the chunk's k and v loaded once, whole): a tuning choice that the tests' single
    configuration does not take."""
    import triton

    from subquad.ops.delta import wy

    monkeypatch.setattr(wy.wy_fwd_tuned.tuner, "configs", [triton.Config({"HOLD": True}, num_warps=4, num_stages=1)])
    monkeypatch.setattr(wy.wy_fwd_tuned.tuner, "cache", {})
    monkeypatch.setattr(wy.wy_fwd_tuned, "chosen", {})


@pytest.mark.parametrize("gated", [False, True])
def test_delta_wy_pass_holding_the_chunk(gated, monkeypatch):
    """HOLD matches the reference; widths that are not powers of two are padded and masked."""
    _hold_whole_chunks(monkeypatch)
    tensors = _inputs(gated, 2, 45, dk=20, dv=36)
    _assert_match(_run("triton", tensors, chunk_size=16), _run("reference", tensors, chunk_size=16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at model sizes: the configuration the H200 chose")
def test_delta_wy_pass_holding_the_chunk_bf16_on_gpu(monkeypatch):
    """HOLD in bf16 at K = V = 128 (the autotuner's choice on the H200), gated, gradients included."""
    _hold_whole_chunks(monkeypatch)
    _check_bf16_gradients_on_gpu(True)


def test_hold_is_tuned_only_up_to_128_wide():
    """The autotuner's prune drops HOLD where a chunk's k or v is wider than 128 (whole 64 x 256 tiles)."""
    import triton

    from subquad.ops.linear.tuning import hold_at_most_128

    configs = [triton.Config({"HOLD": False}), triton.Config({"HOLD": True})]
    holds = lambda **widths: [c.kwargs["HOLD"] for c in hold_at_most_128(configs, {}, **widths)]  # noqa: E731
    assert holds(K=128, V=128) == [False, True]
    assert holds(K=256, V=128) == [False]
    assert holds(K=64, V=256) == [False]


@pytest.mark.parametrize("with_state", [False, True])
def test_delta_no_tokens(with_state):
    """T = 0 (or packed sequences all empty; a step with no tokens) on the kernels: the empty output and the
    initial state (zeros without one)."""
    from test_delta_reference import check_delta_no_tokens

    check_delta_no_tokens("triton", with_state, DEV)

"""The flash kernels' call options beyond the patterns (under TRITON_INTERPRET=1 on CPU, natively on a GPU):
bottom-right causal with more queries than keys, attention sinks, right padding, and the arguments the kernels
refuse (trainable ALiBi slopes, a second backward). Helpers from test_flash.py (it had grown past 700 lines)."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad import masks
from test_flash import DEV, TRITON, _check, _close, _lse_close, _qkv

pytestmark = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")


def _against_reference(q, k, v, **kwargs):
    """``subquad.attention(q, k, v, **kwargs)`` on the kernels against the reference: the output, the LSE and
    the gradients of a weighted sum of the output. Returns the kernels' LSE and the reference's output."""
    results = []
    for backend in ("triton", "reference"):
        out, lse = subquad.attention(q, k, v, return_lse=True, backend=backend, **kwargs)
        results.append((out, lse, torch.autograd.grad((out.float() * out.detach().float()).sum(), (q, k, v))))
    (out, lse, grads), (ref, ref_lse, ref_grads) = results
    _close("out", out, ref, q.dtype)
    _lse_close(lse, ref_lse)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(name, a, b, q.dtype)
    return lse, ref


def test_causal_more_queries_than_keys():
    """Bottom-right causal with seq_q > seq_kv (the first queries see no key) through the kernels."""
    q, k, v = _qkv(1, 45, 30, 4, 2, 16, torch.float16)
    lse, _ = _against_reference(q, k, v, causal=True, mask=masks.sliding_window(8))
    assert torch.isneginf(lse[:, :, :15]).all()


@pytest.mark.parametrize("scale", [-0.3, 0.3])
def test_scale_sign(scale):
    """A negative scale flips which product is a row's largest score: the forward's maximum over the raw products
    (``RAW_MAX``, taken for positive scales) must not be taken there. Output, LSE and gradients against the
    reference, causal (its first rows see one key) with a ragged length, bf16."""
    q, k, v = _qkv(1, 70, 70, 2, 2, 32, torch.bfloat16, seed=3)
    _against_reference(q, k, v, causal=True, scale=scale)


def test_sinks():
    """Attention sinks on the kernels' output and LSE (``attention``'s ``sinks``): against the reference, the
    sinks' gradient included; GQA, a window, bf16."""
    q, k, v = _qkv(2, 50, 70, 4, 2, 32, torch.bfloat16)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV, requires_grad=True)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        out, lse = subquad.attention(q, k, v, mask=masks.sliding_window(16), return_lse=True, backend=backend,
                                     sinks=sinks)
        outs.append((out, lse))
        g = torch.ones_like(out)
        grads.append(torch.autograd.grad((out.float() * g).sum() + lse.sum(), (q, k, v, sinks)))
    _close("out", outs[0][0], outs[1][0], torch.bfloat16)
    _lse_close(outs[0][1], outs[1][1])
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), *grads):
        _close(name, a, b, torch.bfloat16)


def test_padding_runs_as_documents():
    """``masks.padding``: per-row valid lengths (one row empty), causal, through the document term."""
    _check(*_qkv(3, 70, 70, 2, 2, 16, torch.float16), mask=masks.padding([70, 33, 0]) & masks.causal)


def test_trainable_alibi_slopes_are_refused():
    """The kernels take the slopes as constants: the Triton backward returned no gradient for slopes that
    require one (the reference differentiates them), silently."""
    q, k, v = _qkv(1, 40, 40, 2, 2, 16, torch.float16)
    slopes = torch.tensor([0.3, 0.1], device=DEV, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes"):
        subquad.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="triton")
    with torch.no_grad():
        subquad.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="triton")


@pytest.mark.parametrize("mask", [None, masks.strided(16)], ids=["causal", "strided-planned"])
def test_double_backward_raises(mask):
    """A gradient of a gradient (a gradient penalty) through the kernels: their backward is not itself
    differentiable, and the second backward returned None for the attention term without a word (with
    ``allow_unused``): a backward asked to build a graph now refuses."""
    q, k, v = _qkv(1, 64, 64, 2, 2, 16, torch.float16)
    out = subquad.attention(q, k, v, causal=mask is None, mask=mask, backend="triton")
    with pytest.raises(RuntimeError, match="first-order backward"):
        torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(out.float().square().sum(), q)      # the first-order gradient runs
    assert torch.isfinite(dq).all()


@pytest.mark.parametrize("causal, window_size, nq", [(False, (5, 2), 37), (True, (9, -1), 37), (False, (-1, 0), 29),
                                                      (True, (4, 4), 29)])
def test_window_size(causal, window_size, nq):
    """FlashAttention's ``window_size=(left, right)``, bottom-right aligned: the kernels against the reference,
    and the reference against the fp64 oracle's explicit mask (GQA)."""
    import oracles

    q, k, v = _qkv(1, nq, 37, 4, 2, 16, torch.float16)
    _, ref = _against_reference(q, k, v, causal=causal, window_size=window_size)
    left, right = window_size
    dist = (torch.arange(nq) + 37 - nq).view(-1, 1) - torch.arange(37).view(1, -1)
    keep = (dist <= (left if left >= 0 else 10**9)) & (dist >= -(right if right >= 0 else 10**9))
    oracle, _ = oracles.softmax_attention(q.cpu(), k.cpu(), v.cpu(), mask=keep, causal=causal)
    _close("oracle", ref.cpu(), oracle, torch.float16)


def test_window_size_more_queries_than_keys():
    """Causal with more queries than keys and a window, with a bool mask too: the leading queries see nothing
    (the split slices the mask), the rest as the oracle's explicit mask."""
    import oracles

    q, k, v = _qkv(1, 11, 6, 2, 2, 16, torch.float16)
    user = torch.rand(11, 6, generator=torch.Generator().manual_seed(3)) < 0.8
    out, lse = subquad.attention(q, k, v, causal=True, mask=user.to(DEV), window_size=(2, 0), return_lse=True)
    dist = (torch.arange(11) - 5).view(-1, 1) - torch.arange(6).view(1, -1)
    ref, ref_lse = oracles.softmax_attention(q.cpu(), k.cpu(), v.cpu(), mask=user & (dist >= 0) & (dist <= 2))
    _close("out", out.cpu(), ref, torch.float16)
    _lse_close(lse.cpu(), ref_lse.float())
    with pytest.raises(ValueError, match="window_size: expected seq_q <= seq_kv=6 or causal=True"):
        subquad.attention(q, k, v, window_size=(1, 1))


def test_window_size_refused():
    q, k, v = _qkv(1, 16, 16, 2, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="window_size: expected \\(left, right\\)"):
        subquad.attention(q, k, v, window_size=(3,))
    with pytest.raises(ValueError, match="left: expected an integer >= 0, or -1"):
        subquad.attention(q, k, v, window_size=(-3, 0))
    with pytest.raises(ValueError, match="window_size: expected no prebuilt BlockMask"):
        subquad.attention(q, k, v, mask=masks.causal.block_mask(16), window_size=(3, 0))


@pytest.mark.parametrize("unchained", [True, False])
def test_overlapped_forward(monkeypatch, unchained):
    """The band walks' forward with each tile's P.V product beside the next tile's softmax (``OVERLAP``): the
    unmasked middle's loop, its first and last tiles, and the masked edges after it, against the reference on
    full, causal, window and bottom-right causal walks, ragged lengths, softcap, ALiBi and GQA. On CPU with and
    without the unchained products (query tiles of 32 and 64 rows under 4 warps); on a GPU its own tiles."""
    from subquad.ops.softmax.flash import launch, tuning
    if not unchained and DEV == "cuda":
        pytest.skip("the GPU's tiles decide")
    monkeypatch.setattr(tuning, "FWD_OVERLAP", True)
    if not unchained:
        monkeypatch.setattr(launch, "INTERPRET_FWD", (64, 16))
    flags = []
    if DEV == "cuda":   # the tuner's configurations carry OVERLAP (its tuners made anew, around the spy)
        prune = tuning._prune
        monkeypatch.setattr(tuning, "_TUNED", {})
        monkeypatch.setattr(tuning, "_prune", lambda *a, **kw: [
            c for c in prune(*a, **kw) if kw.get("unchain") != "BLOCK_M" or not flags.append(c.kwargs["OVERLAP"])])
    else:
        split = launch.launch_split
        monkeypatch.setattr(launch, "launch_split",     # (the forward's launches: the backward's have no OVERLAP)
                            lambda *a, **kw: ("OVERLAP" in kw and flags.append(kw["OVERLAP"])) or split(*a, **kw))
    _check(*_qkv(2, 67, 67, 2, 2, 32, torch.bfloat16), causal=True)
    _check(*_qkv(1, 100, 100, 4, 2, 32, torch.float16))
    _check(*_qkv(1, 90, 90, 2, 2, 32, torch.bfloat16), mask=masks.sliding_window(40), softcap=5.0)
    _check(*_qkv(2, 45, 45, 2, 2, 32, torch.bfloat16), mask=masks.sliding_window(16, causal=False),
           alibi=torch.tensor([[0.3, 0.1], [0.2, 0.05]], device=DEV))
    _check(*_qkv(1, 37, 90, 2, 1, 32, torch.bfloat16), causal=True)
    assert flags and all(flags), flags

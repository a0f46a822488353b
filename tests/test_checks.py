"""Bad input to ``subquad.attention``: a ValueError that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad import masks


def _qkv(b=2, nq=32, nkv=32, hq=4, hkv=2, d=16, dv=None, dtype=torch.float32):
    return (torch.randn(b, nq, hq, d, dtype=dtype), torch.randn(b, nkv, hkv, d, dtype=dtype),
            torch.randn(b, nkv, hkv, dv or d, dtype=dtype))


def _call(q=None, k=None, v=None, **kw):
    q0, k0, v0 = _qkv()
    return subquad.attention(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
                             backend=kw.pop("backend", "reference"), **kw)


Q, K, V = _qkv()
META = torch.empty(2, 32, 2, 16, device="meta")

CASES = {
    # rank and type
    "q rank 3": (dict(q=Q[0]), r"q: expected shape \(batch, seq, heads, head_dim\)"),
    "k rank 5": (dict(k=K[None]), r"k: expected shape \(batch, seq, heads, head_dim\)"),
    "v rank 2": (dict(v=V[0, 0]), r"v: expected shape"),
    "q not a tensor": (dict(q=Q.tolist()), r"q: expected a torch.Tensor"),
    "integer q": (dict(q=Q.long(), k=K.long(), v=V.long()), r"q: expected a floating-point tensor"),
    # mismatched sizes
    "batch": (dict(k=K[:1], v=V[:1]), r"k, v: expected batch 2"),
    "head_dim": (dict(k=torch.randn(2, 32, 2, 8)), r"k: expected head_dim 16"),
    "v seq": (dict(v=V[:, :31]), r"v: expected shape \(2, 32, 2, head_dim_v\)"),
    "v heads": (dict(v=torch.randn(2, 32, 1, 16)), r"v: expected shape"),
    "heads not a multiple": (dict(k=torch.randn(2, 32, 3, 16), v=torch.randn(2, 32, 3, 16)), r"H_kv dividing H_q=4"),
    "empty seq": (dict(q=Q[:, :0]), r"non-empty"),
    # (the Triton kernels' tile of v's head_dim was empty: an error from inside the kernel)
    "empty v head_dim": (dict(v=V[..., :0].half(), q=Q.half(), k=K.half(), backend="triton"), r"v: expected .*head_dim"),
    "more queries than keys with a mask": (dict(q=torch.randn(2, 40, 4, 16),
                                                mask=masks.sliding_window(8, causal=False)), r"seq_q <= seq_kv=32"),
    # devices and dtypes
    "mixed devices": (dict(k=META, v=META), r"q, k, v: expected one device"),
    "mixed dtypes": (dict(v=V.double()), r"q, k, v: expected one dtype"),
    # masks
    "window 0": (dict(build=lambda: masks.sliding_window(0)), r"window: expected a positive integer"),
    "window negative": (dict(build=lambda: masks.sliding_window(-4, causal=False)), r"window"),
    "mask tensor size": (dict(mask=torch.ones(32, 31, dtype=torch.bool)), r"mask: expected shape \(seq_q=32, seq_kv=32\)"),
    "mask tensor heads": (dict(mask=torch.ones(3, 32, 32, dtype=torch.bool)), r"mask: expected shape .*heads in \(1, 4\)"),
    "mask tensor dtype": (dict(mask=torch.ones(32, 32)), r"mask: expected a bool tensor"),
    "block mask seq": (dict(build=lambda: masks.causal.block_mask(64)), r"mask: expected a BlockMask for seq_q=32"),
    "block mask heads": (dict(build=lambda: masks.block_sparse(torch.ones(3, 1, 1, dtype=torch.bool), 32)
                              .block_mask(32, heads=3)), r"mask: expected a BlockMask"),
    "block mask with causal": (dict(build=lambda: masks.causal.block_mask(32), causal=True), r"causal: pass causal=False"),
    "mask of another type": (dict(mask=5), r"mask: expected a subquad.masks pattern"),
    "seq_ids length": (dict(build=lambda: masks.document(torch.zeros(31, dtype=torch.long))), r"seq_ids: expected shape \(32,\)"),
    "seq_ids batch": (dict(build=lambda: masks.document(torch.zeros(3, 32, dtype=torch.long))), r"seq_ids: expected shape"),
    "layout too small": (dict(build=lambda: masks.block_sparse(torch.ones(1, 1, dtype=torch.bool), 16)), r"layout: expected shape"),
    "global token outside": (dict(build=lambda: masks.longformer(4, [32])), r"global_tokens: position 32"),
    # options
    "alibi 1-D size": (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes: expected a tensor of shape \(4,\) or \(2, 4\)"),
    "alibi batch": (dict(alibi_slopes=torch.ones(3, 4)), r"alibi_slopes: expected a tensor of shape"),
    "alibi rank": (dict(alibi_slopes=torch.ones(2, 4, 1)), r"alibi_slopes"),
    "alibi list": (dict(alibi_slopes=[1.0] * 4), r"alibi_slopes"),
    "alibi device": (dict(alibi_slopes=torch.ones(4, device="meta")), r"alibi_slopes: expected device cpu"),
    "alibi bool": (dict(alibi_slopes=torch.ones(4, dtype=torch.bool)), r"alibi_slopes: expected a floating-point"),
    "causal str": (dict(causal="yes"), r"causal: expected a bool, got 'yes'"),
    "softcap < 0": (dict(softcap=-1.0), r"softcap: expected a positive finite number"),
    "scale nan": (dict(scale=float("nan")), r"scale: expected a finite number"),
    "backend": (dict(backend="cuda"), r"backend: expected one of"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case):
    kw, message = CASES[case]
    kw = dict(kw)
    with pytest.raises(ValueError, match=message):
        if "build" in kw:  # a mask built for the call: the pattern itself may refuse the argument first
            kw["mask"] = kw.pop("build")()
        _call(**kw)


def test_good_input_passes():
    # The same calls with valid arguments run (the checks are not over-eager).
    out = _call(mask=masks.sliding_window(4), alibi_slopes=torch.ones(2, 4), softcap=5.0, scale=0.1)
    assert out.shape == (2, 32, 4, 16)
    q, k, v = _qkv(hkv=1, dv=8)
    assert subquad.attention(q, k, v, causal=True, backend="reference").shape == (2, 32, 4, 8)


def test_numpy_scalars_are_numbers_and_bools_are_not():
    """``scale``, ``softcap`` and ``dropout_p`` take NumPy scalars (as FlashAttention and SDPA do) and refuse
    bools; ``softcap=0`` is FlashAttention's "no softcap" in ``attention`` and ``decode`` as in ``varlen_attention``."""
    import numpy as np

    import subquad as sq

    q = torch.randn(1, 8, 2, 16)
    want = sq.attention(q, q, q, causal=True, scale=0.25)
    torch.testing.assert_close(sq.attention(q, q, q, causal=True, scale=np.float32(0.25), softcap=0.0,
                                            dropout_p=np.float32(0.0)), want)
    torch.testing.assert_close(sq.decode(q[:, -1:], q, q, softcap=0, scale=0.25), want[:, -1:])
    for name, bad in (("scale", {"scale": True}), ("softcap", {"softcap": True}), ("dropout_p", {"dropout_p": False})):
        with pytest.raises(ValueError, match=name):
            sq.attention(q, q, q, **bad)


def test_triton_backend_on_cpu_tensors_names_the_backend(monkeypatch):
    """``backend="triton"`` with fp16 CPU tensors outside the interpreter: Triton's own "0 active drivers"
    RuntimeError named no argument (fp32 runs the reference, as documented)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend: 'triton' runs on CUDA tensors"):
        subquad.attention(q, k, v, causal=True, backend="triton")
    q, k, v = _qkv()
    assert subquad.attention(q, k, v, causal=True, backend="triton").dtype == torch.float32


def test_triton_decode_and_linear_on_cpu_tensors_name_the_backend(monkeypatch):
    """The decode kernel took CPU tensors to a GPU's driver (Triton's "Pointer argument (at 0) cannot be accessed
    from Triton" on the H100) or to none ("0 active drivers"): now a ValueError names the backend, as
    ``attention``'s does. The sm90 stand-in driver, which records launches, still takes them."""
    from subquad.bench.sm90 import Sm90Driver
    from subquad.ops import grid

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 2, 16, dtype=torch.float16)
    k = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend: 'triton' runs on CUDA tensors"):
        subquad.decode(q, k, k, backend="triton")
    x = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend: 'triton' runs on CUDA tensors"):
        subquad.linear_attention(x, x, x, backend="triton")
    import triton

    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90Driver())
    assert grid.triton_takes_cpu_tensors()


def test_triton_backend_on_cpu_tensors_names_the_backend_when_compiled(monkeypatch):
    """Traced (a compiled decoding step), the check itself failed: dynamo refused to trace Triton's driver lookup
    ("Attempted to call function marked as skipped"), so the error named neither the backend nor the device."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 2, 16, dtype=torch.float16)
    k = torch.randn(1, 8, 1, 16, dtype=torch.float16)
    for fn in (lambda q: subquad.decode(q, k, k, backend="triton"),
               lambda q: subquad.attention(q, k, k, backend="triton")):
        with pytest.raises(Exception, match=r"backend: 'triton' runs on CUDA tensors"):
            torch.compile(fn, fullgraph=True, backend="eager")(q)


@pytest.mark.parametrize("name, value, refused", [("scale", 1, True), ("softcap", 1, True), ("causal", True, 1)])
def test_refused_types_after_a_call_prepared_for_an_equal_value(name, value, refused):
    """A call prepared for ``scale=1`` (or ``softcap=1``, ``causal=True``) was found again for ``True`` (``1``):
    equal, with the same hash, it then ran without the check that refuses its type."""
    q = torch.randn(1, 8, 2, 16)
    subquad.attention(q, q, q, **{"causal": True, name: value})
    with pytest.raises(ValueError, match=name):
        subquad.attention(q, q, q, **{"causal": True, name: refused})


@pytest.mark.parametrize("bad", [None, "0.7", True])
def test_generate_refuses_a_temperature_that_is_not_a_number(bad):
    """``temperature=None`` (Hugging Face's "the default") or a string reached ``temperature >= 0`` and failed with
    a TypeError naming no argument; ``True`` passed as 1, as the other sampling arguments' bools did."""
    from subquad.models import HybridLM, speculative_generate

    torch.manual_seed(0)
    model = HybridLM(16, 8, "A", heads=1)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, model, ids, 2, temperature=bad)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), ("yes", True), ("0", False), ("false", False)])
def test_interpreter_setting_is_read_as_triton_reads_it(monkeypatch, value, on):
    """``TRITON_INTERPRET=true`` made Triton interpret while subquad read it as off (only "1" counted): a
    ``backend="triton"`` call on CPU tensors was then refused."""
    from subquad.ops import grid

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert grid.interpreting() == on
    if on:
        assert grid.triton_takes_cpu_tensors()
    import triton

    assert bool(triton.knobs.runtime.interpret) == on       # as Triton itself reads it

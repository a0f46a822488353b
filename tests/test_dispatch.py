"""backend="auto" for exact attention: signatures, the measured table and its fallback rule, never a backend
that cannot run the call, graceful without FA4. CPU only: the device and what can run are stubbed where a
GPU signature is needed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import subquad
from subquad import masks
from subquad.ops.softmax import dispatch, fa4

IDS = torch.tensor([0] * 5 + [1] * 11)


@pytest.mark.parametrize("mask,causal,kind", [
    (None, False, "full"),
    (None, True, "causal"),
    (masks.causal, False, "causal"),
    (masks.full, False, "full"),
    (masks.sliding_window(8), False, "window"),
    (masks.sliding_window(8, causal=False), True, "window"),
    (masks.document(IDS), True, "document"),
    (masks.document(IDS) & masks.sliding_window(4), False, "document"),
    (masks.window(3, 1), False, "window"),
    (masks.window(-1, -1), False, "full"),
    (masks.document(IDS) & masks.window(3, 3), False, "document"),
    (masks.longformer(4, [0]), True, "longformer"),
    (masks.bigbird(4, [0]), False, "bigbird"),
    (masks.prefix_lm(3), False, "prefix_lm"),
    (masks.prefix_lm(3) & masks.causal, False, "prefix_lm"),
    (masks.strided(4), False, "strided"),
    (masks.fixed(4, 1), True, "fixed"),
    (masks.dilated(8, 2), False, "dilated"),
    (masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 8), False, "block_sparse"),
    (torch.ones(16, 16, dtype=torch.bool), False, "tensor"),
    (lambda b, h, q, k: q >= k, False, "predicate"),
    (masks.sliding_window(8) | masks.prefix_lm(2), False, "composite"),
])
def test_pattern_kind(mask, causal, kind):
    assert dispatch.pattern_kind(mask, causal) == kind


def test_pattern_kind_of_block_mask():
    bm = masks.longformer(4, [0]).block_mask(32)
    assert dispatch.pattern_kind(bm, False) == "longformer"


def test_signature_pass_follows_autograd():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    assert dispatch.signature(q, k, v, causal=True) == dispatch.Signature("cpu", "float32", 16, "causal", "fwd")
    q.requires_grad_()
    assert dispatch.signature(q, k, v).mode == "fwdbwd"
    with torch.no_grad():
        assert dispatch.signature(q, k, v).mode == "fwd"


TABLE = {"measured": {"device": "test"}, "entries": [
    {"capability": "sm90", "dtype": "bfloat16", "head_dim": 128, "pattern": "causal", "mode": "fwd",
     "ranking": [["fa4", 1.0], ["triton", 1.2]]},
    {"capability": "sm90", "dtype": "bfloat16", "head_dim": 64, "pattern": "causal", "mode": "fwd",
     "ranking": [["triton", 0.5], ["fa4", 0.6]]},
    {"capability": "sm90", "dtype": "bfloat16", "head_dim": 128, "pattern": "strided", "mode": "fwd",
     "ranking": [["triton", 1.0], ["fa4", 9.0]]},
]}


def _sig(head_dim=128, pattern="causal", mode="fwd", dtype="bfloat16", cap="sm90"):
    return dispatch.Signature(cap, dtype, head_dim, pattern, mode)


@pytest.mark.parametrize("sig,order,rule", [
    (_sig(), ["fa4", "triton"], "exact"),
    (_sig(64), ["triton", "fa4"], "exact"),
    (_sig(96), ["triton", "fa4"], "nearest sm90/bfloat16/d64/causal/fwd"),      # a tie: the smaller head_dim
    (_sig(80), ["triton", "fa4"], "nearest sm90/bfloat16/d64/causal/fwd"),
    (_sig(256, dtype="float16"), ["fa4", "triton"], "nearest sm90/bfloat16/d128/causal/fwd"),
    (_sig(dtype="float32"), ["fa4", "cudnn", "triton", "reference"], "unmeasured"),
    (_sig(mode="fwdbwd"), ["fa4", "cudnn", "triton", "reference"], "unmeasured"),
    (_sig(pattern="window"), ["fa4", "cudnn", "triton", "reference"], "unmeasured"),
    (_sig(cap="sm100"), ["fa4", "cudnn", "triton", "reference"], "unmeasured"),
    (_sig(pattern="dilated"), ["triton", "fa4", "cudnn", "reference"], "unmeasured"),
    (_sig(pattern="composite"), ["triton", "fa4", "cudnn", "reference"], "unmeasured"),
    (_sig(pattern="strided", mode="fwdbwd"), ["triton", "fa4", "cudnn", "reference"], "unmeasured"),
])
def test_table_ranking_rule(sig, order, rule):
    assert dispatch.Table(TABLE).ranking(sig) == (order, rule)


@pytest.fixture
def gpu_like(monkeypatch):
    """CPU tensors that dispatch sees as sm90 tensors; ``runnable`` says which backends can run."""
    runnable = {"triton", "fa4", "reference"}
    monkeypatch.setattr(dispatch, "capability", lambda device: "sm90")

    def reason(backend, q, k, v, **kw):
        return None if backend in runnable else f"{backend} stubbed out"

    monkeypatch.setattr(dispatch, "unsupported_reason", reason)
    monkeypatch.setattr(dispatch, "table", lambda: dispatch.Table(TABLE))
    return runnable


def _bf16(d=128):
    return [torch.randn(1, 8, 2, d, dtype=torch.bfloat16) for _ in range(3)]


def test_choose_follows_the_measurement(gpu_like):
    assert dispatch.choose(*_bf16(), causal=True) == "fa4"
    assert dispatch.choose(*_bf16(64), causal=True) == "triton"
    assert dispatch.choose(*_bf16(), mask=masks.strided(4)) == "triton"


def test_choose_skips_what_cannot_run(gpu_like):
    gpu_like.discard("fa4")
    assert dispatch.choose(*_bf16(), causal=True) == "triton"
    gpu_like.discard("triton")
    assert dispatch.choose(*_bf16(), causal=True) == "reference"


def test_choose_unmeasured_by_pattern(gpu_like):
    """Unmeasured: FA4 first where its route is checked and gathers nothing, the own kernel (and its planner)
    first for scattered keys; each falls back to the other."""
    assert dispatch.choose(*_bf16(), mask=masks.longformer(4, [0])) == "fa4"
    assert dispatch.choose(*_bf16(), mask=masks.fixed(8, 2)) == "triton"
    gpu_like.discard("fa4")
    assert dispatch.choose(*_bf16(), mask=masks.longformer(4, [0])) == "triton"
    gpu_like.add("fa4")
    gpu_like.discard("triton")
    assert dispatch.choose(*_bf16(), mask=masks.fixed(8, 2)) == "fa4"


def test_choose_logs_its_choice(gpu_like, caplog):
    with caplog.at_level(logging.DEBUG, logger="subquad"):
        gpu_like.discard("fa4")
        dispatch.choose(*_bf16(), causal=True)
    msg = caplog.records[-1].getMessage()
    assert "auto -> triton" in msg and "sm90/bfloat16/d128/causal/fwd" in msg and "skipped fa4" in msg


def test_cpu_always_runs_the_reference():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    for dtype in (torch.float32, torch.bfloat16):
        t = [x.to(dtype) for x in (q, k, v)]
        assert dispatch.choose(*t, causal=True) == "reference"
        assert dispatch.choose(*t, mask=masks.longformer(4, [0])) == "reference"
    assert "CUDA" in dispatch.unsupported_reason("triton", q, k, v)
    assert dispatch.unsupported_reason("fa4", q, k, v) is not None
    assert "CUDA" in dispatch.unsupported_reason("cudnn", q, k, v)
    with pytest.raises(ValueError, match="backend"):
        dispatch.unsupported_reason("xformers", q, k, v)


def test_fa4_refusals_are_specific(monkeypatch):
    """What FA4 cannot run, with a reason, on an sm90 stub (no GPU needed: no kernel runs)."""
    monkeypatch.setattr(fa4, "is_installed", lambda: True)
    monkeypatch.setattr(fa4, "_arch", lambda index: 90)
    q, k, v = (torch.randn(1, 16, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert fa4.unsupported_reason(q, k, v, causal=True) is None
    assert fa4.unsupported_reason(q, k, v, mask=masks.longformer(4, [0])) is None
    assert "ALiBi" in fa4.unsupported_reason(q, k, v, alibi_slopes=torch.ones(2))
    assert "mask_mod" in fa4.unsupported_reason(q, k, v, mask=lambda b, h, qq, kk: qq >= kk)
    assert "fp16/bf16" in fa4.unsupported_reason(*(t.float() for t in (q, k, v)))
    wide = [torch.randn(1, 16, 2, 256, dtype=torch.bfloat16) for _ in range(3)]
    assert fa4.unsupported_reason(*wide, causal=True) is None
    assert "head_dim=256" in fa4.unsupported_reason(*wide, mask=masks.prefix_lm(4))
    odd = [torch.randn(1, 16, 2, 60, dtype=torch.bfloat16) for _ in range(3)]
    assert "head_dim=60" in fa4.unsupported_reason(*odd)
    monkeypatch.setattr(fa4, "_arch", lambda index: 80)
    assert "sm80" in fa4.unsupported_reason(q, k, v)
    monkeypatch.setattr(fa4, "_arch", lambda index: 100)
    assert fa4.unsupported_reason(q, k, v, mask=masks.sliding_window(4)) is None
    assert "sm90" in fa4.unsupported_reason(q, k, v, mask=masks.prefix_lm(4))


def test_choose_takes_cudnn_for_dense_when_measured_or_fa4_is_missing(gpu_like, monkeypatch):
    gpu_like.add("cudnn")
    assert dispatch.choose(*_bf16(), mask=None) == "fa4"                    # unmeasured dense: FA4 first
    gpu_like.discard("fa4")
    assert dispatch.choose(*_bf16(), mask=None) == "cudnn"                  # then cuDNN, before the own kernel
    measured = {"measured": {}, "entries": [
        {"capability": "sm90", "dtype": "bfloat16", "head_dim": 128, "pattern": "full", "mode": "fwd",
         "ranking": [["cudnn", 1.6], ["fa4", 1.7], ["triton", 2.4]]}]}
    gpu_like.add("fa4")
    monkeypatch.setattr(dispatch, "table", lambda: dispatch.Table(measured))
    assert dispatch.choose(*_bf16(), mask=None) == "cudnn"
    assert dispatch.choose(*_bf16(), mask=None, return_lse=True) == "cudnn"   # the stub runs anything
    gpu_like.discard("cudnn")
    assert dispatch.choose(*_bf16(), mask=None) == "fa4"


def test_choose_is_memoised_per_pattern_and_call(gpu_like, monkeypatch):
    """One table: the second identical call is a lookup; another pattern object, shape or pass decides anew."""
    measured = dispatch.Table(TABLE)
    monkeypatch.setattr(dispatch, "table", lambda: measured)
    asked = []
    reason = dispatch.unsupported_reason
    monkeypatch.setattr(dispatch, "unsupported_reason", lambda b, *a, **kw: asked.append(b) or reason(b, *a, **kw))
    window = masks.sliding_window(4)
    q, k, v = _bf16()
    assert dispatch.choose(q, k, v, mask=window) == "fa4" and asked == ["fa4"]
    assert dispatch.choose(q, k, v, mask=window) == "fa4" and asked == ["fa4"]
    dispatch.choose(q, k, v, mask=masks.sliding_window(4))
    dispatch.choose(*_bf16(64), mask=window)
    dispatch.choose(q.requires_grad_(), k, v, mask=window)
    assert len(asked) == 4
    gpu_like.discard("fa4")                               # a choice stays made for its table's lifetime ...
    assert dispatch.choose(q, k, v, mask=window) == "fa4"
    monkeypatch.setattr(dispatch, "table", lambda: dispatch.Table(TABLE))
    assert dispatch.choose(q, k, v, mask=window) == "triton"   # ... and a reloaded table decides anew


def test_attention_prepares_a_call_once_per_call_facts(monkeypatch):
    """A repeated call runs the prepared call (no checks, no choice); another shape, option or pattern object
    prepares anew; a bad argument after a good call still gets its ValueError; a reloaded table starts empty."""
    measured = dispatch.Table()
    monkeypatch.setattr(dispatch, "table", lambda: measured)
    chose = []
    choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *a, **kw: chose.append(1) or choose(*a, **kw))
    window = masks.sliding_window(4)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    first = subquad.attention(q, k, v, mask=window)
    assert len(chose) == 1 and len(measured.prepared) == 1
    torch.testing.assert_close(subquad.attention(q, k, v, mask=window), first, rtol=0, atol=0)
    assert len(chose) == 1
    subquad.attention(q, k, v, mask=masks.sliding_window(4))
    subquad.attention(q[:, :4], k, v, mask=window)
    subquad.attention(q, k, v, mask=window, softcap=5.0)
    out, lse = subquad.attention(q, k, v, mask=window, return_lse=True)
    assert len(chose) == 5 and len(measured.prepared) == 5
    torch.testing.assert_close(out, first)
    with pytest.raises(ValueError, match="scale"):
        subquad.attention(q, k, v, mask=window, scale=[1.0])
    with pytest.raises(ValueError, match="k: expected head_dim"):
        subquad.attention(q, k[..., :8], v, mask=window)
    measured = dispatch.Table()
    subquad.attention(q, k, v, mask=window)
    assert len(chose) == 6
    monkeypatch.setattr(subquad.ops.softmax, "PREPARED_CALLS", 3)
    for _ in range(5):                       # a new pattern object per call: the oldest entries go
        subquad.attention(q, k, v, mask=masks.sliding_window(4))
    assert len(measured.prepared) == 3


def test_cudnn_refusals_are_specific(monkeypatch):
    from subquad.ops.softmax import cudnn

    q, k, v = (torch.randn(1, 16, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    assert "CUDA" in cudnn.unsupported_reason(q, k, v)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert "fp16/bf16" in cudnn.unsupported_reason(*(t.float() for t in (q, k, v)))
    assert "mask pattern" in cudnn.unsupported_reason(q, k, v, mask=masks.sliding_window(4))
    assert "softcap" in cudnn.unsupported_reason(q, k, v, softcap=30.0)
    assert "ALiBi" in cudnn.unsupported_reason(q, k, v, alibi_slopes=torch.ones(2))
    assert "log-sum-exp" in cudnn.unsupported_reason(q, k, v, return_lse=True)
    assert "seq_q == seq_kv" in cudnn.unsupported_reason(q[:, :8], k, v, causal=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal,hkv", [(False, 4), (True, 4), (True, 1)])
def test_cudnn_backend_matches_the_reference(causal, hkv):
    from subquad.ops.softmax import cudnn

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 300, hkv, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    if cudnn.unsupported_reason(q, k, v, causal=causal) is not None:
        pytest.skip(cudnn.unsupported_reason(q, k, v, causal=causal))
    out = subquad.attention(q, k, v, causal=causal, backend="cudnn")
    ref = subquad.attention(*(t.float() for t in (q, k, v)), causal=causal, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(subquad.attention(qf, kf, vf, causal=causal).square().sum(), (qf, kf, vf))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=5e-2 * want.abs().max().item(), rtol=0)


def _row(impl, ms, pattern="causal", mode="fwd", seqlen=4096, err=1e-3, **kw):
    row = {"impl": impl, "ms": ms, "max_err": err, "capability": "sm90", "dtype": "bfloat16", "head_dim": 128,
           "pattern": pattern, "mode": mode, "batch": 1, "seqlen": seqlen, "device": "H100", "date": "d"}
    row.update(kw)
    return row


def test_build_table_from_bench_rows():
    rows = [
        _row("subquad-triton", 1.2), _row("subquad-fa4", 1.0), _row("cudnn", 0.9), _row("subquad-auto", 1.0),
        _row("subquad-triton", 2.0, pattern="strided"), _row("subquad-fa4", 30.0, pattern="strided"),
        # a wrong result never enters the table, nor a row that failed
        _row("subquad-triton", 0.1, pattern="window", err=0.5), _row("subquad-fa4", 1.0, pattern="window"),
        {"impl": "subquad-fa4", "error": "RuntimeError: no", "capability": "sm90", "dtype": "bfloat16",
         "head_dim": 128, "pattern": "prefix_lm", "mode": "fwd", "batch": 1, "seqlen": 4096},
        _row("subquad-triton", 3.0, pattern="prefix_lm"),
        # two shapes: summed; a backend that failed one of them is not ranked on the sum
        _row("subquad-triton", 1.0, pattern="bigbird", seqlen=1024), _row("subquad-fa4", 0.5, pattern="bigbird",
                                                                          seqlen=1024),
        _row("subquad-triton", 4.0, pattern="bigbird", seqlen=8192), _row("subquad-fa4", 4.8, pattern="bigbird",
                                                                          seqlen=8192),
        _row("subquad-triton", 1.0, pattern="document", seqlen=1024),
        _row("subquad-fa4", 0.1, pattern="document", seqlen=1024),
        _row("subquad-triton", 3.0, pattern="document", seqlen=8192),
    ]
    data = dispatch.build_table(rows, source="x.json")
    table = dispatch.Table(data)
    assert data["measured"]["source"] == "x.json" and data["measured"]["device"] == "H100"
    assert table.ranking(_sig())[0] == ["fa4", "triton"]
    assert table.ranking(_sig(pattern="strided"))[0] == ["triton", "fa4"]
    assert table.ranking(_sig(pattern="window"))[0] == ["fa4"]
    assert table.ranking(_sig(pattern="prefix_lm"))[0] == ["triton"]
    assert table.ranking(_sig(pattern="bigbird"))[0] == ["triton", "fa4"]        # 5.0 ms vs 5.3 ms in all
    assert table.ranking(_sig(pattern="document"))[0] == ["triton"]
    assert json.loads(json.dumps(data)) == data


def test_merged_table_replaces_only_what_the_new_run_measured(tmp_path):
    """``--merge``: a run of two cases replaces those signatures (with its own provenance on them) and keeps the
    others with the base table's."""
    base = dispatch.build_table([_row("subquad-fa4", 1.0), _row("subquad-triton", 2.0)]
                                + [_row(impl, ms, pattern="bigbird") for impl, ms in
                                   (("subquad-fa4", 1.0), ("subquad-flex", 2.0), ("subquad-triton", 3.0))],
                                source="old.json")
    rows = [dict(_row("subquad-triton", 1.5, pattern="bigbird"), device="H200"),
            dict(_row("subquad-flex", 2.0, pattern="bigbird"), device="H200")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(rows))
    dispatch._main([str(tmp_path / "new.json"), str(path), "--merge"])
    merged = json.loads(path.read_text())
    table = dispatch.Table(merged)
    assert table.ranking(_sig(pattern="bigbird"))[0] == ["triton", "flex"]
    assert table.ranking(_sig())[0] == ["fa4", "triton"]
    by_pattern = {e["pattern"]: e for e in merged["entries"]}
    assert by_pattern["bigbird"]["measured"]["device"] == "H200" and "measured" not in by_pattern[_sig().pattern]
    assert merged["measured"]["source"] == "old.json"


def test_shipped_table_is_valid():
    table = dispatch.Table.load()
    for sig, ranking in table.entries.items():
        assert sig.mode in ("fwd", "fwdbwd") and sig.capability.startswith("sm")
        # flex is in no unmeasured order (dispatch.BACKENDS) but may be ranked by a measurement
        assert ranking and all(name in (*dispatch.BACKENDS, "flex") for name, _ in ranking)
        assert [ms for _, ms in ranking] == sorted(ms for _, ms in ranking)


def test_available_backends_here():
    assert dispatch.available_backends("cpu") == ["reference"]
    assert subquad.available_backends() == dispatch.available_backends()


def test_import_without_fa4_or_triton_kernels():
    """``import subquad`` and the chooser work when flash_attn cannot be imported at all."""
    code = ("import sys; sys.modules['flash_attn'] = None\n"
            "import torch, subquad\n"
            "from subquad.ops.softmax import dispatch, fa4\n"
            "assert not fa4.is_installed() and dispatch.available_backends('cpu') == ['reference']\n"
            "q = torch.randn(1, 8, 2, 16)\n"
            "out = subquad.attention(q, q, q, causal=True)\n"
            "assert out.shape == q.shape\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_attention_backend_fa4_refuses_with_a_reason():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="backend: 'fa4' cannot run this call: .*(not installed|CUDA)"):
        subquad.attention(q, q, q, backend="fa4")


def test_attention_auto_logs_its_choice(caplog):
    q = torch.randn(1, 8, 2, 16)
    with caplog.at_level(logging.DEBUG, logger="subquad"):
        out = subquad.attention(q, q, q, mask=masks.sliding_window(4))
    assert any("auto -> reference for cpu/float32/d16/window/fwd" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, subquad.attention(q, q, q, mask=masks.sliding_window(4), backend="reference"))


@pytest.mark.parametrize("backend", ["fa4", "cudnn"])
def test_deterministic_is_refused_by_backends_without_it(backend):
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="deterministic: only the Triton and reference"):
        subquad.attention(q, q, q, backend=backend, deterministic=True)
    out = subquad.attention(q, q, q, deterministic=True)          # auto: the reference here, Triton on a GPU
    assert out.shape == q.shape


@pytest.fixture
def torch_deterministic():
    """``torch.use_deterministic_algorithms``: a function setting it (``warn_only`` too), restored afterwards."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


def test_deterministic_follows_torch(torch_deterministic):
    """``deterministic=None`` takes ``torch.use_deterministic_algorithms``: a backend without a deterministic
    backward is refused, or in warn-only mode warned about; ``False`` overrides it."""
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    torch_deterministic(True)
    with pytest.raises(ValueError, match="asked by torch.use_deterministic_algorithms"):
        subquad.attention(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="backend: 'cudnn' cannot run"):       # (no cuDNN on the CPU)
        subquad.attention(q, q, q, backend="cudnn", deterministic=False)
    torch_deterministic(True, warn_only=True)
    with pytest.warns(UserWarning, match="deterministic: only the Triton"), \
            pytest.raises(ValueError, match="backend: 'cudnn' cannot run"):
        subquad.attention(q, q, q, backend="cudnn")



def test_available_backends_without_cuda_is_the_reference():
    """Asked for a CUDA device on a machine without one, it listed triton and flex, which cannot run here."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert subquad.available_backends("cuda") == ["reference"]

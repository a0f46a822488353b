"""The benchmark harness and the `subquad bench` command (a quick run; speed is measured, not tested)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from subquad import masks
from subquad.bench import Case, attention_flops, run_cases
from subquad.bench.attention_cases import attention_case, exact_rows, sample_rows
from subquad.cli import app
from subquad.ops.grid import interpreting

REQUIRED = {"case", "impl", "mode", "batch", "seqlen", "heads_q", "heads_kv", "head_dim", "dtype", "ms", "tflops",
            "gbps", "peak_mem_mb", "max_err", "device", "versions", "date"}


def test_bench_command_writes_table_json_and_plots(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--suite", "cpu-patterns", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["case"] for r in rows} >= {"causal", "window256", "strided256"}
    for r in rows:
        assert "error" not in r, r
        assert REQUIRED <= r.keys()
        assert r["ms"] > 0 and r["tflops"] > 0
        assert r["max_err"] < 1e-4  # fp32 reference vs fp64 exact rows
        assert r["max_rel_err"] is not None and r["max_rel_err"] <= r["max_err"] / 1e-3   # |ref| > 1e-3 here
    assert (tmp_path / "bench-fwd.png").stat().st_size > 10_000
    assert "window256" in result.output


def test_unknown_suite_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--suite", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown suite" in result.output


def test_failing_impl_is_a_row_not_a_crash():
    def broken(inputs):
        raise RuntimeError("not installed here")

    case = attention_case("causal", masks.causal, "fwdbwd", batch=1, seqlen=64, heads_q=2, heads_kv=1, head_dim=16,
                          dtype=torch.float32,
                          impls={"ok": lambda x: torch.nn.functional.scaled_dot_product_attention(
                              x["q"].transpose(1, 2), x["k"].repeat_interleave(2, 2).transpose(1, 2),
                              x["v"].repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2),
                                 "broken": broken})
    rows = run_cases([case], torch.device("cpu"))
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["broken"]["error"].startswith("RuntimeError: not installed")
    assert by_impl["ok"]["max_err"] < 1e-5
    assert by_impl["ok"]["tflops"] == pytest.approx(attention_flops(1, 2, 64 * 65 / 2, 16, "fwdbwd")
                                                    / (by_impl["ok"]["ms"] * 1e-3) / 1e12, rel=1e-3)


def test_cuda_rounds_report_the_median_and_keep_the_rounds():
    """The interleaved rounds (CUDA): each implementation's median of rounds, its throughput from that
    median, and an implementation whose later round fails keeps the rounds that ran."""
    from subquad.bench.harness import _more_rounds

    case = attention_case("causal", masks.causal, "fwd", batch=1, seqlen=64, heads_q=2, heads_kv=2, head_dim=16,
                          dtype=torch.float32, impls={})
    rows = {"a": {"ms": 5.0}, "b": {"ms": 1.0}}
    times = {"a": iter([1.0, 1.2]), "b": iter([1.1])}

    def timer(call, leaves):
        return next(times[call])

    x = torch.zeros(1, requires_grad=True)
    x.grad = torch.ones(1)
    _more_rounds(case, rows, {"a": ("a", [x], [5.0]), "b": ("b", [], [1.0])}, 3, timer)
    assert rows["a"]["ms"] == 1.2 and rows["a"]["ms_rounds"] == [5.0, 1.0, 1.2]     # a slow first round
    assert rows["a"]["tflops"] == pytest.approx(case.flops / 1.2e-3 / 1e12, rel=1e-4)
    assert rows["b"]["ms_rounds"] == [1.0, 1.1] and rows["b"]["ms"] == pytest.approx(1.05)   # round 3 failed
    assert x.grad is None
    assert "ms_calls" not in rows["a"]          # one time per round: nothing more to summarise


def test_cuda_rounds_take_each_rounds_median_and_pool_the_calls():
    """A timer that returns every call's time (do_bench's ``all``, CUDA): the round's figure is the median
    of its calls, and the calls of every round are pooled into ``ms_calls``."""
    from subquad.bench.harness import _more_rounds

    case = attention_case("causal", masks.causal, "fwd", batch=1, seqlen=64, heads_q=2, heads_kv=2, head_dim=16,
                          dtype=torch.float32, impls={})
    first = [3.6, 3.9, 3.6]
    rows = {"fa4": {"ms": 3.6}}
    later = iter([[3.9, 3.9, 3.6], [3.6, 3.6, 3.9, 3.9, 3.6]])
    _more_rounds(case, rows, {"fa4": ("fa4", [], first)}, 3, lambda call, leaves: next(later))
    assert rows["fa4"]["ms_rounds"] == [3.6, 3.9, 3.6] and rows["fa4"]["ms"] == 3.6
    calls = rows["fa4"]["ms_calls"]
    assert calls["n"] == 11 and calls["p50"] == 3.6 and calls["p10"] == 3.6 and calls["p90"] == 3.9


def test_rounds_rotate_the_order_with_the_collector_paused():
    """Each round starts one implementation further on, so that no implementation always follows the same one
    (in the H100 backends runs, identical FA4 calls timed as different implementations differed by 4-5%),
    and run_cases times with Python's cyclic collector off, turning it back on after."""
    import gc

    from subquad.bench.harness import _gc_paused, _more_rounds

    case = attention_case("causal", masks.causal, "fwd", batch=1, seqlen=64, heads_q=2, heads_kv=2, head_dim=16,
                          dtype=torch.float32, impls={})
    visits = []

    def timer(call, leaves):
        visits.append((call, gc.isenabled()))
        return 1.0

    rows = {n: {"ms": 1.0} for n in "abc"}
    with _gc_paused():
        _more_rounds(case, rows, {n: (n, [], [1.0]) for n in "abc"}, 4, timer)
    assert "".join(v for v, _ in visits) == "bca" + "cab" + "abc"
    assert not any(on for _, on in visits) and gc.isenabled()


def test_exact_rows_matches_dense_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 50, 2, 8) for _ in range(3))
    rows = sample_rows(50, 7)
    ref = exact_rows(masks.sliding_window(5), rows)({"q": q, "k": k, "v": v})
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 8 ** -0.5
    keep = masks.sliding_window(5).to_dense(50)[0, 0]
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    dense = torch.einsum("bhqk,bkhd->bqhd", p, v.double())
    torch.testing.assert_close(ref, dense[:, rows])


def test_case_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        Case(case="x", mode="sideways", batch=1, seqlen=1, heads_q=1, heads_kv=1, head_dim=1, dtype=torch.float32,
             make_inputs=dict, impls={})


def test_ratio_table_and_readme_block(tmp_path):
    from subquad.bench.summary import ratio_table, rewrite_block

    base = {"case": "causal", "batch": 2, "seqlen": 4096, "mode": "fwd", "device": "GPU X", "date": "2026-01-01",
            "versions": {"torch": "2.x"}}
    rows = [dict(base, impl="ours", ms=2.0, tflops=100.0, max_err=1e-3), dict(base, impl="peer", ms=3.0),
            dict(base, impl="broken", error="RuntimeError"),
            dict(base, seqlen=8192, impl="ours", ms=1.0, max_err=2.0, max_rel_err=4.3e-3)]
    text = ratio_table(rows, "ours")
    assert "| causal | 2×4k | fwd | 2.000 | 100 | 1.50 | 1.0e-03 |" in text
    assert "| causal | 2×8k | fwd | 1.000 |  | — | 2.0e+00 (4.3e-03 rel.) |" in text
    assert "broken" not in text and "GPU X" in text
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:x:begin -->\nold\n<!-- bench:x:end -->\nb\n")
    rewrite_block(readme, "x", text)
    body = readme.read_text()
    assert "old" not in body and "1.50" in body and body.startswith("a\n") and body.endswith("b\n")
    with pytest.raises(ValueError, match="readme"):
        rewrite_block(readme, "missing", text)


def test_report_puts_several_runs_in_one_table(tmp_path, monkeypatch):
    """Each run's rows keep their own ratios (peer and ours from the same file); the block names both files."""
    base = {"case": "gla", "mode": "fwd", "device": "GPU X", "date": "2026-01-01", "versions": {"torch": "2.x"}}
    runs = [[dict(base, batch=batch, seqlen=n, impl="ours", ms=1.0),
             dict(base, batch=batch, seqlen=n, impl="fla", ms=fla)]
            for batch, n, fla in ((4, 8192, 2.0), (16, 2048, 3.0))]
    paths = []
    for i, rows in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(rows))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("<!-- bench:t:begin -->\n<!-- bench:t:end -->\n")
    result = CliRunner().invoke(app, ["report", *map(str, paths), "--ours", "ours", "--readme-block", "t"])
    assert result.exit_code == 0, result.output
    body = (tmp_path / "README.md").read_text()
    assert "| gla | 4×8k | fwd | 1.000 |  | 2.00 |" in body and "| gla | 16×2k | fwd | 1.000 |  | 3.00 |" in body
    assert "run0.json" in body and "run1.json" in body
    # a block kept in another file (benchmarks/HISTORY.md's superseded runs) is rewritten there, README untouched
    (tmp_path / "HISTORY.md").write_text("<!-- bench:t:begin -->\n<!-- bench:t:end -->\n")
    result = CliRunner().invoke(app, ["report", str(paths[0]), "--ours", "ours", "--readme-block", "t",
                                      "--into", "HISTORY.md"])
    assert result.exit_code == 0, result.output
    history = (tmp_path / "HISTORY.md").read_text()
    assert "run0.json" in history and "run1.json" not in history
    assert (tmp_path / "README.md").read_text() == body


def test_mamba_peer_inputs_are_the_ssd_case():
    """The mamba-ssm peer's ``(x, dt, A, B, C)`` describe the suite's SSD case: Mamba-2's definition
    (``subquad.ssd``, checked against the recurrence elsewhere) on them equals ``gla(q, k, v, g)``."""
    import torch.nn.functional as F

    import subquad
    from subquad.bench.peers import mamba_ssd_inputs

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    g = F.logsigmoid(torch.randn(2, 40, 4, generator=gen, dtype=torch.float64) + 4.0)
    want = subquad.gla(q, k, v, g, backend="reference")
    x, dt, a, b, c = mamba_ssd_inputs(q, k, v, g, 16 ** -0.5)
    assert bool((dt > 0).all()) and bool((a < 0).all())
    torch.testing.assert_close(subquad.ssd(x, dt, a, b, c, backend="reference"), want)


def test_mamba_peer_imports_the_triton_ssd_without_the_package_init(tmp_path, monkeypatch):
    """mamba-ssm's ``__init__`` loads CUDA extensions a source copy lacks; the peer reaches the Triton SSD
    module without running it."""
    import sys

    from subquad.bench import peers

    root = tmp_path / "mamba_ssm"
    (root / "ops" / "triton").mkdir(parents=True)
    (root / "__init__.py").write_text("import selective_scan_cuda_that_is_not_here\n")
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "ssd_combined.py").write_text("mamba_chunk_scan_combined = 'the triton ssd'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        assert peers._mamba_chunk_scan() == "the triton ssd"
    finally:
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[name]


def test_linear_summary_takes_fla_faster_form_and_the_growth():
    """The linear suite's ratios are against fla's faster form that ran (chunk or fused_chunk, an error row
    being no form), the 8k -> 64k growth is taken at B = 1, and the crossover is the smallest T that beats SDPA."""
    from subquad.bench.suites.linear import summarize

    def row(case, b, t, mode, impl, ms=None):
        r = {"case": case, "batch": b, "seqlen": t, "mode": mode, "impl": impl, "tokens": b * t}
        return {**r, "ms": ms} if ms is not None else {**r, "error": "RuntimeError: refused"}

    rows = [row("ssd", 4, 8192, "fwd", "subquad-triton", 1.0), row("ssd", 4, 8192, "fwd", "fla", 2.0),
            row("ssd", 4, 8192, "fwd", "fla-fused", 3.0),
            row("ssd", 4, 8192, "fwdbwd", "subquad-triton", 2.0), row("ssd", 4, 8192, "fwdbwd", "fla"),
            row("ssd", 4, 8192, "fwdbwd", "fla-fused", 5.0),
            row("gla", 1, 8192, "fwd", "subquad-triton", 1.0), row("gla", 1, 65536, "fwd", "subquad-triton", 8.5),
            row("gla", 16, 2048, "fwdbwd", "subquad-triton", 3.0),
            row("sdpa-causal", 16, 2048, "fwdbwd", "sdpa-flash", 2.0),
            row("gla", 4, 8192, "fwdbwd", "subquad-triton", 3.0), row("sdpa-causal", 4, 8192, "fwdbwd", "sdpa-flash", 9.0)]
    out = summarize(rows)
    assert out["vs_fla"] == {"ssd 4x8192 fwd": 2.0, "ssd 4x8192 fwdbwd": 2.5}
    assert out["scaling_8k_to_64k"] == {"gla fwd": 8.5}
    assert out["crossover_fwdbwd"] == {"gla": 8192, "ssd": 8192}     # gla loses at 2k
    assert out["mtok_s"]["ssd 4x8192 fwd subquad-triton"] == 32.77


def test_report_and_bench_refuse_what_would_print_nothing(tmp_path, monkeypatch):
    """A name that matches no implementation gave an empty table (``report`` after ``make bench``, whose rows
    are subquad-reference) or an empty bench.json; a profiling JSON, a missing block or an --out that is a
    file gave tracebacks, the last one after the whole run."""
    rows = [{"case": "c", "mode": "fwd", "seqlen": 1024, "batch": 1, "impl": name, "ms": 1.0}
            for name in ("subquad-reference", "peer")]
    good, other = tmp_path / "rows.json", tmp_path / "sweep.json"
    good.write_text(json.dumps(rows))
    other.write_text(json.dumps({"rows": [], "command": "sweep"}))
    runner = CliRunner()
    for args, hint in ((["report", str(good)], "--ours"),
                       (["report", str(good), "--ours", "subquad-reference", "--peer", "pear"], "--peer"),
                       (["report", str(other)], "RESULTS"),
                       (["report", str(good), "--ours", "peer", "--readme-block", "nope"], "--readme-block"),
                       (["bench", "--quick", "--suite", "cpu-patterns", "--impl", "zzz", "-o", str(tmp_path)],
                        "--impl"),
                       (["bench", "--quick", "-o", str(good)], "--out")):
        monkeypatch.chdir(tmp_path)
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and hint in result.output, (args, result.output)
    assert runner.invoke(app, ["report", str(good), "--ours", "subquad-reference"]).exit_code == 0


def test_fwdbwd_peak_memory_is_taken_after_a_first_backward(monkeypatch):
    """CUDA: the peak was taken on the first fwd+bwd call, whose backward an autotuned kernel tunes in (and
    Triton's tuner allocates a 256 MB flush buffer): autotuned implementations read 128-256 MB high."""
    from subquad.bench import harness

    events = []

    class Marked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            events.append("backward")
            return g * 2

    case = attention_case("causal", masks.causal, "fwdbwd", batch=1, seqlen=64, heads_q=2, heads_kv=2, head_dim=16,
                          dtype=torch.float32, impls={"marked": lambda x: Marked.apply(x["q"])})
    monkeypatch.setattr(harness, "_cuda_peak_mb", lambda call, device, leaves: events.append("peak") or 1.0)
    monkeypatch.setattr(harness, "_time_cuda", lambda call, leaves: [1.0])
    make_call = harness._make_call       # (its gradient is drawn on the device: the CPU stands in)
    monkeypatch.setattr(harness, "_make_call", lambda c, fn, i, device: make_call(c, fn, i, torch.device("cpu")))
    row = harness.measure(case, "marked", torch.device("cuda"), case.make_inputs("cpu"), None)
    assert "error" not in row, row
    assert events.index("peak") > events.index("backward")


def test_report_takes_no_ratio_across_runs(tmp_path):
    """Two files with the same (case, B, N, pass): one ratio would divide one run's time by another's (an H100
    peer by an H200 subquad, labelled with the first file's device)."""
    row = {"case": "c", "mode": "fwd", "seqlen": 1024, "batch": 1, "ms": 1.0, "device": "GPU X"}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps([dict(row, impl="ours")]))
    paths[1].write_text(json.dumps([dict(row, impl="peer", device="GPU Y")]))
    result = CliRunner().invoke(app, ["report", *map(str, paths), "--ours", "ours"])
    words = " ".join(result.output.replace("│", " ").split())       # (rich wraps the message in a box)
    assert result.exit_code == 2 and "in several files" in words, result.output


def test_dropout_suite_cases():
    """The dropout suite: causal and window rows at B*N = 32k, SDPA-flash beside the causal rows only, FLOPs of the
    kept pairs; its subquad implementations run (under TRITON_INTERPRET=1 or on a GPU) on a small input, the
    p = 0 one equal to plain attention."""
    from subquad import attention
    from subquad.bench.suites import dropout

    cases = list(dropout.dropout_cases(False))
    assert {(c.case, c.batch, c.seqlen) for c in cases} == {
        (name, b, n) for name in ("causal", "window4096") for b, n in ((8, 4096), (2, 16384))}
    for c in cases:
        assert ("sdpa-flash" in c.impls) == (c.case == "causal") and c.reference is None
    window16k = next(c for c in cases if c.case == "window4096" and c.seqlen == 16384 and c.mode == "fwd")
    pairs = 4096 * 4097 / 2 + (16384 - 4096) * 4096
    assert window16k.flops == pytest.approx(4 * 2 * 16 * pairs * 128)
    if not interpreting() and not torch.cuda.is_available():
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    inputs = {x: torch.randn(1, 64, 2, 32, generator=gen).to(dev, torch.float16) for x in "qkv"}
    plain = attention(inputs["q"], inputs["k"], inputs["v"], causal=True, window_size=(31, 0), backend="triton")
    assert torch.equal(dropout._subquad(0.0, 32)(inputs), plain)
    assert torch.isfinite(dropout._subquad(0.1, 32)(inputs)).all()


def test_dynamic_suite_cases():
    """The dynamic suite, as ``benchmarks/gpu/suite_run.py dynamic`` loads it: NSA (both compressions), top-k and
    the dense GQA baseline at B*N = 32k and 1 x 64k, LSH and its dense baseline at 2 x 16k and 1 x 64k; fla beside
    the compression it shares; a reference on every fwd case; FLOPs of the attended pairs (dense: causal)."""
    from subquad.bench.harness import load_suites

    dynamic = load_suites()["dynamic"]
    assert dynamic.device == "cuda"
    cases = list(dynamic.cases(False))
    gqa_shapes, lsh_shapes = {(4, 8192), (2, 16384), (1, 65536)}, {(2, 16384), (1, 65536)}
    expected = {(name, b, n, mode) for name in ("causal-gqa", "nsa", "nsa-cmp64", "topk-block")
                for b, n in gqa_shapes for mode in ("fwd", "fwdbwd")}
    expected |= {(name, b, n, mode) for name in ("causal", "lsh") for b, n in lsh_shapes for mode in ("fwd", "fwdbwd")}
    assert {(c.case, c.batch, c.seqlen, c.mode) for c in cases} == expected and len(cases) == len(expected)
    impls = {"causal-gqa": {"subquad-triton", "sdpa-flash"}, "causal": {"subquad-triton", "sdpa-flash"},
             "nsa": {"subquad-triton"}, "nsa-cmp64": {"subquad-triton", "fla", "fla+subquad-window"},
             "topk-block": {"subquad-triton"}, "lsh": {"subquad-triton"}}
    for c in cases:
        assert set(c.impls) == impls[c.case], c.case
        assert (c.heads_q, c.heads_kv) == ((16, 16) if c.case in ("lsh", "causal") else (64, 4))
        assert c.flops > 0 and 0 < c.extra["density"] <= 0.5 + 1e-3
        assert (c.reference is not None) == (c.mode == "fwd" or c.case.startswith("causal")), c.case
    by = {(c.case, c.batch, c.seqlen, c.mode): c for c in cases}
    nsa64k, dense64k = by[("nsa", 1, 65536, "fwd")], by[("causal-gqa", 1, 65536, "fwd")]
    assert dense64k.flops == pytest.approx(attention_flops(1, 64, 65536 * 65537 / 2, 128, "fwd"))
    assert 0.03 < nsa64k.flops / dense64k.flops < 0.2
    assert by[("nsa", 1, 65536, "fwdbwd")].flops == pytest.approx(3.5 * nsa64k.flops)
    assert {(c.case, c.batch, c.seqlen) for c in dynamic.cases(True)} >= {("nsa", 1, 4096), ("lsh", 1, 4096)}


def test_dynamic_suite_pairs_are_what_the_ops_attend(monkeypatch):
    """The FLOP counts' pairs equal those counted from the blocks the references select (top-k and NSA, at a
    size where selection leaves blocks out), with the compressed and window branches' keys added for NSA."""
    from subquad import nsa, topk_block_attention
    from subquad.bench.suites import dynamic

    monkeypatch.setattr(dynamic, "TOP_K", 3)
    monkeypatch.setattr(dynamic, "WINDOW", 80)
    n, block = 520, dynamic.BLOCK
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 16, generator=gen) for h in (4, 2, 2))
    t = torch.arange(n).view(1, n, 1, 1)

    def selected_keys(indices):
        """Keys up to each query in its selected blocks, per (batch, KV head) slice."""
        keys = torch.clamp(t - indices * block + 1, min=0, max=block)
        return torch.where(indices >= 0, keys, 0).sum().item() / indices.shape[2]

    _, picked = topk_block_attention(q, k, v, block=block, top_k=3, return_indices=True, backend="reference")
    assert dynamic.topk_pairs(n) == selected_keys(picked)
    gates = torch.rand(1, n, 4, 3, generator=gen)
    for compress_block, stride in (dynamic.PAPER_COMPRESSION, dynamic.FLA_COMPRESSION):
        _, picked = nsa(q, k, v, gates, block=block, compress_block=compress_block, compress_stride=stride, top_k=3,
                        window=80, return_indices=True, backend="reference")
        ends = torch.arange((n - compress_block) // stride + 1) * stride + compress_block - 1
        summaries = (ends.view(1, -1) <= torch.arange(n).view(-1, 1)).sum().item()
        window = torch.clamp(torch.arange(n) + 1, max=80).sum().item()
        assert dynamic.nsa_pairs(n, compress_block, stride) == summaries + selected_keys(picked) + window


def test_dynamic_suite_runs_its_cases_small(monkeypatch):
    """Each op's case at a small size in fp32 on the CPU (the impls' ``backend="triton"`` runs the reference
    there): the sampled-row references (each row's query cut off at its block's end) and LSH's whole-sequence one
    agree with the full call; without fla the fla rows are error rows."""
    import importlib.util

    from subquad.bench.suites import dynamic

    for name, value in (("DTYPE", torch.float32), ("HEADS_Q", 4), ("HEADS_KV", 2), ("LSH_HEADS", 2), ("DIM", 16),
                        ("TOP_K", 3), ("WINDOW", 80), ("LSH_CHUNK", 64)):
        monkeypatch.setattr(dynamic, name, value)
    n = 520
    cases = [dynamic._nsa_case("nsa-cmp64", dynamic.FLA_COMPRESSION,
                               {"subquad-triton": dynamic._nsa(dynamic.FLA_COMPRESSION), "fla": dynamic._fla,
                                "fla+subquad-window": dynamic._fla_subquad_window}, 2, n, "fwd"),
             dynamic._nsa_case("nsa", dynamic.PAPER_COMPRESSION,
                               {"subquad-triton": dynamic._nsa(dynamic.PAPER_COMPRESSION)}, 2, n, "fwd"),
             dynamic._topk_case(2, n, "fwd"), dynamic._topk_case(1, n, "fwdbwd"), dynamic._lsh_case(1, 512, "fwd"),
             dynamic._dense("causal-gqa", 1, n, 4, 2, "fwd")]
    rows = run_cases(cases, torch.device("cpu"), cpu_reps=1, cpu_rounds=1)
    for r in rows:
        if r["impl"].startswith("fla"):
            if importlib.util.find_spec("fla") is None:
                assert r["error"].startswith("ModuleNotFoundError"), r
            continue
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0
        assert (r["max_err"] is None) == (r["mode"] == "fwdbwd"), r
        if r["max_err"] is not None:
            assert r["max_err"] < 1e-5, r
    assert {(r["case"], r["impl"]) for r in rows} >= {("nsa", "subquad-triton"), ("lsh", "subquad-triton"),
                                                      ("causal-gqa", "sdpa-flash")}


def test_ratio_table_of_a_cpu_run_without_peers():
    """``make bench`` then ``subquad report --ours subquad-reference``: one implementation gave an empty column
    between TFLOP/s and max err, and the CPU's rates (below 1) printed as 0."""
    from subquad.bench.summary import ratio_table

    rows = [{"case": "causal", "batch": 1, "seqlen": 1024, "mode": "fwd", "impl": "subquad-reference", "ms": 160.7,
             "tflops": 0.00334, "max_err": 3.4e-7}]
    lines = ratio_table(rows, "subquad-reference").splitlines()
    assert lines[0] == "| case | B×N | pass | subquad-reference ms | TFLOP/s | max err |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| causal | 1×1k | fwd | 160.700 | 0.0033 | 3.4e-07 |"


def test_report_tells_two_bench_json_apart_by_their_path(tmp_path):
    """Two runs' files are both ``bench.json`` (``bench -o run1``, ``-o run2``): rows were told apart by the file's
    name, so a ratio was taken across the runs (an H100 time over an H200 one) and the H200 left the footnote."""
    row = {"case": "c", "mode": "fwd", "seqlen": 1024, "batch": 1, "ms": 1.0}
    for run, impl, device in (("run1", "ours", "GPU X"), ("run2", "peer", "GPU Y")):
        (tmp_path / run).mkdir()
        (tmp_path / run / "bench.json").write_text(json.dumps([dict(row, impl=impl, device=device)]))
    paths = [str(tmp_path / run / "bench.json") for run in ("run1", "run2")]
    result = CliRunner().invoke(app, ["report", *paths, "--ours", "ours"])
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "in several files" in words, result.output
    (tmp_path / "run2" / "bench.json").write_text(json.dumps([dict(row, impl="ours", seqlen=2048, device="GPU Y")]))
    result = CliRunner().invoke(app, ["report", *paths, "--ours", "ours"])
    assert result.exit_code == 0 and "GPU X" in result.output and "GPU Y" in result.output, result.output


def test_report_names_a_malformed_file_and_shows_where_ours_failed(tmp_path):
    """Invalid JSON was refused without the file's name; a string or zero time gave a traceback (or a division by
    zero); a row where ours failed was left out of the table without a word."""
    base = {"case": "c", "mode": "fwd", "seqlen": 1024, "batch": 1}
    files = {"broken.json": "[{", "text.json": json.dumps([dict(base, impl="ours", ms="1.0")]),
             "zero.json": json.dumps([dict(base, impl="ours", ms=0.0)])}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(app, ["report", str(tmp_path / name), "--ours", "ours"])
        # (rich's error box may break the path inside the file's name on a narrow terminal)
        letters = "".join(result.output.replace("│", "").split())
        assert result.exit_code == 2 and name in letters, result.output
    (tmp_path / "failed.json").write_text(json.dumps(
        [dict(base, impl="peer", ms=2.0), dict(base, impl="ours", error="OutOfMemoryError: CUDA out of memory"),
         dict(base, seqlen=2048, impl="peer", ms=4.0), dict(base, seqlen=2048, impl="ours", ms=1.0)]))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "failed.json"), "--ours", "ours"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2] == "| c | 1×1k | fwd | failed (OutOfMemoryError) |  | — |  |"
    assert lines[3] == "| c | 1×2k | fwd | 1.000 |  | 4.00 |  |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script's CPU check (on a GPU it profiles 16k)")
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_plan_profile_script_runs_on_the_cpu(tmp_path, mode):
    """``benchmarks/gpu/plan_profile.py`` without CUDA runs its steps on the reference engine at N = 1024 (its
    forward mode had called the planner's internals with their old signatures, found only on the device): one
    row per component, the merge and the whole call (fwd), or per pattern (fwd+bwd)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PLAN_PROFILE_PATTERNS="strided256,bigbird512+16+3x64",
               PYTHONPATH=str(root))
    args = [] if mode == "fwd" else ["1024", "1", "fwdbwd"]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu" / "plan_profile.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "plan_profile.json").read_text())["rows"]
    parts = [(r["pattern"], r["part"]) for r in rows]
    if mode == "fwd":
        assert parts == [(p, part) for p, roles in (("strided256", ("local", "columns")),
                                                    ("bigbird512+16+3x64", ("local", "blocks")))
                         for part in (*roles, "merge", "attention()")]
    else:
        assert [p for p, _ in parts] == ["strided256", "bigbird512+16+3x64"]
    assert all(r["ms"] > 0 for r in rows)

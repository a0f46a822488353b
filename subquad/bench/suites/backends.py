"""Backends suite (GPU): ``backend="auto"`` against each backend it chooses from and the peers, in one run.

Rows: ``subquad-auto`` (the chooser, dispatch overhead included), ``subquad-triton`` (the own kernels,
planner included), ``subquad-fa4`` (FlashAttention-4 through subquad's adapter), ``subquad-cudnn`` (SDPA's
cuDNN kernels through ``backend="cudnn"``, dense only), ``subquad-flex`` (FlexAttention on subquad's block
map through ``backend="flex"``, patterns only), ``fa4`` (FA4 called
directly with its arguments prepared outside the timed call: the peer), ``cudnn`` (SDPA's cuDNN backend,
dense only) and ``flex`` (FlexAttention compiled, patterns only: on dense it trails cuDNN, BENCHMARKS.md).

Cases, bf16, 16 heads, D = 128, fwd and fwd+bwd, in priority order (``run`` stops at a deadline):
dense causal and full at 8 x 4k; at 1 x 16k the causal sliding window 4096, packed documents (causal,
16 documents of uneven lengths), Longformer (window 512, 16 global tokens, causal), BigBird (window 512,
16 global tokens, 3 random blocks of 64, causal), prefix-LM (2048), a causal block-sparse layout (25% of
128 x 128 blocks) and the strided pattern (256; forward only) that FA4 can only mask block by block.

Each row's ``extra`` carries the signature fields (``capability``, ``pattern``) from which
``python -m subquad.ops.softmax.dispatch RESULTS.json`` builds the shipped dispatch table.

A device run: ``python -m subquad.bench.suites.backends --warm-only SECONDS`` compiles every case's kernels
in parallel processes (FA4's CuTe kernels and FlexAttention compile for tens of seconds each; their disk
caches then serve the timed run; set ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``), then
``python -m subquad.bench.suites.backends OUT --deadline SECONDS`` goes case by case: the chooser's
candidates, the dispatch table rebuilt from them and installed, then ``subquad-auto`` and the peers,
rewriting ``OUT/backends.json`` after each case (a run cut short keeps whole cases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ... import attention, masks
from ...ops.softmax import dispatch, fa4
from .. import peers
from ..attention_cases import attention_case
from ..harness import run_cases, suite

HEADS, DIM, DTYPE = 16, 128, torch.bfloat16
GLOBAL = list(range(16))
N_PATTERN = 16384


def _layout(n: int, density: float, seed: int = 0) -> torch.Tensor:
    nb = n // 128
    return torch.rand(nb, nb, generator=torch.Generator().manual_seed(seed)) < density


def _doc_ids(n: int, docs: int = 16, seed: int = 0) -> torch.Tensor:
    """Uneven document lengths (at least 256 tokens each) summing to ``n``."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(n // 256 - 1, generator=g)[:docs - 1] + 1).values * 256
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
    return torch.repeat_interleave(torch.arange(docs), lengths)


def _terms_of(pattern, kind):
    from ...masks.composition import Intersection, Union
    from ...masks.patterns import Named

    p = pattern
    while isinstance(p, Named):
        p = p.inner
    if isinstance(p, kind):
        return [p]
    if isinstance(p, (Union, Intersection)):
        return [t for part in p.parts for t in _terms_of(part, kind)]
    return []


def _random_layout(pattern, n, device) -> torch.Tensor:
    """BigBird's seeded random block layout, as the pattern draws it for ``n`` positions."""
    from ...masks.patterns import BlockLayout, BuildContext

    prepared = pattern.prepare(BuildContext(1, 1, n, n, torch.device(device)))
    return _terms_of(prepared, BlockLayout)[0].layout[0, 0].to(device)


def cases_spec(n: int = N_PATTERN):
    """name -> (pattern, causal flag, FlexAttention mask_mod factory ``(n, device) -> fn`` or None,
    ``cudnn``: SDPA can run it, shapes, modes)."""
    dense_shapes, shapes = [(8, 4096)], [(1, n)]
    ids = _doc_ids(n)
    bigbird = masks.bigbird(512, GLOBAL, random_blocks=3, block=64, seed=0, causal=True)
    layout = _layout(n, 0.25)

    def doc_mod(n, dev):
        d = ids.to(dev)
        return lambda b, h, q, k: (d[q] == d[k]) & (q >= k)

    def bigbird_mod(n, dev):
        lay = _random_layout(bigbird, n, dev)
        return lambda b, h, q, k: ((q - k < 512) | (k < 16) | (q < 16) | lay[q // 64, k // 64]) & (q >= k)

    def block_mod(n, dev):
        cells = layout.to(dev)
        return lambda b, h, q, k: cells[q // 128, k // 128] & (q >= k)

    both = ("fwd", "fwdbwd")
    return {
        "causal": (None, True, None, True, dense_shapes, both),
        "full": (None, False, None, True, dense_shapes, both),
        "window4096": (masks.sliding_window(4096), False,
                       lambda n, dev: (lambda b, h, q, k: (q >= k) & (q - k < 4096)), False, shapes, both),
        "document16": (masks.document(ids), True, doc_mod, False, shapes, both),
        "longformer512+16": (masks.longformer(512, GLOBAL, causal=True), False,
                             lambda n, dev: (lambda b, h, q, k: ((q - k < 512) | (k < 16) | (q < 16)) & (q >= k)),
                             False, shapes, both),
        "bigbird512+16+3x64": (bigbird, False, bigbird_mod, False, shapes, both),
        "prefix_lm2048": (masks.prefix_lm(2048), False, lambda n, dev: (lambda b, h, q, k: (q >= k) | (k < 2048)),
                          False, shapes, both),
        "block_sparse0.25": (masks.block_sparse(layout, 128), True, block_mod, False, shapes, both),
        "strided256": (masks.strided(256), False,
                       lambda n, dev: (lambda b, h, q, k: (q >= k) & ((q - k < 256) | (k % 256 == 255))), False,
                       shapes, ("fwd",)),
    }


# ----------------------------------------------------------------------------------------------------------
# Implementations


#: the backend each ``subquad-auto`` impl ran (asked once, on its first call), for the rows' ``chosen``
CHOSEN: dict = {}


def _subquad(pattern, causal, backend):
    def run(inputs):
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        if backend == "auto" and run not in CHOSEN:
            CHOSEN[run] = dispatch.choose(q, k, v, causal=causal, mask=pattern)
        return attention(q, k, v, causal=causal, mask=pattern, backend=backend)

    return run


def _fa4_direct(pattern, causal):
    """FA4's own entry points, every argument prepared on the first call (outside the timed calls)."""
    prepared = {}

    def run(inputs):
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        func, varlen_func, sparse_tensors = fa4._interface()
        if "call" not in prepared:
            low = fa4.lower(pattern, causal)
            bsz, n, hq, d = q.shape
            if low.route == "dense":
                prepared["call"] = lambda q, k, v: func(q, k, v, causal=low.causal, window_size=low.window,
                                                        return_lse=True)
            elif low.route == "varlen":
                cu, longest = fa4.varlen_offsets(low.document, bsz, n, q.device)

                def call(q, k, v):
                    out, lse = varlen_func(q.view(bsz * n, hq, d), k.view(bsz * n, *k.shape[2:]),
                                           v.view(bsz * n, *v.shape[2:]), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                           max_seqlen_q=longest, max_seqlen_k=longest, causal=low.causal,
                                           window_size=low.window, return_lse=True)
                    return out.view(q.shape), lse

                prepared["call"] = call
            else:
                bm = masks.resolve(pattern, causal=causal, batch=bsz, heads=hq, seq_q=n, seq_kv=n, device=q.device,
                                   block_q=fa4.BLOCK_Q, block_kv=fa4.BLOCK_KV)
                args = fa4.sparse_args(bm)
                kw = dict(mask_mod=None if args.spec is None else fa4._cute_mask_mod(args.spec, args.q_offset),
                          aux_tensors=args.aux or None,
                          block_sparse_tensors=sparse_tensors(*args.fwd, block_size=(fa4.BLOCK_Q, fa4.BLOCK_KV)),
                          block_sparse_tensors_bwd=sparse_tensors(*args.bwd, block_size=(fa4.BLOCK_Q, fa4.BLOCK_KV)))
                prepared["call"] = lambda q, k, v: func(q, k, v, return_lse=True, **kw)
        return prepared["call"](q, k, v)[0]

    return run


def _capability() -> str:
    return dispatch.capability(torch.device("cuda")) if torch.cuda.is_available() else "cpu"


def make_cases(quick: bool, names=None):
    spec = cases_spec(4096 if quick else N_PATTERN)
    for name, (pattern, causal, flex_mod, cudnn, shapes, modes) in spec.items():
        if names is not None and name not in names:
            continue
        if quick:
            shapes = [(1, 4096)]
        ref_pattern = (pattern & masks.causal if pattern is not None else masks.causal) if causal else pattern
        kind = dispatch.pattern_kind(pattern, causal)
        for batch, n in shapes:
            for mode in modes:
                impls = {"subquad-auto": _subquad(pattern, causal, "auto"),
                         "subquad-triton": _subquad(pattern, causal, "triton"),
                         "subquad-fa4": _subquad(pattern, causal, "fa4"),
                         "fa4": _fa4_direct(pattern, causal)}
                if cudnn:
                    impls["subquad-cudnn"] = _subquad(pattern, causal, "cudnn")
                    impls["cudnn"] = peers.sdpa("cudnn", causal)
                if flex_mod is not None:
                    impls["subquad-flex"] = _subquad(pattern, causal, "flex")
                    impls["flex"] = peers.flex(flex_mod)
                yield attention_case(name, ref_pattern, mode, batch=batch, seqlen=n, heads_q=HEADS, heads_kv=HEADS,
                                     head_dim=DIM, dtype=DTYPE, impls=impls,
                                     extra={"capability": _capability(), "pattern": kind})


@suite("backends", device="cuda")
def backends_cases(quick: bool):
    yield from make_cases(quick)


# ----------------------------------------------------------------------------------------------------------
# A device run: warm the compile caches in parallel, then measure case by case up to a deadline


def _warm_one(name: str) -> None:
    """Run every impl of case ``name`` once per mode at its benchmark shape (fills the compile caches)."""
    device = torch.device("cuda")
    for case in make_cases(False, names={name}):
        inputs = case.make_inputs(device)
        for impl, fn in case.impls.items():
            t0 = time.time()
            try:
                with torch.enable_grad() if case.mode == "fwdbwd" else torch.no_grad():
                    out = fn(inputs)
                    out = out[0] if isinstance(out, tuple) else out
                    if case.mode == "fwdbwd":
                        out.float().sum().backward()
                torch.cuda.synchronize()
                print(f"warm {name} {case.mode} {impl}: {time.time() - t0:.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001 - the timed run records the error row
                print(f"warm {name} {case.mode} {impl}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            for t in inputs.values():
                if isinstance(t, torch.Tensor):
                    t.grad = None


def warm_all(timeout_s: float, names=None) -> None:
    """Compile every case's kernels (those of ``names`` if given), one process per case, all at once (CPU-bound
    compiles in parallel)."""
    start = time.time()
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "subquad.bench.suites.backends", "--warm-one", n], env=env)
             for n in cases_spec() if names is None or n in names]
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout_s - (time.time() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
    print(f"warm-up done in {time.time() - start:.0f}s", flush=True)


#: the backends the chooser picks from, measured first: the table built from them serves subquad-auto
CANDIDATES = ("subquad-triton", "subquad-fa4", "subquad-cudnn", "subquad-flex")


def run(out_dir: Path, deadline_s: float, device: str = "cuda", table_path: Path | None = None,
        names=None) -> list[dict]:
    """Case by case (those of ``names`` if given): measure the candidates, rebuild the dispatch table from every
    candidate row so far and install it, then measure ``subquad-auto`` (which now reads that table) and the
    peers. A case is skipped whole once the deadline has passed. Writes ``backends.json`` and
    ``dispatch_table.json`` (this run's signatures only) after each."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    progress = lambda msg: print(f"[{time.time() - start:5.0f}s] {msg}", flush=True)  # noqa: E731
    for case in make_cases(False, names):
        if time.time() - start > deadline_s:
            print(f"deadline: skipped {case.case} {case.mode}", flush=True)
            continue
        rows.extend(run_cases([case], torch.device(device), impl_filter=lambda name: name in CANDIDATES,
                              progress=progress))
        table = json.dumps(dispatch.build_table(rows, source="backends.json"), indent=1) + "\n"
        (out_dir / "dispatch_table.json").write_text(table)
        (table_path or dispatch.TABLE_PATH).write_text(table)
        dispatch.table.cache_clear()
        rows.extend(run_cases([case], torch.device(device), impl_filter=lambda name: name not in CANDIDATES,
                              progress=progress))
        auto = case.impls.get("subquad-auto")
        for r in rows:
            if r["impl"] == "subquad-auto" and auto in CHOSEN and r["case"] == case.case and r["mode"] == case.mode:
                r["chosen"] = CHOSEN[auto]
        (out_dir / "backends.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return rows


def _main(argv: list[str]) -> None:
    """``--warm-one NAME``, ``--warm-only SECONDS [--cases A,B]`` or ``OUT [--deadline SECONDS] [--cases A,B]``."""
    names = set(argv[argv.index("--cases") + 1].split(",")) if "--cases" in argv else None
    if argv[:1] == ["--warm-one"]:
        _warm_one(argv[1])
        return
    if argv[:1] == ["--warm-only"]:
        warm_all(float(argv[1]), names)
        return
    deadline = float(argv[argv.index("--deadline") + 1]) if "--deadline" in argv else 1e9
    rows = run(Path(argv[0]), deadline, names=names)
    for r in rows:
        print(f"{r['case']:20s} {r.get('mode', ''):7s} {r['impl']:15s} "
              + (f"{r['ms']:9.3f} ms {r['tflops'] or 0:7.1f} TF err {r['max_err']:.1e}" if "ms" in r
                 else r.get("error", "")[:100]))


if __name__ == "__main__":
    _main(sys.argv[1:])

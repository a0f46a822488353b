"""Dynamic-sparsity suite (GPU): the ops that choose their keys from the data at run time (NSA, top-k block
attention, Reformer's LSH), beside dense causal attention on the same inputs.

bf16, D = 128, fwd and fwd+bwd. NSA and top-k at B*N = 32k tokens (B x N = 4 x 8k, 2 x 16k) and 1 x 64k, with
NSA's (and fla's benchmark's) GQA of 64 query heads over 4 KV heads; LSH at 2 x 16k and 1 x 64k with 16 heads.

* ``nsa``: ``subquad.nsa`` at the paper's sizes: compression blocks of 32 tokens every 16, 16 selected blocks of
  64, window 512. Gates are the sigmoids of unit-normal logits (every branch weighs in).
* ``nsa-cmp64``: the same with compression blocks of 64 every 64, the only compression fla 0.6.0's
  ``parallel_nsa`` has (the mean of each selection block), so that fla computes the same function beside it:
  ``fla`` (its three branches; its window branch is flash-attn's FA2, an error row where flash-attn is not
  installed) and ``fla+subquad-window`` (fla's compressed and selected branches, ``window_size=0``, plus the
  window branch on subquad's flash kernels, as ``subquad.nsa`` runs it). fla imports are optional: a missing
  package is an error row.
* ``topk-block``: ``subquad.topk_block_attention``, 16 blocks of 64, causal.
* ``causal-gqa``: dense causal attention at the NSA shapes: ``subquad.attention(backend="triton")`` and SDPA's
  flash backend (``enable_gqa``), the time a dynamic op has to beat.
* ``lsh``: ``subquad.lsh_attention``, causal, 4 hash rounds, seed 0, chunks of 512 at every N (``n_buckets =
  N / 256``: Reformer's ``n_buckets ~ 2 N / chunk``, so that its cost grows linearly; 64 buckets at 16k).
* ``causal``: dense causal attention at the LSH shapes.

Dense and dynamic rows are separate cases: a case carries one FLOP count and one reference, and the dense rows
would otherwise be checked against NSA's output and credited with NSA's pairs.

FLOPs (effective TFLOP/s, ``attention_flops``: 4 D per pair forward, 3.5x that forward+backward) count the
(query, key) pairs attended, summed over the queries at positions ``t``:

* top-k: the query's own block up to ``t`` (``t % 64 + 1`` keys) and ``min(top_k - 1, t // 64)`` complete
  blocks of 64 (all selected blocks before the own one are complete): exact;
* NSA: that selected count, plus the compressed summaries whose block has ended (``(t - l + 1) // d + 1``, at
  least 0, for blocks of ``l`` every ``d``), plus ``min(t + 1, window)`` window keys; the selection's two passes
  over the summaries (scores only, no values) and the gates are not counted;
* LSH: nominal, ``n_hashes x N x chunk`` per head: a round offers each query its chunk and the one before
  (2 chunks), of which causality keeps about half; pairs found by two rounds are counted in each (an upper
  estimate: the kept pairs depend on the hashes);
* dense: the causal pairs, exactly.

Errors (fwd cases): NSA and top-k against their reference (``backend="reference"``) in fp32 at the 48 sampled
query rows only (over the whole sequence the NSA reference fits 3 queries a chunk at 64 heads: 21,846 chunks at
64k): each sampled query alone over the keys up to the end of its selection block, which leaves it the same
candidate blocks as the whole sequence (a causal query reads no later key). The selection is discrete: a near-tie
that bf16 rounding tips picks another block and shows as a large error on that row. LSH against its reference in
fp32 on the whole sequence (the same seeded hashes; memory O(N x chunk) a round: 3.3 GB at 1 x 8k on the CPU, so
~26 GB at 64k). Dense rows against exact fp64 attention on the sampled rows.
"""

from __future__ import annotations

import torch

from ... import attention, lsh_attention, masks, nsa, topk_block_attention
from .. import peers
from ..attention_cases import attention_case, qkv_inputs, sample_rows
from ..harness import Case, attention_flops, suite

DIM, DTYPE = 128, torch.bfloat16
#: NSA / top-k heads (NSA's GQA groups of 16, the smallest fla's kernels take) and LSH heads
HEADS_Q, HEADS_KV, LSH_HEADS = 64, 4, 16
BLOCK, TOP_K, WINDOW = 64, 16, 512
#: compression (block, stride): the NSA paper's, and fla's (its selection block, no overlap)
PAPER_COMPRESSION, FLA_COMPRESSION = (32, 16), (64, 64)
LSH_HASHES, LSH_CHUNK = 4, 512


def _inputs(batch: int, n: int, heads_q: int, heads_kv: int, grad: bool, gates: bool):
    """q, k, v as every attention suite makes them (so the dense cases get the same ones) and, for NSA, gates:
    sigmoids of unit-normal logits, never 0."""
    make_qkv = qkv_inputs(batch, n, heads_q, heads_kv, DIM, DTYPE, grad)

    def make(device: torch.device) -> dict:
        inputs = make_qkv(device)
        if gates:
            gen = torch.Generator(device=device).manual_seed(1)
            logits = torch.randn(batch, n, heads_q, 3, generator=gen, device=device)
            inputs["gates"] = torch.sigmoid(logits).to(DTYPE).requires_grad_(grad)
        return inputs

    return make


def _selected_pairs(t: torch.Tensor) -> torch.Tensor:
    """Keys of the ``TOP_K`` blocks a query at ``t`` attends: its own block up to itself and the complete
    blocks before it, as many as it may pick."""
    return t % BLOCK + 1 + torch.clamp(t // BLOCK, max=TOP_K - 1) * BLOCK


def topk_pairs(n: int) -> float:
    """(query, key) pairs of top-k block attention over one (batch, head) slice of ``n`` tokens."""
    return float(_selected_pairs(torch.arange(n, dtype=torch.float64)).sum())


def nsa_pairs(n: int, compress_block: int, compress_stride: int) -> float:
    """(query, key) pairs of NSA's three branches over one (batch, head) slice of ``n`` tokens."""
    t = torch.arange(n, dtype=torch.float64)
    summaries = torch.clamp(torch.div(t - compress_block + 1, compress_stride, rounding_mode="floor") + 1, min=0)
    return float((summaries + _selected_pairs(t) + torch.clamp(t + 1, max=WINDOW)).sum())


def _nsa(compression):
    compress_block, compress_stride = compression

    def run(inputs, backend="triton"):
        return nsa(inputs["q"], inputs["k"], inputs["v"], inputs["gates"], block=BLOCK, compress_block=compress_block,
                   compress_stride=compress_stride, top_k=TOP_K, window=WINDOW, backend=backend)

    return run


def _topk(inputs, backend="triton"):
    return topk_block_attention(inputs["q"], inputs["k"], inputs["v"], block=BLOCK, top_k=TOP_K, causal=True,
                                backend=backend)


def _fla_nsa(inputs, window_size: int):
    from fla.ops.nsa import parallel_nsa

    g = inputs["gates"]
    return parallel_nsa(inputs["q"], inputs["k"], inputs["v"], g[..., 0], g[..., 1], g[..., 2],
                        block_counts=TOP_K, block_size=BLOCK, window_size=window_size)


def _fla(inputs):
    """fla's ``parallel_nsa`` with its window branch, which it runs on FA2's ``flash_attn_func``: without it fla
    fails after its other branches, calling a None, so the import is asked for first, for a readable error row
    (the function, not the package: FA4 alone installs a ``flash_attn`` namespace too)."""
    from flash_attn import flash_attn_func  # noqa: F401

    return _fla_nsa(inputs, WINDOW)


def _fla_subquad_window(inputs):
    """fla's compressed and selected branches (``window_size=0`` leaves its window gate unused) plus the window
    branch as ``subquad.nsa`` computes it, on the flash kernels: NSA end to end where flash-attn is missing."""
    window = attention(inputs["q"], inputs["k"], inputs["v"], causal=True, window_size=(WINDOW - 1, 0),
                       backend="triton")
    return torch.addcmul(_fla_nsa(inputs, 0), window, inputs["gates"][..., 2:3])


def _rows_reference(run, rows: torch.Tensor):
    """``run(inputs, backend="reference")`` on fp32 copies of the inputs, at the query ``rows`` only: each row's
    query alone (the first of the queries up to the end of its block of ``BLOCK``, aligned to the end of the keys)
    over the keys up to that end. Returns ``(B, len(rows), H, D)``."""

    def ref(inputs: dict) -> torch.Tensor:
        x = {name: t.detach().float() for name, t in inputs.items()}
        n = x["q"].shape[1]
        outs = []
        for r in rows.tolist():
            end = min(n, -(-(r + 1) // BLOCK) * BLOCK)
            cut = {name: t[:, r:end] if name in ("q", "gates") else t[:, :end] for name, t in x.items()}
            outs.append(run(cut, backend="reference")[:, :1])
        return torch.cat(outs, 1)

    return ref


def _lsh(n: int):
    n_buckets = 2 * n // LSH_CHUNK

    def run(inputs, backend="triton"):
        return lsh_attention(inputs["q"], inputs["k"], inputs["v"], n_buckets=n_buckets, n_hashes=LSH_HASHES,
                             chunk_size=LSH_CHUNK, causal=True, seed=0, backend=backend)

    return run


def _upcast(run):
    """``run`` on fp32 copies of the inputs through the reference backend (LSH hashes in fp32 either way)."""
    return lambda inputs: run({name: t.detach().float() for name, t in inputs.items()}, backend="reference")


def _dense(name, batch, n, heads_q, heads_kv, mode):
    impls = {"subquad-triton": lambda x: attention(x["q"], x["k"], x["v"], causal=True, backend="triton"),
             "sdpa-flash": peers.sdpa("flash", causal=True, enable_gqa=heads_q != heads_kv)}
    return attention_case(name, masks.causal, mode, batch=batch, seqlen=n, heads_q=heads_q, heads_kv=heads_kv,
                          head_dim=DIM, dtype=DTYPE, impls=impls)


def _sampled_reference(run, n: int, mode: str) -> dict:
    """The ``reference`` and ``error_rows`` of a case: the sampled rows' reference on the fwd pass only (the
    fwd+bwd pass's output is the same call's)."""
    if mode != "fwd":
        return {}
    rows = sample_rows(n)
    return {"reference": _rows_reference(run, rows), "error_rows": rows}


def _nsa_case(name, compression, impls, batch, n, mode):
    pairs = nsa_pairs(n, *compression)
    return Case(case=name, mode=mode, batch=batch, seqlen=n, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=DIM,
                dtype=DTYPE, make_inputs=_inputs(batch, n, HEADS_Q, HEADS_KV, mode == "fwdbwd", gates=True),
                impls=impls, flops=attention_flops(batch, HEADS_Q, pairs, DIM, mode),
                **_sampled_reference(_nsa(compression), n, mode),
                extra={"density": round(pairs / (n * n), 5), "block": BLOCK, "top_k": TOP_K, "window": WINDOW,
                       "compress_block": compression[0], "compress_stride": compression[1]})


def _topk_case(batch, n, mode):
    pairs = topk_pairs(n)
    return Case(case="topk-block", mode=mode, batch=batch, seqlen=n, heads_q=HEADS_Q, heads_kv=HEADS_KV,
                head_dim=DIM, dtype=DTYPE,
                make_inputs=_inputs(batch, n, HEADS_Q, HEADS_KV, mode == "fwdbwd", gates=False),
                impls={"subquad-triton": _topk}, flops=attention_flops(batch, HEADS_Q, pairs, DIM, mode),
                **_sampled_reference(_topk, n, mode),
                extra={"density": round(pairs / (n * n), 5), "block": BLOCK, "top_k": TOP_K})


def _lsh_case(batch, n, mode):
    pairs = float(LSH_HASHES * n * LSH_CHUNK)
    run = _lsh(n)
    return Case(case="lsh", mode=mode, batch=batch, seqlen=n, heads_q=LSH_HEADS, heads_kv=LSH_HEADS, head_dim=DIM,
                dtype=DTYPE, make_inputs=_inputs(batch, n, LSH_HEADS, LSH_HEADS, mode == "fwdbwd", gates=False),
                impls={"subquad-triton": run}, flops=attention_flops(batch, LSH_HEADS, pairs, DIM, mode),
                reference=_upcast(run) if mode == "fwd" else None,
                extra={"density": round(pairs / (n * n), 5), "n_buckets": 2 * n // LSH_CHUNK,
                       "n_hashes": LSH_HASHES, "chunk": LSH_CHUNK})


@suite("dynamic", device="cuda")
def dynamic_cases(quick: bool):
    shapes = [(1, 4096)] if quick else [(4, 8192), (2, 16384), (1, 65536)]
    lsh_shapes = [(1, 4096)] if quick else [(2, 16384), (1, 65536)]
    modes = ("fwd", "fwdbwd")
    for batch, n in shapes:
        for mode in modes:
            yield _dense("causal-gqa", batch, n, HEADS_Q, HEADS_KV, mode)
            yield _nsa_case("nsa", PAPER_COMPRESSION, {"subquad-triton": _nsa(PAPER_COMPRESSION)}, batch, n, mode)
            yield _nsa_case("nsa-cmp64", FLA_COMPRESSION,
                            {"subquad-triton": _nsa(FLA_COMPRESSION), "fla": _fla,
                             "fla+subquad-window": _fla_subquad_window}, batch, n, mode)
            yield _topk_case(batch, n, mode)
    for batch, n in lsh_shapes:
        for mode in modes:
            yield _dense("causal", batch, n, LSH_HEADS, LSH_HEADS, mode)
            yield _lsh_case(batch, n, mode)

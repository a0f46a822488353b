"""Linear-attention family suite: chunked forward and forward+backward of linear attention, retention, SSD
(scalar decay), GLA (vector decay), DeltaNet and gated DeltaNet at B*T = 32k tokens (T = 2k, 8k, 32k; H = 16;
D_k = D_v = 128; bf16), B = 1 at 8k and 64k for the linear-scaling ratio, decode steps, and exact causal
attention (SDPA flash backend) at the same shapes for the crossover. Peers: flash-linear-attention when
importable (its first call per kernel autotunes for tens of seconds), and mamba-ssm's Triton SSD for the SSD
rows (an error row where its sources are not on the path). Rows carry ``tokens`` (B*T) so that
tokens/s = tokens / ms.

``linear`` is the GPU suite; ``cpu-linear`` runs the references at small sizes beside exact
causal attention to show the O(N) against O(N^2) growth.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ... import attention, delta_rule, delta_rule_step, gla, gla_step
from .. import peers
from ..harness import Case, suite

HEADS, DIM = 16, 128
OPS = ("linear", "retention", "ssd", "gla", "delta", "gated_delta")


def _make_inputs(op, batch, seqlen, heads, dim, dtype, grad):
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (batch, seqlen, heads, dim)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
        inputs = {"q": q, "k": k, "v": v}
        if op in ("delta", "gated_delta"):
            inputs["q"], inputs["k"] = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
            inputs["beta"] = torch.rand(shape[:3], generator=gen, device=device, dtype=dtype)
        if op in ("ssd", "gated_delta"):
            inputs["g"] = F.logsigmoid(torch.randn(shape[:3], generator=gen, device=device) + 4.0)
        if op == "gla":
            inputs["g"] = F.logsigmoid(torch.randn(shape, generator=gen, device=device) + 4.0) / 16
        if op == "retention":
            inputs["g"] = torch.log(1 - 2.0 ** (-5.0 - torch.arange(heads, device=device, dtype=torch.float32)))
        if op == "ssd":
            # the same function in mamba-ssm's terms, for its peer row (made here, so not timed)
            names = ("mamba_x", "mamba_dt", "mamba_A", None, "mamba_C")
            for name, t in zip(names, peers.mamba_ssd_inputs(q, k, v, inputs["g"], dim ** -0.5)):
                if name is not None:
                    inputs[name] = t
        for name, t in inputs.items():
            # RetNet's decays are fixed, not learned: fla's retention returns no gradient for them, so ours is
            # not asked for one either (it would add the decay-gradient kernel, ~0.26 ms at 1 x 32k on the H200)
            t.requires_grad_(grad and not (op == "retention" and name == "g"))
        return inputs

    return make


def _ours(op, backend):
    def run(x):
        if op in ("delta", "gated_delta"):
            return delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("g"), qk_l2norm=False, backend=backend)
        return gla(x["q"], x["k"], x["v"], x.get("g"), backend=backend)

    return run


def _upcast(run):
    """``run`` on the inputs in fp32 (its output stays fp32): the error column's reference. The reference
    backend on bf16 inputs returned a bf16-rounded output, and every implementation showed the same one-step
    error against it."""
    def upcast(x):
        return run({name: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for name, t in x.items()})

    return upcast


def _fla(op, fused=False):
    """fla's chunk form of the op, or its fused_chunk form (the state kept in registers, no per-chunk states
    stored), which fla has for linear attention, retention and SSD only (None for the others)."""
    if fused and op not in ("linear", "retention", "ssd"):
        return None
    form = "fused_chunk" if fused else "chunk"

    def run(x):
        q, k, v = x["q"], x["k"], x["v"]
        if op == "linear":
            from fla.ops import linear_attn
            return getattr(linear_attn, f"{form}_linear_attn")(q, k, v, normalize=False)[0]
        if op in ("retention", "ssd"):
            from fla.ops import simple_gla
            decay = {"g_gamma" if op == "retention" else "g": x["g"]}
            return getattr(simple_gla, f"{form}_simple_gla")(q, k, v, **decay)[0]
        if op == "gla":
            from fla.ops.gla import chunk_gla
            return chunk_gla(q, k, v, x["g"])[0]
        if op == "delta":
            from fla.ops.delta_rule import chunk_delta_rule
            return chunk_delta_rule(q, k, v, x["beta"])[0]
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule(q, k, v, x["g"], x["beta"])[0]

    return run


def _shapes(quick):
    """SUBQUAD_BENCH_LINEAR_SHAPES: a comma list of BxT ("4x8192,1x65536") to run part of the suite (a device
    call has a time limit; fla and the chunk kernels autotune on the first call of each shape)."""
    wanted = os.environ.get("SUBQUAD_BENCH_LINEAR_SHAPES")
    if wanted:
        return [tuple(int(x) for x in shape.split("x")) for shape in wanted.split(",")]
    if quick:
        return [(2, 2048)]
    total = 32768
    return [(total // t, t) for t in (1024, 2048, 8192, 32768)] + [(1, 8192), (1, 65536)]


def _ops():
    wanted = os.environ.get("SUBQUAD_BENCH_LINEAR_OPS")
    return tuple(wanted.split(",")) if wanted else OPS


def _fla_wanted(op, mode):
    """SUBQUAD_BENCH_FLA: unset = fla everywhere; "0" = nowhere; else a comma list of ops or op-mode pairs
    ("linear,delta,ssd-fwd"): fla autotunes each kernel for tens of seconds on its first call."""
    wanted = os.environ.get("SUBQUAD_BENCH_FLA")
    if wanted is None:
        return True
    tokens = set(wanted.split(","))
    return op in tokens or f"{op}-{mode}" in tokens


@suite("linear", device="cuda")
def linear_cases(quick: bool):
    for batch, seqlen in _shapes(quick):
        for mode in ("fwd", "fwdbwd"):
            extra = {"tokens": batch * seqlen, "head_dim_v": DIM}
            for op in _ops():
                impls = {"subquad-triton": _ours(op, "triton")}
                if _fla_wanted(op, mode):
                    impls["fla"] = _fla(op)
                    if _fla(op, fused=True) is not None:
                        impls["fla-fused"] = _fla(op, fused=True)
                if op == "ssd":
                    impls["mamba-ssd"] = peers.mamba_ssd()
                ref = _upcast(_ours(op, "reference")) if seqlen == 8192 and batch > 1 and mode == "fwd" else None
                yield Case(case=op, mode=mode, batch=batch, seqlen=seqlen, heads_q=HEADS, heads_kv=HEADS,
                           head_dim=DIM, dtype=torch.bfloat16, flops=None,
                           make_inputs=_make_inputs(op, batch, seqlen, HEADS, DIM, torch.bfloat16, mode == "fwdbwd"),
                           impls=impls, reference=ref, extra=extra)
            yield Case(case="sdpa-causal", mode=mode, batch=batch, seqlen=seqlen, heads_q=HEADS, heads_kv=HEADS,
                       head_dim=DIM, dtype=torch.bfloat16,
                       flops=2.0 * batch * HEADS * seqlen * seqlen * DIM * (3.5 if mode == "fwdbwd" else 1.0),
                       make_inputs=_make_inputs("linear", batch, seqlen, HEADS, DIM, torch.bfloat16,
                                                mode == "fwdbwd"),
                       impls={"sdpa-flash": peers.sdpa("flash", causal=True)}, reference=None, extra=extra)
    yield from _decode_cases(quick)


def _decode_inputs(op, batch, heads, dim, dtype):
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, dim, generator=gen, device=device, dtype=dtype) for _ in range(3))
        state = torch.randn(batch, heads, dim, dim, generator=gen, device=device) * 0.1
        x = {"q": q, "k": F.normalize(k.float(), dim=-1).to(dtype), "v": v, "state": state}
        if op in ("gla", "gated_delta"):
            x["g"] = F.logsigmoid(torch.randn(batch, heads, *((dim,) if op == "gla" else ()), generator=gen,
                                              device=device) + 4.0)
        if op == "gated_delta":
            x["beta"] = torch.rand(batch, heads, generator=gen, device=device, dtype=dtype)
        return x

    return make


def _decode_impl(op, backend):
    def run(x):
        if op == "gated_delta":
            return delta_rule_step(x["q"], x["k"], x["v"], x["beta"], x["state"], x["g"], qk_l2norm=False,
                                   backend=backend)
        return gla_step(x["q"], x["k"], x["v"], x["state"], x.get("g"), backend=backend)

    return run


def _decode_cases(quick):
    batch = 4 if quick else 64
    for op in ("gla", "gated_delta"):
        state_bytes = batch * HEADS * DIM * DIM * 4
        yield Case(case=f"{op}-step", mode="decode", batch=batch, seqlen=1, heads_q=HEADS, heads_kv=HEADS,
                   head_dim=DIM, dtype=torch.bfloat16, bytes=2.0 * state_bytes,
                   make_inputs=_decode_inputs(op, batch, HEADS, DIM, torch.bfloat16),
                   impls={"subquad-triton": _decode_impl(op, "triton"), "torch-eager": _decode_impl(op, "reference")},
                   reference=_upcast(_decode_impl(op, "reference")), extra={"tokens": batch})


@suite("cpu-linear", device="cpu")
def cpu_linear_cases(quick: bool):
    """The chunked references (fp32, B = 1, 4 heads, D = 64) beside exact causal attention: time and memory
    grow linearly for the recurrences and quadratically for attention."""
    lengths = [512, 1024] if quick else [1024, 4096, 16384]
    for n in lengths:
        for op in ("ssd", "gated_delta"):
            yield Case(case=op, mode="fwd", batch=1, seqlen=n, heads_q=4, heads_kv=4, head_dim=64,
                       dtype=torch.float32, make_inputs=_make_inputs(op, 1, n, 4, 64, torch.float32, False),
                       impls={"subquad-reference": _ours(op, "reference")}, reference=None, extra={"tokens": n})
        yield Case(case="causal-attention", mode="fwd", batch=1, seqlen=n, heads_q=4, heads_kv=4, head_dim=64,
                   dtype=torch.float32, make_inputs=_make_inputs("linear", 1, n, 4, 64, torch.float32, False),
                   impls={"subquad-reference": lambda x: attention(x["q"], x["k"], x["v"], causal=True,
                                                                   backend="reference")},
                   reference=None, extra={"tokens": n})


def summarize(rows: list[dict]) -> dict:
    """From one run's rows: tokens/s per (op, shape, pass, impl), subquad / fla ratios (against fla's faster form
    that ran), the T = 8k -> 64k time ratio at B = 1, and the crossover (smallest T at which each op's fwd+bwd
    beats SDPA-flash causal at B*T = 32k)."""
    ok = [r for r in rows if "ms" in r and r.get("tokens")]
    by = {(r["case"], r["batch"], r["seqlen"], r["mode"], r["impl"]): r["ms"] for r in ok}
    out = {"mtok_s": {}, "vs_fla": {}, "scaling_8k_to_64k": {}, "crossover_fwdbwd": {}}
    for (case, b, t, mode, impl), ms in by.items():
        out["mtok_s"][f"{case} {b}x{t} {mode} {impl}"] = round(b * t / ms / 1e3, 2)
        # against fla's faster form (chunk or fused_chunk) on the same shape
        fla = [by[(case, b, t, mode, peer)] for peer in ("fla", "fla-fused") if (case, b, t, mode, peer) in by]
        if impl == "subquad-triton" and fla:
            out["vs_fla"][f"{case} {b}x{t} {mode}"] = round(min(fla) / ms, 3)
    for case in OPS:
        for mode in ("fwd", "fwdbwd"):
            short, long_ = by.get((case, 1, 8192, mode, "subquad-triton")), by.get((case, 1, 65536, mode, "subquad-triton"))
            if short and long_:
                out["scaling_8k_to_64k"][f"{case} {mode}"] = round(long_ / short, 2)
        beats = sorted(t for (c, b, t, m, i), ms in by.items() if c == case and m == "fwdbwd" and i == "subquad-triton"
                       and b * t == 32768 and (("sdpa-causal", b, t, m, "sdpa-flash") in by)
                       and ms < by[("sdpa-causal", b, t, m, "sdpa-flash")])
        if beats:
            out["crossover_fwdbwd"][case] = beats[0]
    return out

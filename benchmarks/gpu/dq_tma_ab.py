"""dQ's sums in the dK/dV pass: TMA bulk reduce-adds against per-thread vector atomics, fwd+bwd in one process.

    PYTHONPATH=. python3 benchmarks/gpu/dq_tma_ab.py [--cases causal-1k,window-16k]   # $OUT/dq_tma_ab.json

Both variants run alternately (A B A B, each a do_bench median; the faster of a variant's two rounds is kept,
its spread printed), on the same inputs; each variant has its own autotuners (without TMA: the dK/dV
configurations without it; with: all of them, so the tuner may still choose one without where TMA's staging does
not fit), and the dK/dV configuration each chose is recorded. Dense cases also time SDPA's flash (FA2) and cuDNN
backends in the same process. Each case also checks the TMA variant's gradients against the atomic
one's (the same sums in another order: fp32 rounding apart) and against the fp32 SDPA math on upcast inputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os

import torch
import triton.testing

from subquad import attention, masks
from subquad.bench.harness import versions
from subquad.ops.softmax.flash import launch

# (batch, length, pattern); B x N = 32k tokens, 16 heads, D 128 as in issue 4's table
CASES = {
    "causal-1k": (32, 1024, lambda: masks.causal),
    "causal-4k": (8, 4096, lambda: masks.causal),
    "causal-16k": (2, 16384, lambda: masks.causal),
    "full-1k": (32, 1024, lambda: None),
    "window4096-16k": (2, 16384, lambda: masks.sliding_window(4096)),
    "longformer-16k": (2, 16384, lambda: masks.longformer(512, list(range(16)))),
    "bigbird-16k": (2, 16384, lambda: masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0)),
}


def _grads(q, k, v, grad, mask):
    return torch.autograd.grad(attention(q, k, v, mask=mask, backend="triton"), (q, k, v), grad)


def _reference_error(q, k, v, grad, mask, got):
    """Max |got - ref| / max |ref| per gradient on the first sequence's first 2 heads, against the reference
    backend in fp32 on upcast inputs."""
    part = lambda t: t[:1, :, :2].detach().float().requires_grad_()  # noqa: E731
    qf, kf, vf = part(q), part(k), part(v)
    ref = torch.autograd.grad(attention(qf, kf, vf, mask=mask, backend="reference"), (qf, kf, vf),
                              grad[:1, :, :2].float())
    return [round(((g[:1, :, :2].float() - r).abs().max() / r.abs().max()).item(), 5) for g, r in zip(got, ref)]


def _case(name):
    batch, n, make = CASES[name]
    mask = make()
    q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    got, tuned = {}, {False: {}, True: {}}

    def variant(tma):
        launch.DQ_TMA = tma
        launch._TUNED = tuned[tma]

    for tma in (False, True):
        variant(tma)
        got[tma] = _grads(q, k, v, grad, mask)      # tunes this variant
    torch.cuda.synchronize()
    diff = [round(((a.float() - b.float()).abs().max() / b.float().abs().max()).item(), 5)
            for a, b in zip(got[True], got[False])]
    ref_err = _reference_error(q, k, v, grad, mask, got[True]) if n <= 4096 else None
    times = {False: [], True: []}
    for _ in range(2):
        for tma in (False, True):
            variant(tma)
            times[tma].append(triton.testing.do_bench(lambda: _grads(q, k, v, grad, mask), warmup=10, rep=60,
                                                      return_mode="median"))
    row = {"case": name, "batch": batch, "seqlen": n,
           "atomics_ms": round(min(times[False]), 4), "tma_ms": round(min(times[True]), 4),
           "atomics_rounds": [round(t, 4) for t in times[False]], "tma_rounds": [round(t, 4) for t in times[True]],
           "speedup": round(min(times[False]) / min(times[True]), 3),
           "tma_vs_atomics_rel_err": diff, "tma_vs_fp32_rel_err": ref_err,
           "dkdv_chosen": {str(tma): [str(c) for c in t[("dkdv", True)].chosen.values()] if ("dkdv", True) in t
                           else None for tma, t in tuned.items()}}
    if mask is None or mask is masks.causal:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
        qt, kt, vt, gt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, grad))
        for name_, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
            def peer(backend=backend):
                with sdpa_kernel(backend):
                    return torch.autograd.grad(sdpa(qt, kt, vt, is_causal=mask is not None), (qt, kt, vt), gt)
            row[name_] = round(triton.testing.do_bench(peer, warmup=10, rep=60, return_mode="median"), 4)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    rows = []
    out = os.path.join(os.environ.get("OUT", "."), "dq_tma_ab.json")
    for name in args.cases.split(","):
        try:
            rows.append(_case(name))
        except Exception as exc:  # noqa: BLE001 - one case's failure is a row; the others still run
            import traceback
            traceback.print_exc()
            rows.append({"case": name, "error": repr(exc)[:400]})
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(),
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "versions": versions(),
                       "command": "benchmarks/gpu/dq_tma_ab.py", "rows": rows}, f, indent=1)
    print(f"{'case':16} {'atomics ms':>10} {'tma ms':>8} {'x':>6}  rel err tma/atomics")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:16} {r['error'][:90]}")
        else:
            print(f"{r['case']:16} {r['atomics_ms']:10.4f} {r['tma_ms']:8.4f} {r['speedup']:6.3f}  "
                  f"{r['tma_vs_atomics_rel_err']} {r['tma_vs_fp32_rel_err']} fa2 {r.get('sdpa_flash_ms')} "
                  f"cudnn {r.get('sdpa_cudnn_ms')} {r['dkdv_chosen']}")


if __name__ == "__main__":
    main()

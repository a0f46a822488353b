"""One of the flash kernels' module switches off and on, alternately in one process: fwd and fwd+bwd medians.

    PYTHONPATH=. python3 benchmarks/gpu/switch_ab.py --switch DQ_TMA [--cases causal-1k,window4096-16k]
        # $OUT/switch_ab_DQ_TMA.json

Switches (``subquad.ops.softmax.flash.tuning``): ``DQ_TMA`` (dQ's sums in the dK/dV pass by TMA bulk reduce-adds
against vector atomics); ``FWD_OVERLAP`` (the band walks' forward with each P.V product beside the next tile's
softmax). Session 17 measured the forward's K/V tiles by TMA descriptors made in the kernel (a
``KV_DESC`` switch, since removed: 2-16% slower forward, ``benchmarks/results/2026-12-04-kv-desc-ab-h200.json``). Both
variants run alternately (A B A B, each a ``do_bench`` median; the faster of a variant's two rounds is kept, its
spread printed), on the same inputs; each variant has its own autotuners, and the configurations each chose are
recorded. Dense cases also time SDPA's flash (FA2) and cuDNN backends in the same process. Each case checks the
"on" variant's output and gradients against the "off" one's and against the fp32 reference on upcast inputs.
(Session 16 measured ``DQ_TMA`` with this script under its earlier name, ``dq_tma_ab.py``.)
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
from subquad.ops.softmax.flash import tuning

# (batch, length, pattern); B x N = 32k tokens, 16 heads, D 128 as in issue 4's table
CASES = {
    "causal-1k": (32, 1024, lambda: masks.causal),
    "causal-4k": (8, 4096, lambda: masks.causal),
    "causal-16k": (2, 16384, lambda: masks.causal),
    "full-1k": (32, 1024, lambda: None),
    "full-4k": (8, 4096, lambda: None),
    "full-16k": (2, 16384, lambda: None),
    "window4096-16k": (2, 16384, lambda: masks.sliding_window(4096)),
    "longformer-16k": (2, 16384, lambda: masks.longformer(512, list(range(16)))),
    "bigbird-16k": (2, 16384, lambda: masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0)),
    "strided-16k": (2, 16384, lambda: masks.strided(256)),
}


def _outputs(q, k, v, grad, mask, backward=True):
    o = attention(q, k, v, mask=mask, backend="triton")
    return (o, *torch.autograd.grad(o, (q, k, v), grad)) if backward else (o,)


def _rel(a, b):
    return round(((a.float() - b.float()).abs().max() / b.float().abs().max()).item(), 5)


def _reference_error(q, k, v, grad, mask, got):
    """Max |got - ref| / max |ref| of the output and each gradient on the first sequence's first 2 heads, against
    the reference backend in fp32 on upcast inputs."""
    part = lambda t: t[:1, :, :2].detach().float().requires_grad_()  # noqa: E731
    qf, kf, vf = part(q), part(k), part(v)
    o = attention(qf, kf, vf, mask=mask, backend="reference")
    ref = (o, *torch.autograd.grad(o, (qf, kf, vf), grad[:1, :, :2].float()))
    return [_rel(g[:1, :, :2], r) for g, r in zip(got, ref)]


def _case(name, switch):
    batch, n, make = CASES[name]
    mask = make()
    q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    got, tuned = {}, {False: {}, True: {}}

    def variant(on):
        setattr(tuning, switch, on)
        tuning._TUNED = tuned[on]

    for on in (False, True):
        variant(on)
        got[on] = _outputs(q, k, v, grad, mask)      # tunes this variant
    torch.cuda.synchronize()
    row = {"case": name, "batch": batch, "seqlen": n, "switch": switch,
           "on_vs_off_rel_err": [_rel(a, b) for a, b in zip(got[True], got[False])],
           "on_vs_fp32_rel_err": _reference_error(q, k, v, grad, mask, got[True]) if n <= 4096 else None}
    for mode in ("fwd", "fwdbwd"):
        times = {False: [], True: []}
        with torch.set_grad_enabled(mode == "fwdbwd"):
            for _ in range(2):
                for on in (False, True):
                    variant(on)
                    times[on].append(triton.testing.do_bench(
                        lambda: _outputs(q, k, v, grad, mask, mode == "fwdbwd"), warmup=10, rep=60,
                        return_mode="median"))
        row[mode] = {"off_ms": round(min(times[False]), 4), "on_ms": round(min(times[True]), 4),
                     "off_rounds": [round(t, 4) for t in times[False]],
                     "on_rounds": [round(t, 4) for t in times[True]],
                     "speedup": round(min(times[False]) / min(times[True]), 3)}
    row["chosen"] = {str(on): {kern: [str(c) for c in t[kern, True].chosen.values()] for kern in ("fwd", "bwd")
                               if (kern, True) in t} for on, t in tuned.items()}
    if mask is None or mask is masks.causal:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
        qt, kt, vt, gt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, grad))
        for peer_name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                   ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fwd(backend=backend):
                with sdpa_kernel(backend), torch.no_grad():
                    return sdpa(qt, kt, vt, is_causal=mask is not None)

            def fwdbwd(backend=backend):
                with sdpa_kernel(backend):
                    return torch.autograd.grad(sdpa(qt, kt, vt, is_causal=mask is not None), (qt, kt, vt), gt)
            row[peer_name] = {mode: round(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"), 4)
                              for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd))}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--switch", required=True, choices=("DQ_TMA", "FWD_OVERLAP"))
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    rows = []
    out = os.path.join(os.environ.get("OUT", "."), f"switch_ab_{args.switch}.json")
    for name in args.cases.split(","):
        try:
            rows.append(_case(name, args.switch))
        except Exception as exc:  # noqa: BLE001 - one case's failure is a row; the others still run
            import traceback
            traceback.print_exc()
            rows.append({"case": name, "error": repr(exc)[:400]})
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(),
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "versions": versions(),
                       "command": f"benchmarks/gpu/switch_ab.py --switch {args.switch}", "rows": rows}, f, indent=1)
    print(f"{'case':16} {'pass':7} {'off ms':>8} {'on ms':>8} {'x':>6}  peers (fa2 / cudnn)")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:16} {r['error'][:90]}")
            continue
        for mode in ("fwd", "fwdbwd"):
            m = r[mode]
            peers = " / ".join(str(r[p][mode]) for p in ("sdpa_flash", "sdpa_cudnn") if p in r)
            print(f"{r['case']:16} {mode:7} {m['off_ms']:8.4f} {m['on_ms']:8.4f} {m['speedup']:6.3f}  {peers}")
        print(f"{'':16} errors on/off {r['on_vs_off_rel_err']} on/fp32 {r['on_vs_fp32_rel_err']}")


if __name__ == "__main__":
    main()

"""One device call for the flash engine: a handful of timed shapes against SDPA (flash, cuDNN) and
FlexAttention, subquad's backward with atomic and deterministic dQ, printed as a short table and written to
``$OUT/flash_check.json``.

    PYTHONPATH=. python3 benchmarks/gpu/flash_check.py [--shapes 8x4096,2x16384]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton

import subquad
from subquad import masks

torch._dynamo.config.cache_size_limit = 1024


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel(b):
            return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                is_causal=causal).transpose(1, 2)

    return run


_FLEX = {}


def _flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[1]
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    bm = None
    if causal:
        key = ("causal", n)
        if key not in _FLEX:
            _FLEX[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=q.device)
        bm = _FLEX[key]
    return _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm).transpose(1, 2)


def _ours(deterministic=False):
    def run(q, k, v, causal):
        return subquad.attention(q, k, v, causal=causal, backend="triton", deterministic=deterministic)

    return run


def _time(fn, q, k, v, causal, mode):
    if mode == "fwd":
        return triton.testing.do_bench(lambda: fn(q, k, v, causal), warmup=100, rep=300, return_mode="median")
    out = fn(q, k, v, causal)
    g = torch.randn_like(out)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, causal).backward(g)

    return triton.testing.do_bench(step, warmup=100, rep=300, return_mode="median")


def main():
    dev = "cuda"
    shapes = [(32, 1024), (8, 4096), (2, 16384), (1, 65536)]
    if "--shapes" in sys.argv:
        spec = sys.argv[sys.argv.index("--shapes") + 1]
        shapes = [tuple(int(x) for x in s.split("x")) for s in spec.split(",")]
    impls = {"subquad": _ours(), "subquad-det": _ours(True), "sdpa-flash": _sdpa("flash"),
             "sdpa-cudnn": _sdpa("cudnn"), "flex": _flex}
    rows = []
    for bsz, n in shapes:
        for causal in (True, False):
            for mode in ("fwd", "fwdbwd"):
                gen = torch.Generator(device=dev).manual_seed(0)
                q, k, v = (torch.randn(bsz, n, 16, 128, device=dev, dtype=torch.bfloat16, generator=gen)
                           .requires_grad_(mode == "fwdbwd") for _ in range(3))
                flops = 4 * bsz * 16 * n * n * 128 * (0.5 if causal else 1.0) * (3.5 if mode == "fwdbwd" else 1.0)
                row = {"batch": bsz, "n": n, "causal": causal, "mode": mode}
                ref = _sdpa("flash")(q, k, v, causal)
                for name, fn in impls.items():
                    if name == "subquad-det" and mode == "fwd":
                        continue
                    try:
                        err = (fn(q, k, v, causal).float() - ref.float()).abs().max().item()
                        ms = _time(fn, q, k, v, causal, mode)
                        row[name] = {"ms": ms, "tflops": flops / ms * 1e-9, "err_vs_fa2": err}
                    except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, not fatal
                        row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                rows.append(row)
                cells = []
                for name in impls:
                    r = row.get(name)
                    if r is None:
                        continue
                    cells.append(f"{name}={r['tflops']:.0f}" if "tflops" in r else f"{name}=ERR")
                print(f"{bsz}x{n} {'causal' if causal else 'full'} {mode}: " + " ".join(cells), flush=True)
                del q, k, v, ref
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "flash_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows}, f, indent=1)
    print("\nratios (subquad / peer, TFLOP/s):")
    for r in rows:
        s = r.get("subquad", {}).get("tflops")
        if s is None:
            continue
        parts = [f"{p}={s / r[p]['tflops']:.2f}" for p in ("sdpa-flash", "sdpa-cudnn", "flex")
                 if "tflops" in r.get(p, {})]
        print(f"  {r['batch']}x{r['n']} {'causal' if r['causal'] else 'full'} {r['mode']}: {' '.join(parts)}")


if __name__ == "__main__":
    main()

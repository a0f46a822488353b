"""Each flash kernel configuration forced in turn on dense attention at short and mid lengths, against SDPA's
flash and cuDNN kernels in the same process (bf16, 16 heads, D 128, B·N = 32k, do_bench medians).

    PYTHONPATH=. python3 benchmarks/gpu/flash_config_sweep.py      # writes $OUT/flash_config_sweep.json

The autotuner's key has no sequence length (a new length would re-time every configuration), so dense causal
runs one configuration from 1k to 64k; issue 4's 1k target (1.2x SDPA-flash) is the one missed. This shows
whether another configuration wins at 1k (2 CTAs an SM through fewer pipeline stages, 64-row tiles) and by how
much, which decides whether the key should carry a length bucket. ``SWEEP_SHAPES=32x1024,8x4096``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from subquad import attention
from subquad.bench.harness import versions
from subquad.ops.softmax.flash import launch

cfg = launch._cfg
FWD = [cfg(128, 64, 4, 3), cfg(128, 128, 8, 3), cfg(128, 64, 8, 3), cfg(128, 128, 8, 2), cfg(128, 64, 4, 2),
       cfg(128, 32, 4, 2), cfg(64, 64, 4, 2), cfg(64, 64, 4, 3), cfg(64, 128, 4, 2), cfg(128, 128, 4, 2)]
DKDV = [cfg(64, 128, 8, 2), cfg(32, 128, 4, 3), cfg(64, 128, 8, 3), cfg(64, 64, 4, 3), cfg(32, 64, 4, 2),
        cfg(64, 64, 4, 2), cfg(32, 128, 4, 2), cfg(16, 128, 4, 2)]


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return round(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"), 4)


def forced(name: str, configs: list):
    """Only ``configs`` for kernel list ``name`` (the autotuner then times none when there is one)."""
    attr = {"fwd": "FWD_CONFIGS_SM90", "dkdv": "BWD_CONFIGS_SM90"}[name]
    setattr(launch, attr, configs)
    launch._TUNED.clear()


def main():
    shapes = [tuple(int(x) for x in s.split("x")) for s in os.environ.get("SWEEP_SHAPES", "32x1024,8x4096").split(",")]
    defaults = {"fwd": list(launch.FWD_CONFIGS_SM90), "dkdv": list(launch.BWD_CONFIGS_SM90)}
    rows = []

    def row(**kw):
        rows.append(kw)
        print(kw, flush=True)

    for batch, n in shapes:
        q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        for causal in (True, False):
            case = dict(batch=batch, seqlen=n, causal=causal)
            for peer, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                def sdpa():
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                row(**case, impl=peer, fwd_ms=bench(sdpa),
                    fwdbwd_ms=bench(lambda: torch.autograd.grad(sdpa(), (qt, kt, vt), grad.transpose(1, 2))))
            fwd = lambda: attention(q, k, v, causal=causal, backend="triton")
            fwdbwd = lambda: torch.autograd.grad(fwd(), (q, k, v), grad)
            row(**case, impl="autotuned", fwd_ms=bench(fwd), fwdbwd_ms=bench(fwdbwd))
            for kind, configs, timed, fn in (("fwd", FWD, "fwd_ms", fwd), ("dkdv", DKDV, "fwdbwd_ms", fwdbwd)):
                for c in configs:
                    forced(kind, [c])
                    name = f"{kind} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                    try:
                        row(**case, impl=name, **{timed: bench(fn)})
                    except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is a row
                        row(**case, impl=name, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                forced(kind, defaults[kind])
    with open(os.path.join(os.environ.get("OUT", "."), "flash_config_sweep.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Each flash kernel configuration forced in turn on dense attention at short and mid lengths, against SDPA's
flash and cuDNN kernels in the same process (bf16, 16 heads, D 128, B·N = 32k, do_bench medians).

    PYTHONPATH=. python3 benchmarks/gpu/flash_config_sweep.py      # writes $OUT/flash_config_sweep.json

The autotuner's key has no sequence length (a new length would re-time every configuration), so dense causal
runs one configuration from 1k to 64k; issue 4's 1k target (1.2x SDPA-flash) is the one missed. This shows
whether another configuration wins at 1k (2 CTAs an SM through fewer pipeline stages, 64-row tiles) and by how
much, which decides whether the key should carry a length bucket. ``SWEEP_SHAPES=32x1024,8x4096``.

``SWEEP_CASES``: patterns by ``source_ab.py``'s case names (``blocksparse0.1-16k,window4096-16k``), timed the same
way without the SDPA peers; ``SWEEP_FWD`` / ``SWEEP_DKDV``: the configurations tried, as ``BMxBNxWARPSxSTAGES``
with an optional ``xMAXNREG`` (a register cap; comma-separated; ``none`` for none), instead of the lists below.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from subquad import attention
from subquad.bench.harness import versions
from subquad.ops.softmax.flash import tuning

cfg = tuning._cfg
FWD = [cfg(128, 64, 4, 3), cfg(128, 128, 8, 3), cfg(128, 64, 8, 3), cfg(128, 128, 8, 2), cfg(128, 64, 4, 2),
       cfg(128, 32, 4, 2), cfg(64, 64, 4, 2), cfg(64, 64, 4, 3), cfg(64, 128, 4, 2), cfg(128, 128, 4, 2)]
DKDV = [cfg(64, 128, 8, 2), cfg(32, 128, 4, 3), cfg(64, 128, 8, 3), cfg(64, 64, 4, 3), cfg(32, 64, 4, 2),
        cfg(64, 64, 4, 2), cfg(32, 128, 4, 2), cfg(16, 128, 4, 2)]


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return round(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"), 4)


def forced(name: str, configs: list, short_walks: dict | None = None):
    """Only ``configs`` for kernel list ``name`` (the autotuner then times none when there is one): that kernel's
    short-walk tiles off while forcing, ``short_walks`` back after."""
    attr, walks = {"fwd": ("FWD_CONFIGS_SM90", "FWD_SHORT_WALKS"),
                   "dkdv": ("BWD_CONFIGS_SM90", "BWD_SHORT_WALKS")}[name]
    setattr(tuning, attr, configs)
    setattr(tuning, walks, short_walks or {})
    tuning._TUNED.clear()


def _configs(env: str, default: list) -> list:
    spec = os.environ.get(env)
    if spec is None:
        return default
    configs = []
    for c in ([] if spec == "none" else spec.split(",")):
        bm, bn, warps, stages, *maxnreg = (int(x) for x in c.split("x"))
        configs.append(cfg(bm, bn, warps, stages, maxnreg=maxnreg[0] if maxnreg else None))
    return configs


def _pattern_cases(names: str) -> list:
    """``(case, batch, n, mask)`` for ``source_ab.py``'s case names."""
    path = Path(__file__).with_name("source_ab.py")
    spec = importlib.util.spec_from_file_location("source_ab", path)
    source_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source_ab)
    from subquad import masks  # noqa: F401  (the cases' expressions name it)
    out = []
    for name in names.split(","):
        batch, n, expr = source_ab.CASES[name]
        out.append((name, batch, n, eval(expr)))  # noqa: S307  (source_ab's table)
    return out


def main():
    fwd_list, dkdv_list = _configs("SWEEP_FWD", FWD), _configs("SWEEP_DKDV", DKDV)
    shapes = [tuple(int(x) for x in s.split("x")) for s in os.environ.get("SWEEP_SHAPES", "32x1024,8x4096").split(",")
              if s]
    cases = [(f"{'causal' if causal else 'full'}", batch, n, causal) for batch, n in shapes for causal in (True, False)]
    if os.environ.get("SWEEP_CASES"):
        cases += _pattern_cases(os.environ["SWEEP_CASES"])
    defaults = {"fwd": list(tuning.FWD_CONFIGS_SM90), "dkdv": list(tuning.BWD_CONFIGS_SM90)}
    short_walks = {"fwd": dict(tuning.FWD_SHORT_WALKS), "dkdv": dict(tuning.BWD_SHORT_WALKS)}
    rows = []

    def row(**kw):
        rows.append(kw)
        print(kw, flush=True)

    for name, batch, n, mask in cases:
        dense = isinstance(mask, bool)
        q, k, v = (torch.randn(batch, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        case = dict(case=name, batch=batch, seqlen=n)
        if dense:
            causal = mask
            case["causal"] = causal
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            for peer, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                def sdpa():
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                row(**case, impl=peer, fwd_ms=bench(sdpa),
                    fwdbwd_ms=bench(lambda: torch.autograd.grad(sdpa(), (qt, kt, vt), grad.transpose(1, 2))))
            fwd = lambda: attention(q, k, v, causal=causal, backend="triton")  # noqa: E731
        else:
            fwd = lambda: attention(q, k, v, mask=mask, backend="triton")  # noqa: E731
        fwdbwd = lambda: torch.autograd.grad(fwd(), (q, k, v), grad)  # noqa: E731
        row(**case, impl="autotuned", fwd_ms=bench(fwd), fwdbwd_ms=bench(fwdbwd))
        for kind, configs, timed, fn in (("fwd", fwd_list, "fwd_ms", fwd), ("dkdv", dkdv_list, "fwdbwd_ms", fwdbwd)):
            for c in configs:
                forced(kind, [c])
                impl = f"{kind} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}" + (
                    f" r{c.maxnreg}" if c.maxnreg else "")
                try:
                    row(**case, impl=impl, **{timed: bench(fn)})
                except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is a row
                    row(**case, impl=impl, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            forced(kind, defaults[kind], short_walks[kind])
    with open(os.path.join(os.environ.get("OUT", "."), "flash_config_sweep.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                   "versions": versions(), "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

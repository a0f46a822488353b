"""Two versions of subquad's source on the same cases, each in its own processes, alternated (A B A B).

    git archive BASE subquad | tar -x -C .calls/base                     # here: the older tree, carried
    PYTHONPATH=. python3 benchmarks/gpu/source_ab.py --base .calls/base --cases causal-1k,window4096-16k \\
        --out $OUT/source_ab.json

``--deterministic head`` (or ``base``, ``both``) runs that version's backward deterministic; with ``--base .``
that compares the two backwards of one tree.

A kernel change shows up only as a change of the kernel's source, which a process compiles once: so the versions
cannot alternate inside one process (as ``switch_ab.py`` does with a module switch). Each round runs one child process per
version; a child times every case (fwd, then fwd+bwd, or a decode case's one pass; ``do_bench`` medians) on the same seeded inputs and reports
its outputs' checksum. The faster of a version's rounds is kept, the spread printed. The autotuner runs in every
child (its results persist with ``TRITON_CACHE_AUTOTUNING``), so each version runs with its own choice.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

# (batch, length, pattern) at B x N = 32k tokens, 16 heads, D 128, bf16 (issue 4's table); patterns by name so
# that the parent never imports the library
CASES = {
    "causal-1k": (32, 1024, "masks.causal"),
    "causal-4k": (8, 4096, "masks.causal"),
    "causal-16k": (2, 16384, "masks.causal"),
    "full-1k": (32, 1024, "None"),
    "window4096-16k": (2, 16384, "masks.sliding_window(4096)"),
    "longformer-16k": (2, 16384, "masks.longformer(512, list(range(16)))"),
    "bigbird-16k": (2, 16384, "masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0)"),
    "longformer-64k": (1, 65536, "masks.longformer(512, list(range(16)))"),
    "bigbird-64k": (1, 65536, "masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0)"),
    "strided-16k": (2, 16384, "masks.strided(256)"),
    "strided-64k": (1, 65536, "masks.strided(256)"),
    "fixed-16k": (2, 16384, "masks.fixed(128, 8)"),
    "fixed-64k": (1, 65536, "masks.fixed(128, 8)"),
    "dilated-16k": (2, 16384, "masks.dilated(4096, 4)"),
    "full-16k": (2, 16384, "None"),
    # the flash suite's layouts (one random 128 x 128 cell layout, seed 0, at each density)
    **{f"blocksparse{rho}-16k": (2, 16384, "masks.block_sparse(torch.rand(128, 128, generator=torch.Generator()"
                                           f".manual_seed(0)) < {rho}, 128)") for rho in (0.1, 0.25, 0.5)},
    "document-4k": (8, 4096, "masks.document(torch.tensor([0] * 1000 + [1] * 1500 + [2] * 1596))"),
    # block-local attention: 128-key blocks on the diagonal, one key block a query block (DQ_STORE)
    "blockdiag-16k": (2, 16384, "masks.block_sparse(torch.eye(128, dtype=torch.bool), 128)"),
}
# the decode suite's cases (one pass, ``decode``): (batch, context, the suite's input maker and its arguments)
DECODE_CASES = {
    **{f"gqa-decode-{n // 1024}k": (8, n, "_gqa_inputs", (8, n, 32, 8, 128)) for n in (8192, 32768, 131072)},
    **{f"mla-decode-{n // 1024}k": (64, n, "_mla_inputs", (64, n, 128, 512, 64)) for n in (4096, 16384)},
}


def _decode_case(name: str) -> tuple:
    """``(inputs, call)`` of a decode case: the static (or latent) cache, as the suite's ``subquad-static``."""
    import torch

    from subquad import decode
    from subquad.bench.suites import decode as suite

    _, _, maker, args = DECODE_CASES[name]
    inputs = getattr(suite, maker)(*args, torch.bfloat16)("cuda")
    if "view" in inputs:
        return lambda: decode(inputs["q"], inputs["view"])
    return lambda: decode(inputs["q"], inputs["k"], inputs["v"])


def _tiles_chosen(seen: set) -> list[str]:
    """The flash kernels' tuned configurations chosen since the last call (``Autotuned.chosen``): two trees that
    time apart on the same kernel code may only have tuned to different tiles (the causal 1k forward's two best
    tiles were 1.6% apart on the H100, session 45). Empty for a tree whose tuning lives elsewhere."""
    try:
        from subquad.ops.softmax.flash import tuning
    except ImportError:
        return []
    new = []
    for (kernel, _), wrapper in tuning._TUNED.items():
        for key, config in wrapper.chosen.items():
            if (kernel, key) not in seen:
                seen.add((kernel, key))
                tile = {k: v for k, v in config.items() if k.isupper() or k in ("num_warps", "num_stages")}
                new.append(f"{kernel} {tile}")
    return new


def child(cases: list[str], deterministic: bool) -> dict:
    import torch
    import triton.testing

    import subquad
    from subquad import attention, masks  # noqa: F401  (the patterns' names)

    out = {"subquad": str(Path(subquad.__file__).parent)}
    seen: set = set()
    for name in cases:
        if name in DECODE_CASES:
            call = _decode_case(name)
            out[name] = {"decode": triton.testing.do_bench(call, warmup=50, rep=300),
                         "checksum": [float(call().float().abs().sum())]}
            print(name, out[name], flush=True)
            continue
        b, n, expr = CASES[name]
        mask = eval(expr)  # noqa: S307  (the table above)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, n, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(b, n, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)

        def fwd():
            return attention(q, k, v, mask=mask, backend="triton", deterministic=deterministic)

        def fwdbwd():
            return torch.autograd.grad(fwd(), (q, k, v), grad)

        with torch.no_grad():
            o = fwd()
        dq, dk, dv = fwdbwd()
        out[name] = {"fwd": triton.testing.do_bench(lambda: fwd().sum(), warmup=50, rep=300),
                     "fwdbwd": triton.testing.do_bench(fwdbwd, warmup=50, rep=300),
                     "checksum": [float(t.float().abs().sum()) for t in (o, dq, dk, dv)],
                     "tiles": _tiles_chosen(seen)}
        print(name, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in out[name].items()}, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="the older tree (a directory holding subquad/)")
    ap.add_argument("--head", default=".", help="the newer tree (default: this one)")
    ap.add_argument("--cases", default=",".join(CASES), help="names of CASES and DECODE_CASES")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--deterministic", choices=("none", "base", "head", "both"), default="none",
                    help="which version's backward runs deterministic")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.child:
        print("RESULT " + json.dumps(child(cases, args.deterministic == "both")), flush=True)
        return
    trees = {"base": str(Path(args.base).resolve()), "head": str(Path(args.head).resolve())}
    runs = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree] + os.environ.get("PYTHONPATH", "").split(
                os.pathsep)))
            det = ["--deterministic", "both"] if args.deterministic in (name, "both") else []
            proc = subprocess.run([sys.executable, __file__, "--child", "--cases", args.cases, *det], env=env,
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
                continue
            runs[name].append(json.loads(lines[-1][7:]))
            for ln in proc.stdout.splitlines():     # TRITON_PRINT_AUTOTUNING=1: each tuner's choice
                if "best config" in ln:
                    print(f"{name}: {ln}", flush=True)
            print(f"{name} round {len(runs[name])} done ({runs[name][-1]['subquad']})", flush=True)
        # after every round: a call cut off by its time limit keeps the rounds it finished
        summarize(args, cases, trees, runs)


def summarize(args, cases, trees, runs):
    """Print one row per (case, pass) from the rounds so far and write them to ``--out``."""
    rows = []
    for case in cases:
        batch, seqlen = (DECODE_CASES if case in DECODE_CASES else CASES)[case][:2]
        for mode in ("decode",) if case in DECODE_CASES else ("fwd", "fwdbwd"):
            row = {"case": case, "batch": batch, "seqlen": seqlen, "mode": mode}
            for name in trees:
                times = [r[case][mode] for r in runs[name] if case in r]
                if times:
                    row[f"{name}_ms"], row[f"{name}_spread"] = min(times), max(times) - min(times)
            for name in trees:      # the first round tunes: its choice holds for the rounds after it
                tiles = [t for r in runs[name][:1] for t in r.get(case, {}).get("tiles", [])]
                if tiles:
                    row[f"{name}_tiles"] = tiles
            if "base_ms" in row and "head_ms" in row:
                row["speedup"] = row["base_ms"] / row["head_ms"]
            sums = {name: runs[name][0][case]["checksum"] for name in trees if runs[name] and case in runs[name][0]}
            if len(sums) == 2:
                row["checksum_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(*sums.values()))
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        import torch
        import triton
        meta = {"device": torch.cuda.get_device_name(), "date": _dt.date.today().isoformat(),
                "torch": torch.__version__, "triton": triton.__version__, "heads": 16, "head_dim": 128,
                "dtype": "bfloat16", "base": args.base,
                "deterministic": args.deterministic}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

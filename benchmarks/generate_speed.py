"""Decoding speed of a HybridLM, eager steps against one compiled step (``generate(compile_step=True)``).

    PYTHONPATH=. python3 benchmarks/generate_speed.py --out bench-out/generate [--layers AAAA,LLLG,MMMA]

Each model (random weights, d_model 512, bf16 on a GPU) generates ``--new`` tokens greedily after a prompt of
``--prompt`` tokens, at each batch size; the first call of each form is a warm-up (the compiled step compiles
there), then the median of ``--repeats`` timed calls. Tokens/s counts generated tokens (batch x new) over the
whole call, the prefill included. Both forms must give the same tokens: the JSON records whether they did.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from subquad.models import HybridLM


def _timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()                                   # warm-up: compilation, autotuning, allocator
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="AAAA,LLLG,MMMA,KKKK")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for layers in a.layers.split(","):
        torch.manual_seed(0)
        model = HybridLM(256, a.d_model, layers, mixer_options={"L": {"window": 64}}).to(device, dtype).eval()
        for bsz in (int(b) for b in a.batch.split(",")):
            prompt = torch.randint(0, 256, (bsz, a.prompt), device=device)
            row = {"layers": layers, "batch": bsz, "prompt": a.prompt, "new": a.new}
            outs = {}
            for form, compiled in (("eager", False), ("compiled", True)):
                seconds, outs[form] = _timed(lambda: model.generate(prompt, a.new, temperature=0,
                                                                    compile_step=compiled), a.repeats)
                row[f"{form}_s"] = seconds
                row[f"{form}_tokens_per_s"] = bsz * a.new / seconds
            row["same_tokens"] = bool(torch.equal(outs["eager"], outs["compiled"]))
            row["speedup"] = row["eager_s"] / row["compiled_s"]
            rows.append(row)
            print(f"{layers:6s} B {bsz:3d}: eager {row['eager_tokens_per_s']:9.0f} tok/s, compiled "
                  f"{row['compiled_tokens_per_s']:9.0f} tok/s ({row['speedup']:.2f}x), same tokens "
                  f"{row['same_tokens']}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "d_model": a.d_model, "dtype": str(dtype)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate-speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Train a 4-layer HybridLM of each mixer kind on the standard-library byte corpus; one table, one JSON, one PNG.

    PYTHONPATH=. python3 benchmarks/train_kinds.py --out bench-out/train-kinds [--steps 2000] [--max-seconds 25]
    PYTHONPATH=. python3 benchmarks/train_kinds.py --out DIR --merge PART1.json PART2.json ...

A device call holds about six kinds at 2,000 steps, so the full table is run in parts (``--kinds``) and merged.

Each kind trains ``--steps`` steps (bf16 autocast on a GPU) or as many as fit in ``--max-seconds`` (the cosine
schedule is fitted to the steps that fit, measured after 30 steps); tokens/s excludes the first steps (kernel
compilation) and evaluation. Validation bits per byte at the end, on fixed windows of held-out files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from subquad.data import load_corpus
from subquad.train import TrainConfig, plot_history, train

KINDS = {"A": "attention", "L": "local (window 128)", "D": "diff attention", "K": "MLA", "F": "linear (elu+1)",
         "R": "RetNet", "E": "GLA", "M": "Mamba-2", "N": "DeltaNet", "Y": "Gated DeltaNet",
         "MMMA": "Jamba-style M:A 3:1", "LLLG": "Gemma-3-style local:global 3:1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=25.0)
    ap.add_argument("--max-bytes", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench-out/train-kinds", help="train_kinds.json and train_kinds.png")
    ap.add_argument("--merge", nargs="+", help="train_kinds.json files of runs over disjoint kinds: one table")
    ap.add_argument("--runs-dir", default="/tmp/train-kinds-runs", help="each kind's checkpoint and loss.png")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge([json.loads(Path(p).read_text()) for p in args.merge], out)
        return
    corpus = load_corpus(args.max_bytes or None)
    rows, histories = [], {}
    for kind in args.kinds.split(","):
        layers = kind * 4 if len(kind) == 1 else kind
        cfg = TrainConfig(layers=layers, d_model=args.d_model, seq_len=args.seq_len, batch_size=args.batch_size,
                          steps=args.steps, lr=1e-3, warmup=100, eval_every=max(args.steps // 4, 1), eval_batches=8,
                          device=args.device, max_seconds=args.max_seconds, out=str(Path(args.runs_dir) / layers))
        row = {"kind": kind, "name": KINDS.get(kind, kind), "layers": layers}
        try:
            r = train(cfg, progress=False, corpus=corpus)
            row.update(steps=cfg.steps, params=r.params, tokens_per_s=round(r.tokens_per_s),
                       final_val_bpb=round(r.final_val_bpb, 4), final_train_loss=round(r.history["loss"][-1], 4),
                       seconds=round(r.seconds, 1))
            histories[f"{kind} {KINDS.get(kind, '')}"] = r.history
        except Exception as err:  # a kind that fails on this device is recorded, the others go on
            row["error"] = f"{type(err).__name__}: {err}"[:400]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(out, args, corpus, rows, histories)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _print_table(rows)


def merge(parts: list[dict], out: Path) -> None:
    """One result from runs over disjoint kinds on the same device and versions (the first part's header)."""
    for key in ("device", "versions", "config"):
        if any(p[key] != parts[0][key] for p in parts):
            raise ValueError(f"--merge: the parts differ in {key}: {[p[key] for p in parts]}")
    result = dict(parts[0], rows=[r for p in parts for r in p["rows"]],
                  histories={k: v for p in parts for k, v in p["histories"].items()})
    (out / "train_kinds.json").write_text(json.dumps(result, indent=1))
    plot_history(result["histories"], out / "train_kinds.png")
    _print_table(result["rows"])


def _print_table(rows: list) -> None:
    print(f"{'kind':6s} {'name':32s} {'steps':>6s} {'tok/s':>10s} {'val bpb':>8s}")
    for r in rows:
        print(f"{r['kind']:6s} {r['name']:32s} {r.get('steps', '-')!s:>6s} {r.get('tokens_per_s', '-')!s:>10s} "
              f"{r.get('final_val_bpb', r.get('error', '-'))!s:>8s}")


def write(out: Path, args, corpus, rows: list, histories: dict) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"suite": "train-kinds", "device": device, "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                           "triton": _version("triton")},
              "corpus": {"root": corpus.root, "files": corpus.files, "train_bytes": corpus.train.numel(),
                         "val_bytes": corpus.val.numel()},
              "config": {k: v for k, v in asdict(TrainConfig(d_model=args.d_model, seq_len=args.seq_len,
                                                             batch_size=args.batch_size, steps=args.steps, lr=1e-3,
                                                             warmup=100)).items()
                         if k in ("d_model", "seq_len", "batch_size", "steps", "lr", "warmup", "weight_decay")},
              "max_seconds": args.max_seconds, "bf16": torch.cuda.is_available(), "rows": rows,
              "histories": histories}
    (out / "train_kinds.json").write_text(json.dumps(result, indent=1))
    if histories:
        plot_history(histories, out / "train_kinds.png")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")

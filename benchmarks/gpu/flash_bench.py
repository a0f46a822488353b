"""Run the ``flash`` bench suite case by case, writing the harness's JSON rows after every case (a device
call cut off at its time limit keeps what it measured), then print the ratios the issue asks for.

    PYTHONPATH=. python3 benchmarks/gpu/flash_bench.py OUT.json [--only causal,full] [--skip-impl sdpa-efficient]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from subquad.bench.harness import run_cases
from subquad.bench.report import write_json
from subquad.bench.suites.flash import flash_cases


def _arg(name):
    return sys.argv[sys.argv.index(name) + 1].split(",") if name in sys.argv else None


def main():
    path = Path(sys.argv[1])
    only, skip = _arg("--only"), _arg("--skip-impl") or []
    rows = []
    for case in flash_cases(False):
        if only and case.case not in only:
            continue
        rows += run_cases([case], torch.device("cuda"), impl_filter=lambda i: i not in skip)
        write_json(rows, path)
        for r in rows[-len(case.impls):]:
            cell = f"{r.get('tflops', 0) or 0:.0f} TF/s {r.get('ms', 0) or 0:.3f} ms err {r.get('max_err')}" \
                if "error" not in r else r["error"][:120]
            print(f"{r['case']} B={case.batch} N={r['seqlen']} {r['mode']} {r['impl']}: {cell}", flush=True)


if __name__ == "__main__":
    main()

"""Run benchmark suites on the device without the CLI's dependencies (typer, rich are not installed there).

    PYTHONPATH=. python3 benchmarks/gpu/suite_run.py SUITE[,SUITE...] [NAME]

Writes ``$OUT/NAME.json`` (the harness rows, as ``subquad bench`` writes them) after every case, and prints one
line per row at the end. ``SUITE_CASES=name,name`` keeps those cases only, ``SUITE_MAX_N=16384`` the shapes up to
that length, ``SUITE_MIN_N`` from that length, ``SUITE_IMPLS=impl,impl`` those implementations,
``SUITE_MODES=fwd,fwdbwd`` those passes (a device call runs ten minutes at most). ``SUITE_RESUME=path.json``
(an earlier call's output, carried back to the device) keeps its rows and skips the cases they cover, so one suite
can be spread over several calls.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from subquad.bench import harness


def main():
    names = sys.argv[1].split(",")
    out_name = sys.argv[2] if len(sys.argv) > 2 else "_".join(names)
    suites = harness.load_suites()
    rows = []
    resume = os.environ.get("SUITE_RESUME")
    if resume:
        with open(resume) as f:
            rows = json.load(f)
    start = time.time()
    done = {(r["case"], r["mode"], r.get("batch"), r.get("seqlen")) for r in rows}
    for name in names:
        # case by case, the JSON rewritten after each: a call that runs out of time keeps what it measured
        wanted = os.environ.get("SUITE_CASES")
        longest = int(os.environ.get("SUITE_MAX_N", "0")) or None
        shortest = int(os.environ.get("SUITE_MIN_N", "0"))
        impls = os.environ.get("SUITE_IMPLS")
        modes = os.environ.get("SUITE_MODES")
        for case in suites[name].cases(False):
            if (wanted and case.case not in wanted.split(",")) or (longest and case.seqlen > longest) \
                    or case.seqlen < shortest or (modes and case.mode not in modes.split(",")) \
                    or (case.case, case.mode, case.batch, case.seqlen) in done:
                continue
            if impls:
                # a case whose reference is one of its implementations keeps it: it is what the others are
                # checked against (the decode steps' torch-eager)
                keep = impls.split(",") + ([case.reference] if isinstance(case.reference, str) else [])
                case.impls = {k: f for k, f in case.impls.items() if k in keep}
            # each implementation's start, with the seconds so far: a case cut off by the call's limit writes no
            # row, and this says which implementation (a compile, a first autotuning) took the time
            rows += harness.run_cases([case], torch.device("cuda"), progress=lambda what: print(
                f"  {time.time() - start:6.0f} s  {what}", flush=True))
            with open(os.path.join(os.environ.get("OUT", "."), f"{out_name}.json"), "w") as f:
                json.dump(rows, f, indent=1)
            print(f"done {case.case} {case.mode} {case.batch}x{case.seqlen}", flush=True)
    for r in rows:
        shape = f"{r.get('batch', '')}x{r.get('seqlen', '')}"
        figures = f"{r['ms']:.4f} ms" if "ms" in r else r.get("error", "")[:70]
        extra = f" {r['gbps']:.0f} GB/s" if r.get("gbps") else (f" {r['tflops']:.0f} TF" if r.get("tflops") else "")
        print(f"{r['case']:26s} {r['mode']:7s} {shape:9s} {r['impl']:22s} {figures}{extra}")


if __name__ == "__main__":
    main()

"""Which autotuned configuration of the delta rule's kernels gives wrong results on this GPU.

Session 35's GPU run (H100, Triton 3.6, linear autotuning on) failed ``test_delta_kernel_matches_reference`` for
the gated rule at chunk 64, T = 70, fp32, in the fused and split forward forms (two-pass passed); on the CPU
interpreter the same case is within 0.5% of its tolerance. Triton 3.6 is known to miscompile some gated chunk
kernels on Hopper for some configurations (fla prunes one): this forces each configuration of each autotuned
kernel in turn (the others on their first) and prints every output's error over the test's tolerance.

    PYTHONPATH=.:tests python3 benchmarks/gpu/delta_config_check.py     # writes $OUT/delta_config_check.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton

sys.path.insert(0, "tests")
import test_delta_kernels as cases  # noqa: E402
from conftest import set_forward_form  # noqa: E402

from subquad.ops.autotuned import Autotuned  # noqa: E402
from subquad.ops.delta import chunk as delta_chunk, wy  # noqa: E402
from subquad.ops.linear import chunk_bwd, chunk_fwd, chunk_intra  # noqa: E402

NAMES = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dinitial_state"]


class Patch:
    def setattr(self, obj, name, value):
        setattr(obj, name, value)


def tuners():
    """(name, autotuner, Autotuned wrappers around it) of every autotuned kernel the delta rule's path uses."""
    found = {}
    for module in (chunk_fwd, chunk_bwd, chunk_intra, wy, delta_chunk):
        for name, obj in vars(module).items():
            tuner = obj.tuner if isinstance(obj, Autotuned) else obj
            if isinstance(tuner, triton.runtime.autotuner.Autotuner):
                entry = found.setdefault(id(tuner), (f"{module.__name__.split('.')[-1]}.{name}", tuner, []))
                if isinstance(obj, Autotuned):
                    entry[2].append(obj)
    return list(found.values())


def reset(all_tuners):
    for _, tuner, wrappers in all_tuners:
        tuner.cache = {}
        for w in wrappers:
            w.chosen = {}


def errors(form, gated, chunk, t):
    set_forward_form(Patch(), form)
    tensors = cases._inputs(gated, 2, t)
    got = cases._run("triton", tensors, chunk_size=chunk)
    want = cases._run("reference", tensors, chunk_size=chunk)
    return {n: round(((a - b).abs().max() / (2e-4 + 2e-4 * b.abs().max())).item(), 3)
            for n, a, b in zip(NAMES, got, want) if a is not None}


def save(rows):
    """Written after every row: session 36's run was cut by its time limit and left nothing."""
    with open(os.path.join(os.environ.get("OUT", "."), "delta_config_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "triton": triton.__version__, "rows": rows}, f, indent=1)


def main():
    all_tuners = tuners()
    full = {id(t): list(t.configs) for _, t, _ in all_tuners}
    rows = []
    for _, t, _ in all_tuners:
        t.configs = full[id(t)][:1]
    reset(all_tuners)
    for form in ("fused", "two-pass"):
        rows.append(dict(kernel="(every first config)", config="", form=form, errors=errors(form, True, 64, 70)))
        print(rows[-1], flush=True)
        save(rows)
    for name, tuner, _ in all_tuners:
        for config in full[id(tuner)][1:]:
            tuner.configs = [config]
            reset(all_tuners)
            for form in ("fused", "two-pass"):
                try:
                    rows.append(dict(kernel=name, config=str(config), form=form, errors=errors(form, True, 64, 70)))
                except Exception as exc:  # noqa: BLE001 - a configuration that fails to compile is a row
                    rows.append(dict(kernel=name, config=str(config), form=form, error=str(exc)[:200]))
                bad = {k: v for k, v in rows[-1].get("errors", {}).items() if v > 1}
                print(name, config, form, bad or rows[-1].get("error", "ok"), flush=True)
                save(rows)
        tuner.configs = full[id(tuner)][:1]
    save(rows)


if __name__ == "__main__":
    main()

"""Which kernel configurations compute a chained dot once per warpgroup (``subquad.ops.chained``), on a machine
without a GPU.

Records the launches of ``tests/test_sm90_compile.py``'s forward and backward of every kernel family, compiles
each recorded variant for sm90 under every autotuning configuration with 8 warps or more that its autotuner's
early prune keeps for that launch (with what the prune sets: the flash kernels' ``UNCHAIN``), and prints
one line each: ``REPLICATED`` where a tensor-core dot's result layout puts more rows of warps on M than the dot
has (16 rows a warp), with the (rows, warps on M, warps on N) of such dots::

    python benchmarks/chained_dots_report.py [KERNEL_PREFIX ...]

Use the Triton the GPU has (see ``kernel_report.py``). The decode kernel's ``SPLIT_SCORE_TILE`` comes with the
recorded launch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MMA = re.compile(r"#(mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d), versionMinor = \d, "
                 r"warpsPerCTA = \[(\d+), (\d+)\]")
DOT = re.compile(r"(?:warp_group_dot|tt\.dot) [^\n]*-> tensor<(\d+)x\d+xf32, #(mma\d*)>")


def replicated(ttgir: str) -> list[tuple[int, int, int]]:
    """(rows, warps on M, warps on N) of each MMA dot whose warps on M cover more than its rows."""
    layouts = {name: (int(m), int(n)) for name, _, m, n in MMA.findall(ttgir)}
    return sorted({(int(rows), *layouts[lay]) for rows, lay in DOT.findall(ttgir)
                   if lay in layouts and layouts[lay][0] * 16 > int(rows)})


def main(prefixes: list[str]) -> None:
    import test_sm90_compile

    from subquad.bench.sm90 import recorded_variants

    for kernel, args, kwargs, configs in recorded_variants(test_sm90_compile._run_ops, pruned=True):
        name = kernel.fn.__name__
        if prefixes and not name.startswith(tuple(prefixes)):
            continue
        for options in configs:
            if options.get("num_warps", 4) < 8:
                continue
            compiled = kernel.warmup(*args, grid=(1,), **{**options, **kwargs})
            found = replicated(compiled.asm["ttgir"])
            shown = {k: v for k, v in options.items() if k.isupper() or k in ("num_warps", "num_stages")}
            print(name, shown, "REPLICATED" if found else "ok", found or "", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Compile a kernel launch for the H100 on a machine without a GPU, and report what the compiler made of it.

The launch is recorded where the library makes it (``subquad.bench.sm90``: the CPU run goes through the same
Python as on the GPU, the interpreter's path with the tile sizes given here), specialised as Triton would
specialise it on the device (16-byte alignment of pointers and integers, integers equal to 1), and compiled for
sm90. Printed: registers, spills and stack frame (from ptxas), shared memory, the tensor-core instruction shapes
and how many of each, the order of the loads, stores and waits before the first loop, and the instruction mix of
each loop. This answers, with no device time, whether a tile spills, whether a dot runs on ``HGMMA`` and at what
shape, how many instructions a tile costs, and what a program's first key tile waits for.

Use the Triton the GPU has (its PTX and layouts differ between versions): e.g. ``pip install triton==3.6.0`` into
a separate virtual environment and put it first on ``PYTHONPATH``::

    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:.venv/lib/python3.11/site-packages:. \\
        /tmp/t36/bin/python benchmarks/kernel_report.py mla --config mla=64,64,8,2
    python benchmarks/kernel_report.py causal-1k --config bwd=64,128,8,2 --dq atomic --out /tmp/c1k

Cases are the functions of ``CASES`` below: each makes one library call on CPU tensors of the benchmark's shape.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from subquad.bench.sm90 import SHARED, record_launches
from subquad.ops.chained import chains_replicate

def compile_for_sm90(fn, args, kwargs):
    """``fn`` (a JIT function) compiled for sm90 on these arguments, as the device would specialise it."""
    from triton.runtime import driver

    from subquad.bench.sm90 import Sm90Driver

    driver.set_active(Sm90Driver())       # (this process has no other driver to go back to)
    return fn.warmup(*args, grid=(1,), **kwargs)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _opcode(line: str) -> str | None:
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    return m.group(1) if m else None


#: what ``issue_order`` shows: the tensor cores' work, its waits, and the exponentials that should run beside it
_ORDER_OPS = {"HGMMA": "mma", "WARPGROUP.ARRIVE": "arrive", "WARPGROUP.DEPBAR": "wait", "MUFU.EX2": "ex2"}


def issue_order(body: list[str]) -> str:
    """The order of a loop's asynchronous products, their waits and its exponentials, runs collapsed
    (``arrive mma x16 wait ex2 x32 ...``): whether the exponentials interleave with a product's HGMMAs or wait
    for it, as FlashAttention-3's order wants."""
    names = [next((short for op, short in _ORDER_OPS.items() if re.search(rf"\b{re.escape(op)}\b", line)), None)
             for line in body]
    return _collapsed([name for name in names if name])


#: what ``prologue`` shows: a program's memory traffic before its first loop, and what it waits on
_PROLOGUE_OPS = {"LDG": "ldg", "STS": "sts", "LDS": "lds", "LDGSTS": "cp.async", "LDGDEPBAR": "commit",
                 "DEPBAR": "wait", "BAR": "bar", "UTMALDG": "tma", "SYNCS": "tma-wait", "HGMMA": "mma"}


def _collapsed(names: list[str]) -> str:
    seq = []
    for name in names:
        if seq and seq[-1][0] == name:
            seq[-1][1] += 1
        else:
            seq.append([name, 1])
    return " ".join(name if n == 1 else f"{name} x{n}" for name, n in seq)


def prologue(sass: list[str]) -> str:
    """The order of a kernel's loads, stores, copies and waits before its first loop (the earliest target of a
    branch back; the whole kernel where it has none), runs collapsed (``ldg x19 sts x16 cp.async x16 commit
    ...``): what a program's first key tile waits for (session 49 read block-sparse's by hand: Q's loads and
    stores, then its list entry's round trip)."""
    addr, first = {}, len(sass)
    for i, line in enumerate(sass):
        m = re.match(r"\s*/\*([0-9a-f]+)\*/", line)
        if m:
            addr[int(m.group(1), 16)] = i
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*|0x)([0-9a-f]+)", line)
        if m and int(m.group(1), 16) in addr and addr[int(m.group(1), 16)] < i:
            first = min(first, addr[int(m.group(1), 16)])
    names = []
    for line in sass[:first]:
        op = _opcode(line)
        if op and not re.search(r"@!PT\b", line):
            name = _PROLOGUE_OPS.get(op.split(".")[0])
            if name:
                names.append(name)
    return _collapsed(names)


def loops(sass: list[str], least: int = 64) -> list[tuple[int, collections.Counter, str]]:
    """The loops of the SASS (a branch back to an earlier address) with at least ``least`` instructions, longest
    first: each one's length, instruction mix and ``issue_order``."""
    addr = {}
    for i, line in enumerate(sass):
        m = re.match(r"\s*/\*([0-9a-f]+)\*/", line)
        if m:
            addr[int(m.group(1), 16)] = i
    found = []
    for i, line in enumerate(sass):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*|0x)([0-9a-f]+)", line)
        if m and int(m.group(1), 16) in addr and addr[int(m.group(1), 16)] < i:
            lines = sass[addr[int(m.group(1), 16)]:i + 1]
            body = [op for op in map(_opcode, lines) if op]
            if len(body) >= least:
                found.append((len(body), collections.Counter(body), issue_order(lines)))
    return sorted(found, key=lambda x: -x[0])


def report(kernel, out: Path | None = None) -> dict:
    cubin = kernel.asm["cubin"]
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "k.ptx"
        ptx_path.write_text(ptx)
        cubin_path = Path(tmp) / "k.cubin"
        cubin_path.write_bytes(cubin)
        verbose = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", str(ptx_path), "-o", os.devnull],
                                 capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin_path)], capture_output=True,
                              text=True).stdout.splitlines()
    regs = re.search(r"Used (\d+) registers", verbose)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    mma = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    if not mma:
        mma = collections.Counter("mma.sync." + s for s in re.findall(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    found = loops(sass)
    info = dict(registers=int(regs.group(1)) if regs else None,
                stack=int(spill.group(1)) if spill else None, spill_stores=int(spill.group(2)) if spill else None,
                spill_loads=int(spill.group(3)) if spill else None, shared=kernel.metadata.shared,
                mma=dict(mma), prologue=prologue(sass),
                loops=[f"{n} instructions: " + ", ".join(f"{op} {c}" for op, c in mix.most_common(16))
                       + (f"\n      order: {order}" if "mma" in order else "") for n, mix, order in found])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            (out / f"kernel.{ext}").write_text(kernel.asm[ext])
        (out / "kernel.sass").write_text("\n".join(sass))
    return info


# ---- cases: one library call each, on CPU tensors of the benchmark's shapes ---------------------------------------

def _qkv(b, n, h, d, hkv=None):
    g = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(b, n, heads, d, generator=g).to(torch.bfloat16)  # noqa: E731
    return make(h), make(hkv or h), make(hkv or h)


# the flash kernels, their launch module's interpreter tile sizes (overridden here) and default configurations
# (the H200's autotuned choices for dense causal attention: 2026-12-04-flash-config-sweep-h200.json)
FLASH = {"fwd": ("flash_fwd_kernel", "INTERPRET_FWD", (128, 64, 8, 3)),
         "bwd": ("flash_bwd_kernel", "INTERPRET_BWD", (64, 128, 8, 2))}
#: how the backward sums dQ: TMA reduce-adds (Hopper's default), atomics by threads, or dQ programs
DQ_MODES = ("tma", "atomic", "programs")


def _flash(mask, n, configs, backward, dq, dropout_p=0.0):
    """Forward (and backward) of ``subquad.attention`` at B 1, 16 heads, D 128, bf16, length ``n``; dQ in the
    backward as ``dq`` says (``DQ_MODES``; ``programs`` is the deterministic backward)."""
    import subquad
    return _flash_launches(lambda q, k, v: subquad.attention(q, k, v, mask=mask, backend="triton",
                                                             deterministic=dq == "programs", dropout_p=dropout_p),
                           n, configs, backward, dq)


def _flash_launches(call, n, configs, backward, dq):
    """The flash kernels' launches of ``call(q, k, v)`` (and its backward) at B 1, 16 heads, D 128, bf16,
    length ``n``."""
    from subquad.ops.softmax import flash
    from subquad.ops.softmax.flash import launch, tuning
    flash.MASK_BLOCK_INTERPRET = flash.MASK_BLOCK        # BlockMasks at the GPU's block size
    launch.num_sms = lambda device: 132                 # and the H100's schedules (walks cut into pieces)
    q, k, v = (t.requires_grad_(backward) for t in _qkv(1, n, 16, 128))
    for short, (name, tiles, default) in FLASH.items():
        setattr(launch, tiles, configs.get(short, default)[:2])
    calls = record_launches()
    out = call(q, k, v)
    if backward:
        out.backward(torch.ones_like(out))
    short_of = {name: short for short, (name, _, _) in FLASH.items()}
    launches = []
    for fn, args, kw in calls:
        if fn.__name__ not in short_of:     # the preprocess, the pieces' merge: launched with their own meta
            launches.append((fn, args, kw))
            continue
        short = short_of[fn.__name__]
        _, _, warps, stages, *maxnreg = configs.get(short, FLASH[short][2])
        extra = {"DQ_TMA": True} if short == "bwd" and kw.get("DQ_ATOMIC") and dq == "tma" else {}
        # as the launcher's pruning sets them for these warps (the interpreter's took INTERPRET_WARPS)
        extra["UNCHAIN"] = chains_replicate(kw["BLOCK_N" if short == "bwd" else "BLOCK_M"], warps)
        if kw.get("DQ_PROGRAMS"):
            extra["DQ_UNCHAIN"] = chains_replicate(kw["DQ_BLOCK_M"], warps)
        if maxnreg:     # a fifth number: a register cap (Triton's ``maxnreg``), e.g. to fit two programs an SM
            extra["maxnreg"] = maxnreg[0]
        if short == "fwd":
            named = {**kw, "qk_scale": args[fn.arg_names.index("qk_scale")]}
            extra["RAW_MAX"] = tuning.raw_max(named, extra.get("maxnreg"))
        launches.append((fn, args, {**kw, **extra, "num_warps": warps, "num_stages": stages}))
    return launches


def case_causal_1k(configs, dq):
    from subquad import masks
    return _flash(masks.causal, 1024, configs, True, dq)


def case_full_16k(configs, dq):
    """Full attention (no band term: the band walks' unmasked loops), the dense suite's 2 x 16k per head."""
    from subquad import masks
    return _flash(masks.full, 16384, configs, True, dq)


def case_causal_16k(configs, dq):
    from subquad import masks
    return _flash(masks.causal, 16384, configs, True, dq)


def case_causal_1k_dropout(configs, dq):
    """Attention dropout's draws in the band's loops (``tile.dropout_keep``), against ``causal-1k``."""
    from subquad import masks
    return _flash(masks.causal, 1024, configs, True, dq, dropout_p=0.1)


def case_window_16k(configs, dq):
    from subquad import masks
    return _flash(masks.sliding_window(4096), 16384, configs, True, dq)


def case_longformer_16k(configs, dq):
    from subquad import masks
    return _flash(masks.longformer(512, list(range(16))), 16384, configs, True, dq)


def case_longformer_64k(configs, dq):
    from subquad import masks
    return _flash(masks.longformer(512, list(range(16))), 65536, configs, True, dq)


def case_bigbird_64k(configs, dq):
    from subquad import masks
    return _flash(masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0), 65536, configs, True, dq)


def case_bigbird_16k(configs, dq):
    from subquad import masks
    return _flash(masks.bigbird(512, list(range(16)), random_blocks=3, block=64, seed=0), 16384, configs, True,
                  dq)


def case_block_sparse_16k(configs, dq):
    """The flash suite's block-sparse layout at density 0.1 (cells of 128): a list walk with the layout term."""
    from subquad import masks
    from subquad.bench.suites.flash import _layout
    return _flash(masks.block_sparse(_layout(16384, 0.1), 128), 16384, configs, True, dq)


def case_fixed_16k(configs, dq):
    from subquad import masks
    return _flash(masks.fixed(128, 8), 16384, configs, True, dq)


def case_strided_16k(configs, dq):
    from subquad import masks
    return _flash(masks.strided(256), 16384, configs, True, dq)


def case_lsh_4k(configs, dq):
    """Reformer LSH attention (causal, shared QK, 4 rounds of 64 buckets, chunks of 128): the kernels' LSH term."""
    import subquad
    return _flash_launches(lambda q, k, v: subquad.lsh_attention(q, k, v, n_buckets=64, n_hashes=4, chunk_size=128,
                                                                 causal=True, shared_qk=True, seed=0,
                                                                 backend="triton"), 4096, configs, True, dq)


def case_lsh_16k(configs, dq):
    """LSH attention as the dynamic suite runs it (causal, separate QK, 4 rounds of 64 buckets, the default
    chunk: 512 at 16k)."""
    import subquad
    return _flash_launches(lambda q, k, v: subquad.lsh_attention(q, k, v, n_buckets=64, n_hashes=4, causal=True,
                                                                 seed=0, backend="triton"), 16384, configs, True, dq)


def case_mla(configs, dq):
    """The suite's MLA decode (B 64, 128 heads, latent 512 + 64), 3 splits as on the H100/H200; the context is
    1k here (the kernel's code does not depend on it); ``config``: block_m, block_n, num_warps, num_stages."""
    from subquad.bench.suites.decode import _mla_inputs
    from subquad.ops.decode import splitkv
    inp = _mla_inputs(64, 1024, 128, 512, 64, torch.bfloat16)("cpu")
    bm, bn, warps, stages = configs.get("mla", (64, 64, 8, 2))
    calls = record_launches()
    splitkv.decode_splitkv(inp["q"], inp["view"], window=None, scale=576 ** -0.5, softcap=None, alibi_slopes=None,
                           num_splits=3, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    return calls


def case_gqa_decode(configs, dq):
    """The suite's GQA decode of a static cache at 32k (B 8, 32 query heads on 8 KV heads of 128, 6 splits, as on
    the H100); the context is 1k here (the kernel's code does not depend on it); ``config``: block_m, block_n,
    num_warps, num_stages."""
    from subquad.bench.suites.decode import _gqa_inputs
    from subquad.cache.view import KVView
    from subquad.ops.decode import splitkv
    inp = _gqa_inputs(8, 1024, 32, 8, 128, torch.bfloat16)("cpu")
    view = KVView(inp["k"], inp["v"], torch.full((8,), 1024, dtype=torch.int32), max_seqlen=1024)
    bm, bn, warps, stages = configs.get("decode", (16, 64, 4, 2))
    calls = record_launches()
    splitkv.decode_splitkv(inp["q"], view, window=None, scale=128 ** -0.5, softcap=None, alibi_slopes=None,
                           num_splits=6, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    return calls


def _nsa_selected(group, configs):
    """NSA's selected-blocks kernels (``subquad.ops.nsa.selected``), forward and backward: B 1, 8k tokens, 4 KV
    heads of 128 with ``group`` query heads each, blocks of 64, 16 of them a token, bf16."""
    from subquad.ops.nsa import selected
    b, n, hkv, d, block, top_k = 1, 8192, 4, 128, 64, 16
    q, k, v = (t.requires_grad_() for t in _qkv(b, n, hkv * group, d, hkv))
    g = torch.Generator().manual_seed(1)
    own = torch.arange(n).view(1, -1, 1, 1) // block
    indices = torch.minimum(torch.randint(0, n // block, (b, n, hkv, top_k), generator=g), own)
    calls = record_launches()
    out = selected.selected_attention(q, k, v, indices, block=block, scale=d ** -0.5, causal=True)
    out.backward(torch.ones_like(out))
    return calls


def case_nsa_selected_g16(configs, dq):
    return _nsa_selected(16, configs)


def case_nsa_selected_g4(configs, dq):
    return _nsa_selected(4, configs)


def case_nsa_selection_g16(configs, dq):
    """NSA's selection (``subquad.ops.nsa.selection_kernel``): 2k tokens, 4 KV heads of 128 with 16 query heads
    each, summaries of 32 every 16, top 16 blocks of 64, bf16."""
    from subquad.ops.nsa.compression import mean_pool
    from subquad.ops.nsa.selection_kernel import select_top_blocks
    n, hkv = 2048, 4
    q, k, _ = _qkv(1, n, 16 * hkv, 128, hkv)
    calls = record_launches()
    select_top_blocks(q, mean_pool(k, 32, 16, torch.float32), q_pos0=0, seq_kv=n, compress_block=32,
                      compress_stride=16, block=64, n_blocks=n // 64, top_k=16, causal=True, forced=True,
                      bound=33.0, scale=128 ** -0.5)
    return calls


# the chunked engine's and the recurrent kernels (their modules are imported on a call's first use: made JIT
# functions here, not under the interpreter that the cases' calls take)
LINEAR_MODULES = ("subquad.ops.linear.chunk", "subquad.ops.linear.recurrent", "subquad.ops.delta.chunk",
                  "subquad.ops.delta.recurrent")


def _compiled_linear_modules():
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        for module in LINEAR_MODULES:
            importlib.import_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _tuned(calls, configs):
    """Recorded launches of autotuned kernels (``subquad.ops.autotuned``) as plain launches: each with its first
    configuration (what ``SUBQUAD_LINEAR_AUTOTUNE=0`` takes) or the one at index ``--config NAME=I``."""
    launches = []
    for fn, args, kw in calls:
        if isinstance(fn, triton.runtime.Autotuner):
            tuned = fn.configs
            if fn.early_config_prune:
                tuned = fn.early_config_prune(tuned, dict(zip(fn.arg_names, args)), **kw)
            c = tuned[configs.get(fn.fn.__name__, (0,))[0]]
            fn, kw = fn.fn, {**kw, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        launches.append((fn, args, kw))
    return launches


def _linear(ops, configs, n=8192, b=4, h=16, d=128):
    """Forward and backward of ``subquad.gla`` with a scalar decay per token (Mamba-2 / simple GLA: GATE 1) and
    of gated DeltaNet, ``ops`` among them, at B ``b`` x ``n`` tokens, ``h`` heads of ``d``, bf16: the chunked
    engine's kernels (the fused forward: sequences x heads fill the GPU), each with its first configuration
    (``--config KERNEL=I``: the I-th)."""
    import subquad
    _compiled_linear_modules()
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(b, n, h, d))
    log_decay = (-torch.rand(b, n, h, generator=g) / 16).requires_grad_()
    calls = record_launches()
    for op in ops:
        if op == "gla":
            out = subquad.gla(q, k, v, log_decay, backend="triton")
        else:
            beta = torch.rand(b, n, h, generator=g).to(torch.bfloat16).requires_grad_()
            out = subquad.delta_rule(q, k, v, beta, log_decay, backend="triton")
        out.backward(torch.ones_like(out))
    return _tuned(calls, configs)


def case_linear_8k(configs, dq):
    return _linear(["gla"], configs)


def case_delta_8k(configs, dq):
    """Gated DeltaNet (WY kernels, the engine's DELTA walks)."""
    return _linear(["delta"], configs)


def case_linear_step(configs, dq):
    """Decoding steps (``subquad.ops.linear.recurrent``): GLA's with a scalar decay and the gated delta rule's,
    B 64, 4 tokens, 16 heads of 128."""
    import subquad
    _compiled_linear_modules()
    b, t, h, d = 64, 4, 16, 128
    q, k, v = _qkv(b, t, h, d)
    state = torch.zeros(b, h, d, d)
    calls = record_launches()
    subquad.gla_step(q, k, v, state, torch.zeros(b, t, h), backend="triton")
    subquad.delta_rule_step(q, k, v, torch.rand(b, t, h).to(torch.bfloat16), state, torch.zeros(b, t, h),
                            backend="triton")
    return calls


CASES = {name[5:].replace("_", "-"): fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--config", action="append", default=[], metavar="KERNEL=BM,BN,WARPS,STAGES[,MAXNREG]",
                        help="a kernel's configuration (fwd, bwd: the dK/dV tile, its dQ programs' transposed; "
                             "mla: heads per program, keys, warps, stages); a flash kernel's may add a register "
                             "cap; repeatable")
    parser.add_argument("--dq", choices=DQ_MODES, default="tma",
                        help="the backward's dQ: TMA reduce-adds, atomics by threads, or dQ programs (deterministic)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the TTGIR, PTX and SASS")
    a = parser.parse_args(argv)
    # the kernels are made JIT functions at import, and the launch code then takes its interpreter path (its
    # small-tile choices are overridden by the cases) to reach the recorder
    for module in ("subquad", "subquad.ops.decode.splitkv", "subquad.ops.softmax.flash.launch",
                   "subquad.ops.nsa.selected", "subquad.ops.nsa.selection_kernel"):
        importlib.import_module(module)
    os.environ["TRITON_INTERPRET"] = "1"

    configs = {}
    for item in a.config:
        name, _, values = item.partition("=")
        configs[name] = tuple(int(x) for x in values.split(","))
    launches = CASES[a.case](configs, a.dq)
    os.environ.pop("TRITON_INTERPRET")
    for i, (fn, args, kwargs) in enumerate(launches):
        kernel = compile_for_sm90(fn, args, kwargs)
        info = report(kernel, a.out / str(i) if a.out else None)
        print(f"{fn.__name__} (triton {triton.__version__}, sm_90a)")
        for key, value in info.items():
            if key == "loops":
                print("  loops:" + "".join(f"\n    {loop}" for loop in value))
            elif key == "shared" and value > SHARED:
                print(f"  {key}: {value} (over the H100's {SHARED} a block: it would not launch, and the "
                      f"tuner skips it)")
            else:
                print(f"  {key}: {value}")


if __name__ == "__main__":
    sys.exit(main())

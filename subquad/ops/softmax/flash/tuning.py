"""Autotuning of the flash kernels: the tile configurations per GPU (Hopper's timed, a safe set elsewhere), their
pruning to the BlockMask's blocks and the call's kind, and the autotuned wrapper of each kernel."""

from __future__ import annotations

import functools
import os

import torch
import triton

from ...autotuned import Autotuned
from ...chained import chains_replicate
from ...grid import interpreting
from .masking import BAND_INF


def autotuning() -> bool:
    """``SUBQUAD_FLASH_AUTOTUNE=0`` takes the first configuration of each list that fits instead of timing
    them all (the GPU tests use it: many small shapes, each a new tuning key)."""
    return os.environ.get("SUBQUAD_FLASH_AUTOTUNE", "1") != "0"


def _fit(block: int, mask_block: int) -> int:
    """The largest power of two <= ``block`` dividing ``mask_block`` (a kernel tile inside a BlockMask block)."""
    while block > 16 and mask_block % block:
        block //= 2
    return block


def _cfg(bm, bn, warps, stages, dq_tma=False, maxnreg=None):
    extra = {"DQ_TMA": True} if dq_tma else {}
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


# dQ's atomic sums in the dK/dV pass as TMA reductions where the GPU has them: each tile's dQ goes to shared memory
# and one bulk reduce-add sends it to the fp32 dQ, as FlashAttention-3 does, in place of ~24 vector atomics per
# thread per tile. H200, fwd+bwd, atomics -> TMA (benchmarks/results/2026-12-04-dq-tma-ab-h200.json): dense
# causal 32 x 1k 1.966 -> 1.918 ms, full 2.994 -> 2.829, causal 2 x 16k 19.62 -> 18.47, window 4096 9.00 -> 8.70.
# Its 32 KB of staging do not fit beside every tile (Longformer's dK/dV at 64 x 128: 230 KB without, 247 with),
# so the dK/dV configurations come with and without it and the autotuner (or the first that fits) decides.
# False drops the TMA configurations (before a process's first tuning).
DQ_TMA = True


def _dq_by_tma(q: torch.Tensor) -> bool:
    """Hopper or later, not the interpreter (it has no TMA), and rows of dQ at 16-byte multiples."""
    return (DQ_TMA and q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device)[0] >= 9
            and q.shape[2] * q.shape[3] % 4 == 0)


def _tma_allocator() -> None:
    """In-kernel TMA descriptors take a small global scratch per launch from Triton's allocator, which is unset by
    default and per thread (autograd runs the backward on its own thread): set one here unless the caller has.
    It allocates on the current device, where Triton launches (not on the device of the call that set it)."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


# The band walks' forward with FlashAttention-3's order in a warpgroup (``forward.py``'s ``OVERLAP``): each tile's
# P.V product runs beside the next tile's softmax. The autotuner tries it beside the plain form (None); True or
# False forces one (the interpreter takes the plain form unless forced). H200, in one process, the same 128 x 128
# x 8 warps x 3 stages tile (benchmarks/results/2026-12-06-fwd-overlap-ab-h200.json): forward 1.037x at full
# 2 x 16k, 1.066x causal 2 x 16k, 1.024x window 4096, but 0.89x causal 32 x 1k and 0.99x full 8 x 4k, whose walks
# are short (a prologue, an epilogue and the edges' own loop a query tile). The H100's tuning rounds of the suite
# run 2026-12-06-dense-overlap-h100.json chose it everywhere they timed both: full 2 x 16k 8.80 -> 8.34 ms, causal
# 4.59 -> 4.40, full 8 x 4k 2.29 -> 2.20, causal 1.267 -> 1.255.
FWD_OVERLAP = None


# Hopper: 128-row query tiles (one warpgroup pair), key tiles of 64/128, 2-4 pipeline stages.
FWD_CONFIGS_SM90 = [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2)]
# The backward: BLOCK_N key rows per dK/dV program (accumulators), BLOCK_M query rows per step; its dQ programs
# (the deterministic backward) take the tile transposed: BLOCK_N query rows, BLOCK_M key rows per step, as
# FlexAttention pairs them (64 x 128 and 128 x 64 on sm90).
BWD_CONFIGS_SM90 = [_cfg(64, 128, 8, 2, True), _cfg(64, 128, 8, 2), _cfg(32, 128, 4, 3, True), _cfg(32, 128, 4, 3),
                    _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3, True), _cfg(64, 64, 4, 3)]
# head_dim above 128 (up to 256): the tiles above overflow shared memory (Hopper's 227 KB) with two stages of
# K/V at that width; these smaller ones are added for wide heads only
FWD_WIDE, BWD_WIDE = [_cfg(64, 32, 4, 2)], [_cfg(32, 64, 4, 2)]
_WIDE_ONLY = {id(c) for c in FWD_WIDE + BWD_WIDE}
# Short walks, two programs an SM, one loading its Q tile and first key tiles while the other computes; tried only
# by the calls named (a flag of the launch).
# - BlockMask walks (USE_LIST): 128 x 64 tiles capped at 128 registers (96 KB of shared memory each). H100, forced
#   one by one (benchmarks/results/2026-12-05-flash-config-sweep-h100.json): block-sparse 2 x 16k at density
#   0.1 / 0.25 / 0.5 0.999 / 2.205 / 4.177 ms against 1.077 / 2.472 / 4.653 for 128 x 128 x 8 warps x 3 stages,
#   and 1.19 / 2.75 / 4.96 for 64 x 64 x 4 x 3 (twice the K/V traffic a FLOP). On band walks alone (dense full
#   16k, window 4096) the capped tile was 4.5% and 3.5% slower than their tuned choice, so they try neither.
# - A band with gathered columns (TWO_SOURCES: the planned patterns, a few tiles a query tile): both. NOT
#   MEASURED there. sm90: under the cap the fixed pattern's loops do not spill, the strided one's band loop
#   spills ~30 B an iteration; 64 x 64 x 4 x 3 keeps it unspilled (196 registers, 115 KB).
# - A band whose walk spans at most ``SHORT_BAND`` keys (dense 1k-2k, narrow windows): the capped tile (sm90:
#   causal 1k without spills). H100, forced one by one in one process (2026-12-07-short-band-config-sweep-h100.json):
#   32 x 1k forward, causal 0.412 ms against 0.449 for 128 x 64 x 8 x 3 and 128 x 128 x 8 x 3, full 0.641 against
#   0.676 / 0.719; the tuner took it for both (SDPA-flash 0.522 / 0.838).
# - BlockMask walks (the gathered columns' too) read their entries an iteration ahead into registers
#   (``tile.list_ahead``): their loops' stages are all K/V copies, where the copy of the entry had taken one. So
#   the tiles they ran at 3 stages are tried at 2 as well (forward 128 x 64 x 4 warps and the columns' 64 x 64 x 4
#   warps, backward 64 x 64 x 4 warps): at 3 a BlockMask walk's now holds a third K/V buffer (sm90, block-sparse
#   16k: forward 98 -> 131 KB, backward 99 -> 132 KB; at 2 they take the 98 and 99 KB they had at 3). H100, each
#   tree tuned, one process (2026-12-07-list-ahead-ab-h100.json), fwd+bwd at 2 x 16k: BigBird 1.08x, Longformer
#   1.03x, fixed 1.06x (its columns' dK/dV took 64 x 128 x 8 warps there), block-sparse 0.99-1.00x; forwards
#   0.98-1.02x. The tuner took the 2-stage tiles for block-sparse 0.1's backward and BigBird's forward.
_CAPPED = _cfg(128, 64, 8, 2, maxnreg=128)
FWD_SHORT_WALKS = {"USE_LIST": [_CAPPED, _cfg(128, 64, 4, 2)],
                   "TWO_SOURCES": [_CAPPED, _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 2)], "SHORT_BAND": [_CAPPED]}
BWD_SHORT_WALKS = {"USE_LIST": [_cfg(64, 64, 4, 2, True), _cfg(64, 64, 4, 2)]}
SHORT_BAND = 2048
# other GPUs: conservative shared-memory use
FWD_CONFIGS_OTHER = [_cfg(128, 64, 4, 2), _cfg(64, 64, 4, 2)]
BWD_CONFIGS_OTHER = [_cfg(32, 64, 4, 2), _cfg(64, 64, 4, 2)]


def widest_key_tile(d: int) -> int:
    """The widest dK/dV key tile (``BLOCK_N``) the backward's configurations offer for heads of width ``d``
    (a ``DQ_STORE`` launch keeps only the tiles that hold a whole key block); the interpreter takes the block."""
    if interpreting():
        return 1 << 30
    if d > 128:
        return max(c.kwargs["BLOCK_N"] for c in BWD_WIDE)
    return max(c.kwargs["BLOCK_N"] for c in (BWD_CONFIGS_SM90 if _hopper() else BWD_CONFIGS_OTHER))


def _dq_tiles(bm: int, bn: int, mbq: int, mbk: int, warps: int) -> dict:
    """The backward's dQ programs' tile (the dK/dV tile ``bm`` x ``bn`` transposed, fitted to the BlockMask
    blocks) and its ``UNCHAIN``."""
    dq_bm, dq_bn = _fit(bn, mbq), _fit(bm, mbk)
    return dict(DQ_BLOCK_M=dq_bm, DQ_BLOCK_N=dq_bn, DQ_UNCHAIN=chains_replicate(dq_bm, warps))


def _prune(configs, named_args, unchain=None, **kwargs):
    """Shrink tiles to divide the BlockMask blocks (MBQ, MBK), dropping duplicates; the wide-head tiles only
    where a head is wider than 128, the short-walk tiles only for the calls ``FWD_SHORT_WALKS`` and
    ``BWD_SHORT_WALKS`` name; dQ by TMA only for an atomic dQ where the GPU has TMA; the dQ programs' tiles where
    the backward has them; with ``DQ_STORE`` only key tiles of a whole key block, with ``DQ_DKDV`` only dQ tiles
    of a whole query block.
    ``unchain``: the tile dimension that is the chained products' M (``BLOCK_M`` forward, ``BLOCK_N`` dK/dV);
    tiles too short for their warps take the kernel's ``UNCHAIN``."""
    launch = {**named_args, **kwargs}
    tma = kwargs.get("DQ_ATOMIC", False) and "Q" in named_args and _dq_by_tma(named_args["Q"])
    mbq, mbk = launch.get("MBQ"), launch.get("MBK")
    wide = max(launch.get("D", 0), launch.get("DV", 0)) > 128
    out, seen = [], set()
    walks = [*FWD_SHORT_WALKS.items(), *BWD_SHORT_WALKS.items()]
    short = {id(c) for _, tiles in walks for c in tiles}
    tried = {id(c) for flag, tiles in walks if _launch_is(flag, launch) for c in tiles}
    for c in configs:
        if id(c) in _WIDE_ONLY and not wide or id(c) in short and id(c) not in tried:
            continue
        if c.kwargs.get("DQ_TMA") and not tma:
            continue
        bm, bn = _fit(c.kwargs["BLOCK_M"], mbq), _fit(c.kwargs["BLOCK_N"], mbk)
        if kwargs.get("DQ_STORE", False) and bn != mbk:
            continue    # (a key block over two programs: each would store half of a query tile's dQ)
        if kwargs.get("DQ_DKDV", False) and _fit(bn, mbq) != mbq:
            continue    # (the dQ tile, BLOCK_N rows, must hold the query block that alone sees its key block)
        key = (bm, bn, c.num_warps, c.num_stages, c.kwargs.get("DQ_TMA", False), c.maxnreg)
        if key not in seen:
            seen.add(key)
            out.append(_cfg(*key))
            if unchain:
                out[-1].kwargs["UNCHAIN"] = chains_replicate(bn if unchain == "BLOCK_N" else bm, c.num_warps)
            if kwargs.get("DQ_PROGRAMS", False):
                out[-1].kwargs.update(_dq_tiles(bm, bn, mbq, mbk, c.num_warps))
            if unchain == "BLOCK_M":
                out[-1].kwargs["RAW_MAX"] = raw_max(launch, c.maxnreg)
                for i, overlap in enumerate(_overlaps(launch.get("USE_LIST"), c.num_warps)):
                    if i:
                        out.append(_cfg(*key))
                        out[-1].kwargs.update(out[-2].kwargs)
                    out[-1].kwargs["OVERLAP"] = overlap
    return out


def raw_max(launch: dict, maxnreg=None) -> bool:
    """The forward's ``RAW_MAX`` for a launch (its arguments by name, ``qk_scale`` among them) in a configuration
    capped at ``maxnreg`` registers: where no softcap or ALiBi transforms the products and the scale is positive
    (a negative one would make the smallest product the row's maximum); not under a register cap on a BlockMask
    walk, where ptxas then spilled (sm90, Triton 3.6: block-sparse 16k's capped loop 32 B, two local loads an
    iteration) and the H100 ran block-sparse 0.1 / 0.25 forward at 0.984x / 0.968x, against 1.009-1.015x on the
    dense and window rows (2026-12-07-raw-max-ab-h100.json)."""
    plain = not launch.get("SOFTCAP") and not launch.get("ALIBI") and launch["qk_scale"] > 0
    return plain and not (maxnreg and launch.get("USE_LIST"))


def _launch_is(flag: str, launch: dict) -> bool:
    """Whether a launch (its arguments by name) has ``flag`` on, or for ``SHORT_BAND`` whether it walks a band
    (no BlockMask list) over at most ``SHORT_BAND`` keys a query tile (the band's width, else the keys' bucket)."""
    if flag != "SHORT_BAND":
        return bool(launch.get(flag, False))
    walk = launch.get("tune_walk") or launch.get("tune_kv")
    return not launch.get("USE_LIST", True) and walk is not None and walk <= SHORT_BAND


def _overlaps(use_list: bool, warps: int) -> tuple:
    """The forward's ``OVERLAP`` forms a configuration is tried in: as ``FWD_OVERLAP`` forces; else the plain
    form, and on band walks with 8 warps the overlapped one too (at 4 warps a 128-row tile's accumulator alone is
    128 registers a thread, and the overlap holds a second tile of scores)."""
    if FWD_OVERLAP is not None:
        return (FWD_OVERLAP,)
    return (False,) if use_list or warps < 8 else (False, True)


def _short_walk_tiles(walks: dict | None = None) -> list:
    """Every tile of ``walks`` (by default ``FWD_SHORT_WALKS``), once."""
    walks = FWD_SHORT_WALKS if walks is None else walks
    return list({id(c): c for tiles in walks.values() for c in tiles}.values())


class _FirstThatFits:
    """``SUBQUAD_FLASH_AUTOTUNE=0``: instead of timing, the configurations run in list order and the first that
    compiles and fits the GPU's shared memory wins (the autotuner scores an ``OutOfResources`` as infinite);
    the ones after it are never compiled. A variant with more in-kernel terms may need a smaller tile than the
    list's first."""

    def __init__(self, unchain=None):
        self.found = False
        self.unchain = unchain

    def prune(self, configs, named_args, **kwargs):     # called once at the start of each tuning round
        self.found = False
        return _prune(configs, named_args, unchain=self.unchain, **kwargs)

    def __call__(self, kernel_call, quantiles):
        if self.found:
            return [float("inf")] * len(quantiles)
        kernel_call()
        self.found = True
        return [0.0] * len(quantiles)


# tuned per kind of call and power-of-two bucket of the key length (``tune_bucket``), not per length (a new length
# would re-time every config). Without the length, causal 1k to 64k and the windows shared one key, full 1k to 64k
# another, each kept whichever tile the first shape of a process (or of the carried tuning cache) had timed; and
# the best tile differs by walk: H100, forced one by one (2026-12-05-flash-config-sweep-h100.json), dense full
# 2 x 16k ran 8.48 ms on its own tuned tile and 10.01 on 128 x 128 x 8 x 3, the window's choice at that length.
# The linear kernels' keys had the same flaw (0.99 ms against 0.49 at 4 x 8k after a warm-up at 32 x 1k, before
# their SEQS / CHUNKS buckets).
# A window's walk is its width at any length, and causal's half the length: keyed by length alone, the 4096
# window at 64k took causal 64k's tile (H100, 2026-12-07: 4.71 ms forward, 4.50 on 2026-12-05), so a band narrower
# than the keys is keyed by its width too (``tune_walk``).
_KEY = ["D", "DV", "G", "USE_LIST", "BAND", "DOC", "USE_BITS", "HAS_LAYOUT", "SOFTCAP", "ALIBI", "MBQ", "MBK", "LSH",
        "tune_kv", "tune_walk"]


def tune_bucket(seq_kv: int) -> int:
    """The kernels' ``tune_kv`` (read by the tuner alone): the key length's power of two, at least 1024."""
    return max(1024, 1 << max(seq_kv - 1, 0).bit_length())


def tune_walk(band_lo: int, band_hi: int, seq_kv: int) -> int:
    """The kernels' ``tune_walk`` (read by the tuner alone): the power of two at or above a band's width (keys
    ``band_lo`` to ``band_hi`` from the diagonal) where that is bounded and below the keys' bucket, at least 128;
    0 otherwise (dense, causal: the key length says it)."""
    if band_lo <= -BAND_INF or band_hi >= BAND_INF:
        return 0
    width = max(128, 1 << max(band_hi - band_lo, 0).bit_length())
    return width if width < tune_bucket(seq_kv) else 0


_TUNED: dict = {}
#: what a launch adds onto, per kernel: a tuning round restores them after each timed run, so that a launch going
#: on from an earlier one's result keeps it (the two-source backward's second key set into the first's dQ; a seeded
#: forward, ``SEEDED``, from the first component's output and LSE); zeroing them lost that dQ on a key's first
#: call. The seeded forward is a wrapper of its own: the restoring copies are timed with each run
_RESTORED = {"fwd": None, "fwd_seeded": ["O", "LSE"], "bwd": ["DQ", "DK_OUT", "DV_OUT", "ACC_K", "ACC_V"]}


def _kernel(name: str, jit_fn):
    """The autotuned wrapper of ``jit_fn`` on this GPU (built once), or None in the interpreter."""
    if interpreting():
        return None
    tune = autotuning()
    if (name, tune) not in _TUNED:
        hopper = _hopper()
        forward = name != "bwd"
        configs = ((FWD_CONFIGS_SM90 + _short_walk_tiles() if hopper else FWD_CONFIGS_OTHER) + FWD_WIDE if forward
                   else (BWD_CONFIGS_SM90 + _short_walk_tiles(BWD_SHORT_WALKS) if hopper else BWD_CONFIGS_OTHER)
                   + BWD_WIDE)
        key = _KEY + ([] if forward else ["DQ_ATOMIC", "SPLIT_ATOMIC", "DQ_PROGRAMS", "DQ_STORE", "TWO_SOURCES",
                                          "DQ_DKDV"])
        unchain = "BLOCK_M" if forward else "BLOCK_N"
        first = None if tune else _FirstThatFits(unchain=unchain)
        prune = functools.partial(_prune, unchain=unchain)
        tuner = triton.autotune(
            configs, key=key, prune_configs_by={"early_config_prune": prune if tune else first.prune},
            restore_value=_RESTORED[name], do_bench=first)(jit_fn)
        if not tune:
            # the first fit's scores (0 for it, infinite after it) are no timings: with TRITON_CACHE_AUTOTUNING
            # they went into the disk cache under the tuned key (same kernel, key and pruned list), and a tuned
            # run reading that cache took them. H100, 2026-12-07: the GPU tests' 1k shapes pinned dense causal
            # 32 x 1k to 128 x 64 x 4 warps, 0.419 -> 0.537 ms forward
            tuner.cache_results = False
        _TUNED[name, tune] = Autotuned(tuner)
    return _TUNED[name, tune]

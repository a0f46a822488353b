"""The flash kernels' autotuning (``subquad.ops.softmax.flash.tuning``): which configurations each kind of call
tries, the untuned path's first fit, and what a tuning round leaves in the backward's sums."""

from __future__ import annotations

import pytest
import torch


def test_untuned_launch_takes_the_first_config_that_fits():
    """``SUBQUAD_FLASH_AUTOTUNE=0``: configurations run in order until one launches; later ones never compile,
    and each tuning round (a new key) starts over."""
    from triton.runtime.errors import OutOfResources

    from subquad.ops.softmax.flash.tuning import _FirstThatFits, _cfg

    first = _FirstThatFits()
    calls = []

    def call(fits):
        def run():
            calls.append(fits)
            if not fits:
                raise OutOfResources(300000, 232448, "shared memory")
        return run

    configs = [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 2)]
    for _ in range(2):
        assert len(first.prune(configs, {"MBQ": 128, "MBK": 128})) == 2
        with pytest.raises(OutOfResources):      # the autotuner scores this one as infinite
            first(call(False), (0.5, 0.2, 0.8))
        assert first(call(True), (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
        assert first(call(True), (0.5, 0.2, 0.8)) == [float("inf")] * 3
    assert calls == [False, True, False, True]


@pytest.mark.parametrize("name", ["fwd", "bwd"])
def test_untuned_first_fit_stays_out_of_the_disk_cache(monkeypatch, name):
    """With ``TRITON_CACHE_AUTOTUNING=1`` the autotuner writes its scores to disk under the kernel, key and pruned
    list, which tuned and untuned runs share: the first fit's 0 / infinite scores, written there by the GPU
    tests, were read back by a later tuned run as timings (dense causal 32 x 1k ran the untuned tile)."""
    from subquad.ops.softmax.flash import tuning
    from subquad.ops.softmax.flash.backward import flash_bwd_kernel
    from subquad.ops.softmax.flash.forward import flash_fwd_kernel

    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_TUNED", {})
    kernel = flash_fwd_kernel if name == "fwd" else flash_bwd_kernel
    cached = {}
    for tune in ("1", "0"):
        monkeypatch.setenv("SUBQUAD_FLASH_AUTOTUNE", tune)
        cached[tune] = tuning._kernel(name, kernel).tuner.cache_results
    assert cached == {"1": True, "0": False}


def test_wide_head_tiles_only_for_wide_heads():
    from subquad.ops.softmax.flash.tuning import BWD_CONFIGS_SM90, BWD_WIDE, _prune

    configs = BWD_CONFIGS_SM90 + BWD_WIDE
    sizes = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in cs]  # noqa: E731
    narrow = sizes(_prune(configs, {}, MBQ=128, MBK=128, D=128, DV=128))
    wide = sizes(_prune(configs, {}, MBQ=128, MBK=128, D=256, DV=256))
    assert (32, 64, 2) not in narrow and wide == narrow + [(32, 64, 2)]


def test_short_walk_tiles_only_where_named():
    """The forward's two-programs-an-SM tiles: on BlockMask walks the 128 x 64 tile at 128 registers, where it won,
    and 128 x 64 x 4 warps at 2 stages (their entries read ahead, ``tile.list_ahead``, leave every stage to K/V);
    the capped tile and 64 x 64 x 4 warps (3 and 2 stages) on a band with gathered columns, the capped one on
    bands alone only where their walk is short (dense 1k-2k, a window of at most 2048 keys; at 16k it lost); the
    cap survives the pruning. The backward's 2-stage 64 x 64 x 4 warps tiles on BlockMask walks alone."""
    from subquad.ops.softmax.flash.tuning import (BWD_CONFIGS_SM90, BWD_SHORT_WALKS, FWD_CONFIGS_SM90, _prune,
                                                  _short_walk_tiles)

    configs = FWD_CONFIGS_SM90 + _short_walk_tiles()
    tiles = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)  # noqa: E731
                        for c in cs]
    shape = dict(MBQ=128, MBK=128, D=128, DV=128)
    band = tiles(_prune(configs, {}, USE_LIST=False, **shape))
    walk_tiles = tiles(_prune(configs, {}, USE_LIST=True, **shape))
    columns = tiles(_prune(configs, {}, USE_LIST=False, TWO_SOURCES=True, **shape))
    assert band == tiles(FWD_CONFIGS_SM90)
    assert walk_tiles == band + [(128, 64, 8, 2, 128), (128, 64, 4, 2, None)]
    assert columns == band + [(128, 64, 8, 2, 128), (64, 64, 4, 3, None), (64, 64, 4, 2, None)]
    for kv, walk, short in [(1024, 0, True), (2048, 0, True), (4096, 0, False), (16384, 2048, True),
                            (16384, 4096, False), (65536, 0, False)]:
        named = {"tune_kv": kv, "tune_walk": walk}
        assert tiles(_prune(configs, named, USE_LIST=False, **shape)) == band + [(128, 64, 8, 2, 128)] * short
        assert tiles(_prune(configs, named, USE_LIST=True, **shape)) == walk_tiles

    backward = BWD_CONFIGS_SM90 + _short_walk_tiles(BWD_SHORT_WALKS)
    assert tiles(_prune(backward, {}, USE_LIST=False, **shape)) == tiles(_prune(BWD_CONFIGS_SM90, {}, **shape))
    assert (tiles(_prune(backward, {}, USE_LIST=True, **shape))
            == tiles(_prune(BWD_CONFIGS_SM90, {}, **shape)) + [(64, 64, 4, 2, None)])


@pytest.mark.parametrize("name,names", [("bwd", ("DQ", "DK_OUT", "DV_OUT", "ACC_K", "ACC_V")),
                                        ("fwd_seeded", ("O", "LSE"))])
def test_tuning_keeps_what_an_earlier_launch_left(monkeypatch, name, names):
    """A tuning round (Triton's own hooks, run as its autotuner runs them: around each timed run, then before the
    chosen configuration's run) leaves what a launch goes on from as it came: the backward's sums (the two-source
    backward's second launch adds dQ onto the first's, and zeroing them had lost that dQ on the first call of a
    new tuning key) and a seeded forward's output and LSE (each timed run would have gone on from the last).
    The plain forward copies nothing (its copies would be timed with each run)."""
    from subquad.ops.softmax.flash import launch, tuning

    monkeypatch.setattr(tuning, "_TUNED", {})
    monkeypatch.setattr(tuning, "interpreting", lambda: False)     # build the GPU's autotuned wrapper
    kernel = launch.flash_bwd_kernel if name == "bwd" else launch.flash_fwd_kernel
    tuner = tuning._kernel(name, kernel).tuner
    assert not tuning._kernel("fwd", launch.flash_fwd_kernel).tuner.restore_value
    summed = {name: torch.full((4,), 2.0) for name in names}
    for _ in range(2):
        tuner.pre_hook(summed)
        for t in summed.values():
            t.add_(1.0)                 # a timed run's atomic sums
        tuner.post_hook(summed, None)
    tuner.pre_hook(summed, reset_only=True)
    for name, t in summed.items():
        assert torch.equal(t, torch.full((4,), 2.0)), name


def test_tuning_key_buckets_the_key_length(monkeypatch):
    """Each power of two of the key length (from 1024) is tuned on its own: the best tile of a 16k walk is not
    a 1k walk's. The launches pass the bucket of their key length, forward and backward."""
    from triton.runtime.jit import KernelInterface

    import subquad as sq
    from subquad.ops.softmax.flash.tuning import _KEY, tune_bucket

    assert [tune_bucket(n) for n in (1, 1000, 1024, 1025, 16384, 16385)] == [1024, 1024, 1024, 2048, 16384, 32768]
    assert "tune_kv" in _KEY
    recorded = []

    def kernel_name(kernel):   # (on the GPU an Autotuner wraps the JITFunction; it has no name of its own)
        return getattr(kernel, "__name__", None) or kernel_name(kernel.fn)

    monkeypatch.setattr(KernelInterface, "__getitem__",
                        lambda self, grid: (lambda *args, **kwargs: recorded.append((kernel_name(self), kwargs))))
    # (on the GPU too: the launches are recorded, not run)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 100, 2, 16, dtype=torch.float16, device=dev, requires_grad=True)
    k, v = (torch.randn(1, 3000, 2, 16, dtype=torch.float16, device=dev, requires_grad=True) for _ in range(2))
    for mask, walk in ((None, 0), (sq.masks.sliding_window(512), 512), (sq.masks.sliding_window(4000), 0)):
        recorded.clear()
        sq.attention(q, k, v, causal=mask is None, mask=mask, backend="triton").float().sum().backward()
        flash = [kwargs for name, kwargs in recorded if name.startswith("flash_") and "tune_kv" in kwargs]
        assert len(flash) == 2 and {kwargs["tune_kv"] for kwargs in flash} == {4096}
        assert {kwargs["tune_walk"] for kwargs in flash} == {walk}, mask


def test_a_band_narrower_than_the_keys_is_tuned_by_its_width():
    """A window walks its width at every length (4096 of 64k: 33 key tiles a query tile, where causal 64k's walks
    average 256): its tuning key holds the width's power of two where that is below the length's bucket."""
    from subquad.ops.softmax.flash.masking import BAND_INF
    from subquad.ops.softmax.flash.tuning import tune_walk

    assert [tune_walk(-4095, 0, n) for n in (4096, 16384, 65536)] == [0, 4096, 4096]
    assert tune_walk(-BAND_INF, 0, 65536) == tune_walk(-BAND_INF, BAND_INF, 65536) == 0    # causal, dense
    assert tune_walk(-4096, 4095, 65536) == 8192 and tune_walk(-10, 0, 65536) == 128     # both sides; at least 128


@pytest.mark.parametrize("use_list", [False, True])
@pytest.mark.parametrize("flags,scale,raw", [({}, 0.1, True), ({}, -0.1, False), ({"SOFTCAP": True}, 0.1, False),
                                             ({"ALIBI": True}, 0.1, False)])
def test_raw_max_per_configuration(use_list, flags, scale, raw):
    """The forward's ``RAW_MAX`` (the row maximum over the raw products) as the pruning sets it per configuration:
    only without softcap or ALiBi and with a positive scale, and never for the register-capped tile on a BlockMask
    walk (spills there); the capped tile is tried on band walks of at most ``SHORT_BAND`` keys."""
    from subquad.ops.softmax.flash import tuning

    named = {"MBQ": 128, "MBK": 128, "D": 128, "DV": 128, "qk_scale": scale, "tune_kv": 1024, "tune_walk": 0}
    pruned = tuning._prune(tuning.FWD_CONFIGS_SM90 + tuning._short_walk_tiles(), named, unchain="BLOCK_M",
                           USE_LIST=use_list, **flags)
    capped = [c for c in pruned if c.maxnreg]
    assert capped and len(capped) < len(pruned)
    for c in pruned:
        assert c.kwargs["RAW_MAX"] is (raw and not (use_list and c.maxnreg is not None)), c


def test_overlap_forms_are_tried_on_band_walks(monkeypatch):
    """The forward's ``OVERLAP`` form is a tuning configuration's: tried beside the plain form on band walks with
    8 warps, never on BlockMask walks; ``FWD_OVERLAP`` forces one form everywhere."""
    from subquad.ops.softmax.flash import tuning

    named = {"MBQ": 128, "MBK": 128, "D": 128, "DV": 128, "qk_scale": 0.1}

    def forms(use_list):
        pruned = tuning._prune(tuning.FWD_CONFIGS_SM90, named, unchain="BLOCK_M", USE_LIST=use_list)
        return sorted((c.num_warps, c.kwargs["OVERLAP"]) for c in pruned)

    assert set(forms(False)) == {(4, False), (8, False), (8, True)}
    assert forms(False).count((8, True)) == forms(False).count((8, False))
    assert {overlap for _, overlap in forms(True)} == {False}
    monkeypatch.setattr(tuning, "FWD_OVERLAP", True)
    assert {overlap for _, overlap in forms(False)} == {True}
    assert len(forms(False)) == len(tuning.FWD_CONFIGS_SM90)

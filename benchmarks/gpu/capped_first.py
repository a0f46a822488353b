"""A pytest plugin for a device run (``-p benchmarks.gpu.capped_first``; xdist workers load it too): the forward's
two-programs-an-SM tile (``tuning._CAPPED``, 128 x 64 at 128 registers) first in its list. The GPU tests run
first-that-fits (``SUBQUAD_FLASH_AUTOTUNE=0``), which otherwise never reaches that tile; with it first they run
it wherever the tuner may choose it (short bands, BlockMask walks, a band with gathered columns) and the usual
first tile elsewhere (``tuning._prune`` drops it there)."""

from subquad.ops.softmax.flash import tuning

tuning.FWD_CONFIGS_SM90 = [tuning._CAPPED, *tuning.FWD_CONFIGS_SM90]

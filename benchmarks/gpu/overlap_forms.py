"""Print, for each forward tuning round that timed both forms of the band walk (plain and ``OVERLAP``), each
form's best time and tile: ``python3 benchmarks/gpu/overlap_forms.py`` after a device call's suite, with
``TRITON_CACHE_DIR`` set (the prelude sets it)."""

import glob
import json
import os

for path in glob.glob(os.environ["TRITON_CACHE_DIR"] + "/*/flash_fwd_kernel.autotune.json"):
    with open(path) as f:
        record = json.load(f)
    best = {}
    for config, timing in record["configs_timings"]:
        form = config["kwargs"].get("OVERLAP")
        if form is not None and 0 < timing[0] < best.get(form, (1e9,))[0]:
            best[form] = (round(timing[0], 4), config["kwargs"]["BLOCK_M"], config["kwargs"]["BLOCK_N"],
                          config["num_warps"], config["num_stages"])
    if len(best) == 2:
        print(record["key"][:14], "plain", best[False], "overlap", best[True])

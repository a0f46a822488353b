# Session 41, after the A/B (fwd_overlap.sh): OVERLAP as a tuning configuration of the band walks' forward. The GPU
# tests of the overlapped walk (forced) and of the tuning forms, then the flash suite's dense causal and full rows
# and the 4096 window, every peer in the run, the autotuner choosing the form per length; each form's best tuning
# time. RANGES: the lengths, min:max pairs (session 41 ran 4096:16384; the 1k and 64k rows are
# RANGES="0:1024 65536:65536").
export DEVICE_BUDGET=${DEVICE_BUDGET:-470}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 100 python3 -m pytest tests/test_flash_options.py tests/test_flash_tuning.py \
    -k "overlap" -q -p no:cacheprovider 2>&1 | tail -2
elapsed
for range in ${RANGES:-0:16384}; do
    SUITE_CASES=full,causal,window4096 SUITE_MIN_N=${range%:*} SUITE_MAX_N=${range#*:} \
        SUITE_RESUME=$( [ -f $OUT/dense_overlap.json ] && echo $OUT/dense_overlap.json ) \
        timeout $(( $(left) - 40 )) python3 benchmarks/gpu/suite_run.py flash dense_overlap 2>&1 \
        | grep -v -i warn | grep -E "subquad-triton |flex|sdpa-flash|cudnn|done" | tail -48
    elapsed
done
python3 benchmarks/gpu/overlap_forms.py   # the forward's tuning rounds that timed both forms
tuning_cache_save

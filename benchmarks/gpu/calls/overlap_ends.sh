# Session 42: the GPU tests of the overlapped walk (the record fixed after session 41's last call), then the dense
# suite's 1k and 64k rows (full, causal; the 4096 window at 64k) with OVERLAP in the forward's tuner, every peer
# in the run; the tuning rounds' best time per form.
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 120 python3 -m pytest tests/test_flash_options.py tests/test_flash_tuning.py \
    -k "overlap" -q -p no:cacheprovider 2>&1 | tail -3
elapsed
for range in "0 1024" "65536 65536"; do
    set -- $range
    SUITE_CASES=full,causal,window4096 SUITE_MIN_N=$1 SUITE_MAX_N=$2 SUITE_RESUME=$( [ -f $OUT/dense_ends.json ] \
        && echo $OUT/dense_ends.json ) timeout $(( $(left) - 40 )) python3 benchmarks/gpu/suite_run.py flash \
        dense_ends 2>&1 | grep -v -i warn | grep -E "subquad-triton |flex|sdpa-flash|cudnn|done" | tail -30
    elapsed
done
python3 benchmarks/gpu/overlap_forms.py
tuning_cache_save

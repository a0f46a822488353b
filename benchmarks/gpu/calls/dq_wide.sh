# The dQ programs' wide tile (tuning.BWD_DQ_WIDE: 128 x 128, its loop on 2 stages) as a tuning candidate, against
# the tree before it (.calls/base: `git archive <base> subquad | tar -x -C .calls/base`), autotuned in both, on the
# dense bands where dQ programs run; then its GPU correctness test (the wide tile the only backward configuration).
export DEVICE_BUDGET=${DEVICE_BUDGET:-480}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TRITON_PRINT_AUTOTUNING=1 timeout $(( $(left) - 80 )) python3 benchmarks/gpu/source_ab.py --base .calls/base \
    --rounds 2 --cases full-16k,causal-16k,window4096-16k,causal-1k --out "$OUT/dq-wide-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error|best config" | grep -v "flash_fwd" | tail -40
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 20 )) python3 -m pytest -o addopts= -q -p no:cacheprovider \
    tests/test_flash_schedule.py -k wide 2>&1 | tail -4
elapsed
tuning_cache_save

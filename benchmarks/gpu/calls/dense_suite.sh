# Session 41: issue 4's one-run ratios at 16k after ba9fafe (full attention's backward without the band's masked
# branch): the flash suite's dense causal and full 2 x 16k and the 4096 window at 1 x 16k, every peer in the run.
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUITE_CASES=full,causal,window4096 SUITE_MIN_N=16384 SUITE_MAX_N=16384 \
    timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash dense16k 2>&1 | grep -v -i warn | tail -40
elapsed
tuning_cache_save

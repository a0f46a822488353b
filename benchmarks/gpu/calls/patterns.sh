# Warm after tests_flash16k.sh (the second half of FA4 arrives): FA4's second half; issue 9's patterns suite against flex TRITON and FLASH
export DEVICE_BUDGET=${DEVICE_BUDGET:-560}
source benchmarks/gpu/prelude.sh
source benchmarks/gpu/fa4.sh
[ -f .calls/resume_patterns.json ] && export SUITE_RESUME=.calls/resume_patterns.json
timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py patterns patterns 2>&1 | grep -v -i warn | tail -90
elapsed
tuning_cache_save

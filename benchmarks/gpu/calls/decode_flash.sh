# issue 5's decode suite; issue 4's flash rows the first call left (64k, BigBird, block-sparse), resumed from its JSON
export DEVICE_BUDGET=${DEVICE_BUDGET:-560}
source benchmarks/gpu/prelude.sh
timeout 120 python3 benchmarks/gpu/suite_run.py decode decode 2>&1 | grep -v -i warn | tail -20
elapsed
[ -f .calls/resume_flash.json ] && export SUITE_RESUME=.calls/resume_flash.json
timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash flash_all 2>&1 | grep -v -i warn | tail -40
elapsed
tuning_cache_save

# One cold call (about 150 s of budget), issue 9: Longformer 1 x 64k's backward with dQ programs (no atomics, no
# fp32 dQ to zero and convert: 0.44 of its 5.75 ms fwd+bwd) now that a walk is whole for that launch up to
# DQ_PROGRAMS_LOAD, A/B against the tree before it, with 2 x 16k (unchanged: whole before too) beside it, then
# the schedule tests on the GPU. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 26c7016 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/dq_programs_load.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-140}
source benchmarks/gpu/prelude.sh
timeout $(( $(left) - 45 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases longformer-64k,longformer-16k --out "$OUT/dq-programs-load-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 5 )) python3 -m pytest tests/test_flash_schedule.py -q -o addopts= \
    --tb=short -p no:cacheprovider -k "dq_by_programs or seeded or global_rows" 2>&1 | tail -3
elapsed

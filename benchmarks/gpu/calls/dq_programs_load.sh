# One cold call (about 400 s of budget), issue 9, A/B against 26c7016 (.calls/base) in alternated fresh processes:
# - Longformer 1 x 64k's backward with dQ programs (51dd2c5: no atomics, no fp32 dQ to zero and convert, 0.44 of
#   its 5.75 ms fwd+bwd) now that a walk is whole for that launch up to DQ_PROGRAMS_LOAD, with 2 x 16k beside it
#   (whole before too: should not move);
# - strided and fixed (the band + gathered columns launch): the band's dQ from dQ programs into an fp32 buffer
#   (no zero fill of 268 MB at 2 x 16k, no atomics for the band), which the columns' atomics add to (strided) or
#   the columns' dQ programs start from (fixed: no atomics, no conversion);
# then the schedule and plan tests on the GPU. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 26c7016 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/dq_programs_load.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-400}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 90 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases longformer-64k,longformer-16k,fixed-16k,fixed-64k,strided-16k,strided-64k --out "$OUT/dq-programs-load-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -16
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 5 )) python3 -m pytest tests/test_flash_schedule.py \
    tests/test_plan_triton.py -q -o addopts= --tb=short -p no:cacheprovider 2>&1 | tail -3
elapsed
tuning_cache_save

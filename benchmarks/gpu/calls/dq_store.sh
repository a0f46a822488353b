# One cold call (~300 s of budget), issue 9, NOT YET RUN: a block-diagonal BlockMask's dK/dV programs store dQ
# themselves (DQ_STORE: every query block lists one key block, so one program alone walks each query tile): the
# fixed pattern's local blocks lose the dQ programs of their launch (half its programs, and their second pass over
# the scores and dP). Prediction: fixed 1 x 64k fwd+bwd 13.5 -> ~13.2 ms (the band launch is ~1 GB of tile reads
# by its dK/dV programs and as much again by its dQ programs); block-local 2 x 16k faster by more (its whole
# backward is that launch). A/B against the tree before it (f46c603) in alternated fresh processes, then the GPU
# tests of the change. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive f46c603 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/dq_store.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-300}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 90 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases fixed-64k,fixed-16k,blockdiag-16k --out "$OUT/dq-store-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT $(( $(left) - 10 )) python3 -m pytest tests/test_flash_schedule.py \
    tests/test_plan_triton.py -q -o addopts= --tb=short -rfE -p no:cacheprovider -k "block_diagonal or one_launch" \
    2>&1 | tail -5
elapsed
tuning_cache_save

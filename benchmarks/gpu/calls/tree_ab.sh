# A change to the kernels against the tree before it, in one process (.calls/base:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive <before> subquad | tar -x -C .calls/base).
# First the GPU tests (TEST_FILES; gradients on the GPU: DESIGN.md's known traps), then the A/B, fwd and fwd+bwd,
# on dense, band and BlockMask walks (CASES), into $OUT/$AB_NAME.json. speedup > 1: this tree is faster.
# Session 43: the backward's dP before the exponentials (AB_NAME=bwd-order-ab, base 1eebb83); session 44: the row
# strides as constants (TEST_FILES with tests/test_nsa.py first, AB_NAME=row-strides-ab, base bbe3e2f; a first
# call compiles every kernel anew). The untuned tests no longer write the autotuning cache (aa98907).
export DEVICE_BUDGET=${DEVICE_BUDGET:-480}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT -k 20 ${TESTS_S:-130} python3 -m pytest -n 8 -o addopts= -q -p no:cacheprovider \
    ${TEST_FILES:-tests/test_flash_options.py tests/test_flash_tuning.py tests/test_flash.py tests/test_dropout.py \
    tests/test_varlen.py tests/test_plan_triton.py} 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -12
elapsed
timeout $(( $(left) - 20 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases ${CASES:-full-16k,causal-16k,window4096-16k,causal-1k,longformer-16k,blocksparse0.25-16k} \
    --out "$OUT/${AB_NAME:-tree-ab}.json" 2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -20
elapsed
tuning_cache_save

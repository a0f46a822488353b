# Session 43: the flash kernels' shared row strides as compile-time constants (da8d7db: Q_ROWS, KV_ROWS), against
# the tree before it (.calls/base:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive bbe3e2f subquad | tar -x -C .calls/base).
# First the GPU tests of the flash kernels (the new row-stride layouts among them) and of NSA's selected blocks
# (8bcb9f8, dP before the exponentials, never run on a GPU); then the A/B, fwd and fwd+bwd. speedup > 1: this
# tree is faster. The first call compiles every kernel anew (the constants are new specialisations).
export DEVICE_BUDGET=${DEVICE_BUDGET:-480}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT -k 20 ${TESTS_S:-150} python3 -m pytest -n 8 -o addopts= -q -p no:cacheprovider \
    tests/test_nsa.py tests/test_flash.py tests/test_flash_options.py tests/test_varlen.py tests/test_plan_triton.py \
    2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -12
elapsed
timeout $(( $(left) - 20 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases ${CASES:-full-16k,causal-16k,window4096-16k,longformer-16k,causal-1k,blocksparse0.25-16k} \
    --out "$OUT/row-strides-ab.json" 2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -20
elapsed
tuning_cache_save

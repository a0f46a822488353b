# A cold call: the BlockMask walks' schedule (047ebed: heavy-first only where a block walks 3x the mean) against
# the tree before it (.calls/base = `git archive b140b72 subquad`), alternated in fresh processes: block-sparse
# and documents (now the grid's order) and Longformer / BigBird (heavy-first kept: should not move); then the
# flash GPU tests in an empty Triton cache (b140b72: a tuning round no longer wipes the two-source dQ), then
# the flash suite's block-sparse rows with their peers
export DEVICE_BUDGET=${DEVICE_BUDGET:-545}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout $(( $(left) - 300 )) python3 benchmarks/gpu/source_ab.py --base .calls/base \
    --cases blocksparse0.1-16k,document-4k,longformer-16k,bigbird-16k --out $OUT/order_ab.json 2>&1 | tail -20
elapsed
TRITON_CACHE_DIR=/tmp/fresh-cache SUBQUAD_FLASH_AUTOTUNE=0 timeout 120 python3 -m pytest tests/test_flash.py \
    -k "gpu_patterns_large and not interpret" -q -o addopts= --tb=line -p no:cacheprovider 2>&1 | tail -4
elapsed
SUITE_CASES=block_sparse0.1,block_sparse0.25,block_sparse0.5 SUITE_MAX_N=16384 timeout $(( $(left) - 30 )) \
    python3 benchmarks/gpu/suite_run.py flash block_sparse 2>&1 | grep -v -i warn | tail -20
elapsed
tuning_cache_save

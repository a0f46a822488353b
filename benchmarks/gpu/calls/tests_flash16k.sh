# A cold call: the GPU tests fixed offline or never run on a GPU (the shims' and NSA's kernel tests, CUDA-graph
# decoding, LSH's kernels, the flash kernels with the walks' new backward), then issue 4's flash suite up to 16k in
# one run: the block-sparse, Longformer and BigBird rows first (their fixes were never measured), then the rest,
# rows written as they come to $OUT/flash_all.json (decode_flash.sh resumes it with the 64k rows); FA4's first half
export DEVICE_BUDGET=${DEVICE_BUDGET:-545}
source benchmarks/gpu/prelude.sh
bash .peers1/peer-install.sh | tail -1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
SUBQUAD_FLASH_AUTOTUNE=0 timeout ${TESTS_S:-170} python3 -m pytest tests/test_compiled_decode.py tests/test_flash_attn_compat.py tests/test_flex_attention_compat.py tests/test_nsa.py tests/test_lsh.py tests/test_flash.py -k "not interpret and (gpu or compat or reduce or (nsa and (triton or kernels)) or (lsh and triton)) and not rows_past" -v --tb=short -p no:cacheprovider -rf > $OUT/tests1.log 2>&1; echo "pytest rc=$?" >> $OUT/tests1.log
grep -E "passed|failed|FAILED|ERROR|rc=" $OUT/tests1.log | tail -25
elapsed
SUITE_CASES=block_sparse0.1,block_sparse0.25,block_sparse0.5,longformer512+16,bigbird512+16+3x64 SUITE_MAX_N=16384 \
    timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash flash_all 2>&1 | grep -v -i warn | tail -30
elapsed
SUITE_RESUME=$OUT/flash_all.json SUITE_MAX_N=16384 timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash flash_all 2>&1 | grep -v -i warn | tail -70
elapsed
tuning_cache_save

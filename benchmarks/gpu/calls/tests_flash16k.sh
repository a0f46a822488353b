# A cold call: the GPU tests not yet passed on a GPU (grid splits, CUDA-graph decoding, flash head_dim 256 on), then issue 4's flash suite
# up to 16k with every peer (rows written as they come); FA4's first half stashed
export DEVICE_BUDGET=${DEVICE_BUDGET:-545}
source benchmarks/gpu/prelude.sh
bash .peers1/peer-install.sh | tail -1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
SUBQUAD_FLASH_AUTOTUNE=0 timeout ${TESTS_S:-230} python3 -m pytest tests/test_grid_limits.py tests/test_compiled_decode.py tests/test_complement.py tests/test_flash_attn_compat.py tests/test_flex_attention_compat.py tests/test_nsa.py tests/test_lsh.py tests/test_decode.py tests/test_flash.py -k "not interpret and (grid or gpu or complement or compat or (nsa and (triton or kernels)) or (lsh and triton)) and not rows_past" -v --tb=short -p no:cacheprovider -rf > $OUT/tests1.log 2>&1; echo "pytest rc=$?" >> $OUT/tests1.log
tail -25 $OUT/tests1.log
elapsed
[ -f .calls/resume_flash.json ] && export SUITE_RESUME=.calls/resume_flash.json
SUITE_MAX_N=16384 timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash flash16k 2>&1 | grep -v -i warn | tail -70
elapsed
tuning_cache_save

# One cold call (name nvidia-h100-x1): the forward's row maximum over the raw products (RAW_MAX), against the
# tree before it (.calls/base). First the flash forward's GPU tests on the working tree (autotuning off), then
# source_ab.py, three alternated rounds, forward and fwd+bwd (the backward is unchanged: its rows show the noise).
#   run(command="bash benchmarks/gpu/calls/raw_max.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 170 python3 -m pytest -n 8 -q -o addopts= -p no:cacheprovider -m "not gpu_alone" \
    tests/test_flash.py tests/test_flash_options.py tests/test_plan_triton.py 2>&1 | tail -4
elapsed
timeout $(( $(left) - 25 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases causal-1k,full-1k,full-16k,window4096-16k,blocksparse0.1-16k,blocksparse0.25-16k,longformer-16k \
    --out $OUT/raw_max_ab.json 2>&1 | grep -v -i warn | tail -24
elapsed
tuning_cache_save

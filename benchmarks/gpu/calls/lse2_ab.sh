# One cold call (name nvidia-h100-x1): the backward reading the LSE in base 2 from the preprocess (LSE2, session 47,
# NOT MEASURED when it landed: sm90 dK/dV loops 443 -> 368 instructions at full 16k, 645 -> 597 causal 1k,
# 444 -> 396 block-sparse, no new spills) against the tree before it. First:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 30d47df subquad | tar -x -C .calls/base
# Then the backward's GPU tests on the working tree (autotuning off) and source_ab.py, three alternated rounds
# (the forwards are the same code on both sides: their rows show the noise).
#   run(command="bash benchmarks/gpu/calls/lse2_ab.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 170 python3 -m pytest -n 8 -q -o addopts= -p no:cacheprovider -m "not gpu_alone" \
    tests/test_flash.py tests/test_flash_options.py tests/test_plan_triton.py tests/test_dropout.py 2>&1 | tail -2
elapsed
timeout $(( $(left) - 25 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases causal-1k,full-16k,causal-16k,window4096-16k,blocksparse0.1-16k,longformer-16k,bigbird-16k \
    --out $OUT/lse2_ab.json 2>&1 | grep -v -i warn | grep -E "mode=fwdbwd|done" | sed -E 's/ (base|head)_tiles=\[[^]]*\]//g' | tail -24
elapsed
tuning_cache_save

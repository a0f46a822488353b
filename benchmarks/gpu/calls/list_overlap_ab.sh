# One cold call (name nvidia-h100-x1): the forward's OVERLAP on BlockMask walks (LIST_OVERLAP, session 48, NOT
# MEASURED when it landed: sm90 block-sparse 16k at 128 x 128 x 8 x 2, 534 instructions a tile, 246 registers, no
# spills) against the tree before it. First:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 4f50e9d subquad | tar -x -C .calls/base
# (4f50e9d: the tree before fb6807f.) Then the forward's GPU tests on the working tree (autotuning off; the forced
# overlap test covers the BlockMask walks), and source_ab.py, three alternated rounds, each tree tuned (the tuner
# times the overlapped form beside the plain one and the capped tile; the band rows are the same code on both
# sides: their rows show the noise).
#   run(command="bash benchmarks/gpu/calls/list_overlap_ab.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 150 python3 -m pytest -n 8 -q -o addopts= -p no:cacheprovider -m "not gpu_alone" \
    tests/test_flash_options.py tests/test_flash_schedule.py tests/test_plan_triton.py 2>&1 | tail -3
elapsed
timeout $(( $(left) - 25 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases blocksparse0.1-16k,blocksparse0.25-16k,blocksparse0.5-16k,longformer-16k,bigbird-16k,full-16k \
    --out $OUT/list_overlap_ab.json 2>&1 | grep -v -i warn | grep -E "case=|done" \
    | sed -E 's/ (base|head)_spread=[^ ]*//g' | tail -16
elapsed
tuning_cache_save

# One cold call (about 330 s of budget), issue 9: BigBird's plan (band + random blocks, both on the sequence as
# it is) differentiated as one backward launch of the whole pattern on the merged output and LSE, A/B against
# the tree before it (one backward per component, the merge's backward, the gradients summed; H100 2 x 16k
# fwd+bwd 4.90 ms planned against 3.79 for the pattern's own BlockMask), then the planned tests on the GPU
# (Triton 3.6's Hopper gradients). Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive bc63b13 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/natural_backward.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-300}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 110 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases bigbird-16k,bigbird-64k --out "$OUT/natural-backward-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 20 )) python3 -m pytest tests/test_plan_triton.py -q -o addopts= \
    --tb=short -p no:cacheprovider 2>&1 | tail -4
elapsed
tuning_cache_save

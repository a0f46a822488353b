# One cold call (~250 s of budget), issue 9: the strided pattern's gathered columns take dQ programs beside their
# split dK/dV walks (no fp32 dQ atomics, no conversion: 0.13 of strided 2 x 16k's 1.94 ms fwd+bwd), A/B against
# the tree before it in alternated fresh processes (fixed should not move: its columns were whole already).
# Ran in session 36 at 4fb688d (H100, `2026-12-06-two-source-split-ab-h100.json`): strided fwd+bwd 0.91x at 2 x 16k,
# 0.95x at 1 x 64k, forwards and fixed unchanged; the change was reverted (00afd66), so the tree is now its base.
# Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 0f2b137 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/two_source_split.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-250}
source benchmarks/gpu/prelude.sh
timeout $(( $(left) - 60 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases strided-16k,strided-64k,fixed-16k --out "$OUT/two-source-split-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 5 )) python3 -m pytest tests/test_plan_triton.py -q -o addopts= \
    --tb=short -p no:cacheprovider -k "one_launch or deterministic_plan" 2>&1 | tail -3
elapsed
tuning_cache_save

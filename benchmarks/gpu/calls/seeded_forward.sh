# One cold call (about 430 s of budget), issue 9: BigBird's planned forward without its merge (the random blocks'
# launch goes on from the band's output and LSE in place, SEEDED), A/B against the tree before it (a second
# output and the fused LSE merge: 0.16 of 1.08 ms at 2 x 16k on the H100); the seeded launch's tests on the GPU
# (Triton 3.6 on Hopper); then where Longformer's time goes at 2 x 16k and 1 x 64k (its 16k -> 64k growth,
# 4.64x / 4.48x in session 33), forward and fwd+bwd. FA4's first half is stashed for patterns.sh. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive eea3745 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/seeded_forward.sh",
#       carry=[".calls", ".peers1", ".tuning-cache/autotune.tgz"])   (the kernels' parts do not fit beside .peers1)
export DEVICE_BUDGET=${DEVICE_BUDGET:-430}
source benchmarks/gpu/prelude.sh
[ -d .peers1 ] && bash .peers1/peer-install.sh | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 260 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases bigbird-16k,bigbird-64k --out "$OUT/seeded-forward-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 150 )) python3 -m pytest tests/test_plan_triton.py \
    tests/test_flash_schedule.py -q -o addopts= --tb=short -p no:cacheprovider 2>&1 | tail -6
elapsed
for shape in "16384 2" "65536 1"; do
    for mode in fwd fwdbwd; do
        PLAN_PROFILE_PATTERNS=longformer512+16 timeout $(( ($(left) - 20) / 2 )) python3 \
            benchmarks/gpu/plan_profile.py $shape $mode 2>&1 | grep -v -i warn | grep -v "host us" | tail -4
        mv "$OUT/plan_profile.json" "$OUT/plan_profile_longformer_${shape// /x}_$mode.json" 2>/dev/null
    done
    elapsed
done
tuning_cache_save

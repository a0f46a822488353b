# One cold call (about 400 s of budget), issue 9: BigBird's planned forward without its merge (the random blocks'
# launch goes on from the band's output and LSE in place, SEEDED), A/B against the tree before it (a second
# output and the fused LSE merge: 0.16 of 1.08 ms at 2 x 16k on the H100); the seeded launch's tests on the GPU
# (Triton 3.6 on Hopper); then where Longformer's 1 x 64k time goes (its 16k -> 64k growth, 4.64x / 4.48x in
# session 33), forward and fwd+bwd. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive eea3745 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/seeded_forward.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-420}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 260 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases bigbird-16k,bigbird-64k --out "$OUT/seeded-forward-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 150 )) python3 -m pytest tests/test_plan_triton.py \
    tests/test_flash_schedule.py -q -o addopts= --tb=short -p no:cacheprovider 2>&1 | tail -6
elapsed
for mode in fwd fwdbwd; do
    PLAN_PROFILE_PATTERNS=longformer512+16 timeout $(( ($(left) - 20) / 2 )) python3 benchmarks/gpu/plan_profile.py \
        65536 1 $mode 2>&1 | grep -v -i warn | tail -25
    mv "$OUT/plan_profile.json" "$OUT/plan_profile_longformer64k_$mode.json" 2>/dev/null
    elapsed
done
tuning_cache_save

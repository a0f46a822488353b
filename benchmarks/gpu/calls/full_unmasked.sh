# Session 40: full attention's band walks without the band's masked branch (MASKED = BAND; the backward's kept, the
# forward's reverted: its tile ran slower, 2026-12-06-full-unmasked-ab*-h100.json) against the tree before
# (.calls/base: `git archive <base> subquad | tar -x -C .calls/base`): full 2 x 16k and 32 x 1k, causal 2 x 16k as
# the control (its code path is unchanged), then the head's flex_vs_ours.py (per-kernel times against flex).
export DEVICE_BUDGET=${DEVICE_BUDGET:-420}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout $(( $(left) - 100 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases full-16k,full-1k,causal-16k --out "$OUT/full-unmasked-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
TORCHINDUCTOR_CACHE_DIR=/tmp/ind timeout $(( $(left) - 20 )) python3 benchmarks/gpu/flex_vs_ours.py 2>&1 \
    | grep -v -i warn | tail -4
elapsed
tuning_cache_save

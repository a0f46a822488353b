# A cold call (planned in session 39, not run: its starts were refused): dense bands' backward with dQ by atomics
# (TMA reduce-adds into fp32 sums, converted after) against the dQ programs that bands take now, at the shapes
# where issue 4's dense full 2 x 16k fwd+bwd ties flex (0.99x). The dQ programs compute the scores and dP a
# second time (7 products a tile pair against 5) but need no fp32 dQ; they were chosen on causal 32 x 1k and
# window 4096 2 x 16k (H200, 2026-12-05-det-vs-atomic-ab-h200.json: 1.05x / 1.01x), never on long full or
# causal walks. The variant tree (.calls/atomic):
#   mkdir -p .calls/atomic && git archive HEAD subquad | tar -x -C .calls/atomic
#   and in .calls/atomic/subquad/ops/softmax/flash/launch.py, _dq_by_programs:
#   `return not m.use_list or _walks_whole(m, q, k)` -> `return m.use_list and _walks_whole(m, q, k)`
# speedup > 1: the dQ programs (this tree) are faster. The window and causal 1k (the H200's two cases) on the same
# machine decide a walk-length threshold if the atomics win on the long walks.
export DEVICE_BUDGET=${DEVICE_BUDGET:-420}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout $(( $(left) - 20 )) python3 benchmarks/gpu/source_ab.py --base .calls/atomic --rounds 2 \
    --cases full-16k,causal-16k,window4096-16k,causal-1k,full-1k --out "$OUT/band-atomic-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -16
elapsed
tuning_cache_save

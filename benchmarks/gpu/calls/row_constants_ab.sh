# Session 45's next step: the row-stride constants (da8d7db: K/V's and Q/dO/dQ's row stride as constexprs on band
# walks) against the same tree with them off (`launch._row_stride` returning 0), made here on the device from the
# working tree into .calls/base. Session 45's bisection put 1.4 of the causal 32 x 1k forward's 4 lost points on
# them (2026-12-07-causal1k-bisect-ab-h100.json), while session 44 measured them 1.02-1.07x faster forward at 16k
# and 0.97x on causal fwd+bwd. The rows name each tree's tuned tiles (base_tiles / head_tiles).
#   run(command="bash benchmarks/gpu/calls/row_constants_ab.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-300}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
rm -rf .calls/base && mkdir -p .calls/base && cp -r subquad .calls/base/
sed -i 's/^    return strides.pop() if len(strides) == 1 and not m.use_list else 0$/    return 0/' \
    .calls/base/subquad/ops/softmax/flash/launch.py
grep -q '^    return 0$' .calls/base/subquad/ops/softmax/flash/launch.py || { echo "the patch did not apply"; exit 1; }
timeout $(( $(left) - 20 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases ${CASES:-causal-1k,full-1k,causal-4k,causal-16k} --out "$OUT/row-constants-off-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -16
elapsed
tuning_cache_save

# One call (~250 s of budget warm, ~330 cold), issue 9, NOT YET RUN: the strided and fixed patterns' gathered
# columns through strided views of K and V (825a29c: a strided copy to gather them, an elementwise add on a
# strided view to put their dK/dV back) instead of index_select and the bf16 atomic index_add_, which took 0.083
# ms of fixed's 2.715 ms fwd+bwd at 2 x 16k and 0.151 of 12.79 at 1 x 64k (2026-12-06-dq-store-ab-h100.json).
# Prediction: fixed 2 x 16k fwd+bwd 2.73 -> ~2.67 ms, 1 x 64k 12.96 -> ~12.85; strided less (its 64 columns at
# 16k are 8 MB fewer). A/B against the tree before it (408e808) in alternated fresh processes. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 408e808 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/periodic_views.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-300}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 20 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases fixed-16k,strided-16k,fixed-64k --out "$OUT/periodic-views-ab.json" \
    2>&1 | grep -v -i warn | grep -E "^case=|failed|Error" | tail -12
elapsed
tuning_cache_save

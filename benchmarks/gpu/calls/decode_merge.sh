# One cold call (name nvidia-h100-x1), issue 5: the split-KV decode's merge read split by split (no reduction
# across warps between the partials' loads; sm90 SASS: two barriers a split instead of five, the six splits'
# loads in two waves instead of six), A/B against the tree before it, then the decode suite (GQA against
# SDPA-flash and cuDNN, paged, MLA) with the device copy in the same run. Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive BASE subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/decode_merge.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-550}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 200 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 3 \
    --cases gqa-decode-8k,gqa-decode-32k,gqa-decode-128k,mla-decode-16k --out "$OUT/decode-merge-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed" | tail -12
elapsed
timeout $(( $(left) - 25 )) python3 benchmarks/gpu/suite_run.py decode decode 2>&1 | grep -v -i warn | tail -20
elapsed
tuning_cache_save

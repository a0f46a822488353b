# Issue 4's whole flash suite (dense causal and full 1k-64k, the 4096 window at 16k and 64k, Longformer, BigBird,
# block-sparse), every peer in the run, spread over warm calls: each call resumes from the last one's JSON
# (copy it to .calls/resume_flash.json before the next call; remove it after the last).
export DEVICE_BUDGET=${DEVICE_BUDGET:-550}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
[ -f .calls/resume_flash.json ] && export SUITE_RESUME=.calls/resume_flash.json
timeout $(( $(left) - 30 )) python3 benchmarks/gpu/suite_run.py flash flash_all 2>&1 | grep -v -i warn \
    | grep -E "subquad-triton |flex|sdpa-flash|cudnn|done" | tail -60
elapsed
python3 benchmarks/gpu/overlap_forms.py
tuning_cache_save

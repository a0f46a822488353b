# One cold call (name nvidia-h100-x1), issue 9: the BlockMask walks' order decided pass by pass with the tail
# rule (a4fdc2a: head by head only where the longest walk is <= TAIL_SHARE of an SM's mean work), A/B against the
# tree before it, alternated in fresh processes: fixed (its gathered columns' dK/dV heads fastest again: fwd+bwd
# 3.48 ms at 737cf30, 3.10 at 57934e6), strided; block-sparse and documents must not move. Then the GPU tests of
# the walks' schedule and the compiled decode (c48bbaa: CUDA tensors there). Before the call:
#   rm -rf .calls/base && mkdir -p .calls/base && git archive 0c7b3e5 subquad | tar -x -C .calls/base
#   run(command="bash benchmarks/gpu/calls/schedule_tail.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-550}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(( $(left) - 150 )) python3 benchmarks/gpu/source_ab.py --base .calls/base --rounds 2 \
    --cases fixed-16k,strided-16k,blocksparse0.1-16k,document-4k --out "$OUT/schedule-tail-ab.json" 2>&1 \
    | grep -v -i warn | grep -E "^case=|failed" | tail -12
elapsed
SUBQUAD_FLASH_AUTOTUNE=0 timeout $(( $(left) - 25 )) python3 -m pytest tests/test_flash_schedule.py \
    tests/test_compiled_decode.py tests/test_checks.py -k "not interpret" -q -o addopts= --tb=short \
    -p no:cacheprovider 2>&1 | tail -5
elapsed
tuning_cache_save

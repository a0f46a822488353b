# Issue 4's flash suite in parts, each a suite_run.py process writing $OUT/flash_PART.json (session 46's split):
#   run(command="bash benchmarks/gpu/calls/flash_parts.sh 16k sparse window", carry=[".calls", ".tuning-cache"])
# Parts: 1k (dense 32 x 1k), dense (dense 4k-64k), window (4096 at 16k and 64k), 16k (dense full 2 x 16k and
# block-sparse 0.1 / 0.25 / 0.5), sparse (Longformer, BigBird at 16k). Dense rows have the SDPA flash and cuDNN
# peers, the others flex only (issue 4 asks no SDPA ratio there). Merge the parts' JSON lists afterwards; the
# block-sparse ratios are over the 16k part's own dense full rows (one process).
export DEVICE_BUDGET=${DEVICE_BUDGET:-560}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
dense_peers=subquad-triton,flex,sdpa-flash,sdpa-cudnn
part() {
    SUITE_CASES=$2 SUITE_MIN_N=$3 SUITE_MAX_N=$4 SUITE_IMPLS=$5 timeout $(( $(left) - 30 )) \
        python3 benchmarks/gpu/suite_run.py flash "flash_$1" 2>&1 | grep -v -i warn | grep -E "subquad-triton |done" \
        | tail -30
    elapsed
}
for name in "$@"; do
    case $name in
        1k) part 1k causal,full 0 1024 $dense_peers ;;
        dense) part dense causal,full 4096 65536 $dense_peers ;;
        window) part window window4096 0 0 subquad-triton,flex ;;
        16k) part 16k full,block_sparse0.1,block_sparse0.25,block_sparse0.5 16384 16384 subquad-triton,flex ;;
        sparse) part sparse longformer512+16,bigbird512+16+3x64 16384 16384 subquad-triton,flex ;;
        *) echo "unknown part $name" ;;
    esac
done
tuning_cache_save

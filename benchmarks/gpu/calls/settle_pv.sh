# One cold call (name nvidia-h100-x1): the capped 128 x 64 forward tile (two programs an SM, 128 registers) with
# its P.V product waited on inside the iteration, against the tile as it is. As it is, ptxas serializes the tile's
# wgmmas (C7512); with the product's result used once more in the iteration (Triton then waits for it there) the
# QK^T wgmmas issue back to back but the loop spills (sm90, Triton 3.6: 56 B at block-sparse 16k, 156 B at causal
# 1k). Three trees under .calls (base: HEAD; settle_add: `acc + 0.0` after the product; settle_asm: an identity
# `mov` in inline asm), each forcing the capped tile, alternated over two rounds.
#   run(command="bash benchmarks/gpu/calls/settle_pv.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-555}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
for round in 1 2; do
    for tree in base settle_add settle_asm; do
        mkdir -p "$OUT/$tree-$round"
        echo "== $tree round $round"
        OUT="$OUT/$tree-$round" PYTHONPATH=".calls/$tree:$PYTHONPATH" SWEEP_SHAPES= \
            SWEEP_CASES=blocksparse0.1-16k,blocksparse0.25-16k,causal-1k,full-1k SWEEP_FWD=128x64x8x2x128 \
            SWEEP_DKDV=none timeout $(( $(left) - 30 )) python3 benchmarks/gpu/flash_config_sweep.py 2>&1 \
            | grep -v -i warn | grep -o "'case': '[^']*'.*'impl': '[^']*'.*fwd_ms': [0-9.]*" | tail -8
        elapsed
    done
done
tuning_cache_save

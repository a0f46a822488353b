# Session 41: the forward's P.V product beside the next tile's softmax (FlashAttention-3's order within a
# warpgroup). First the stand-alone prototype (overlap_proto.py: the library's order against QK-beside-softmax and
# PV-beside-softmax, full attention, fixed 128 x 128 x 8 warps tiles), then the library's band walks with the
# switch off and on in one process (switch_ab.py --switch FWD_OVERLAP), each variant tuned on its own.
export DEVICE_BUDGET=${DEVICE_BUDGET:-540}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
SUBQUAD_FLASH_AUTOTUNE=0 timeout 120 python3 -m pytest tests/test_flash_options.py -k overlapped -q \
    -p no:cacheprovider 2>&1 | tail -2
timeout 150 python3 benchmarks/gpu/overlap_proto.py 2>&1 | grep -v -i warn | tail -24
elapsed
timeout $(( $(left) - 30 )) python3 benchmarks/gpu/switch_ab.py --switch FWD_OVERLAP \
    --cases ${CASES:-full-16k,causal-16k,window4096-16k,causal-1k,full-4k} 2>&1 | grep -v -i warn | tail -16
elapsed
tuning_cache_save

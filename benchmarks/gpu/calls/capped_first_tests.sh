# The flash kernels' GPU tests with the capped forward tile first (benchmarks/gpu/capped_first.py): since e27bb5d
# the tuner takes it for dense 32 x 1k, and the GPU tests' first-that-fits mode had never run it on a band.
#   run(command="bash benchmarks/gpu/calls/capped_first_tests.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-500}
source benchmarks/gpu/prelude.sh
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT -k 30 $(( $(left) - 40 )) python3 -m pytest -n 8 -v -o addopts= \
    --tb=short -rfE -p no:cacheprovider -p benchmarks.gpu.capped_first --timeout 240 \
    ${TESTS:-tests/test_flash.py tests/test_flash_options.py tests/test_flash_terms.py tests/test_plan_triton.py \
    tests/test_dropout.py tests/test_varlen.py} > $OUT/tests.log 2>&1
grep -E "^(FAILED|ERROR)|(FAILED|ERROR) tests/|passed|failed" $OUT/tests.log | tail -40
elapsed

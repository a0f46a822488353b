# The whole test suite on the GPU, eight workers (compiles run in parallel on the host's cores), every test's
# outcome kept: `$OUT/tests.log` (short tracebacks) and `$OUT/tests.xml` (JUnit), the failures printed last.
# Session 35's run of 24 files: 782 passed, 3 failed, ~210 s warm, ~400 s with the compiles (a call's limit cut
# the first). Flash autotuning off (each test shape would be tuned anew); the linear kernels' on, as users run
# them (SUBQUAD_LINEAR_AUTOTUNE=0 turns it off). Run twice to tell a failure from a first call's autotuning.
#   run(command="bash benchmarks/gpu/calls/tests_all.sh", carry=[".calls", ".tuning-cache"])
export DEVICE_BUDGET=${DEVICE_BUDGET:-560}
source benchmarks/gpu/prelude.sh
# -v names each outcome as it comes, and the time limit interrupts pytest (SIGINT) rather than killing it, so that
# a run cut short still prints its failures' tracebacks and summary (session 36's first run, cut at 97%, named none)
# The tests marked gpu_alone (tens of GB each) run after the rest, one at a time: beside seven other workers they
# ran out of memory and took neighbours with them (session 47: 8 failures, all out of memory; alone, all passed)
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT -k 30 $(( $(left) - 150 )) python3 -m pytest -n 8 -v -o addopts= \
    --tb=short -rfE -p no:cacheprovider --timeout 240 -m "not gpu_alone" --junitxml=$OUT/tests.xml ${TESTS:-tests} \
    > $OUT/tests.log 2>&1
SUBQUAD_FLASH_AUTOTUNE=0 timeout -s INT -k 30 $(( $(left) - 60 )) python3 -m pytest -v -o addopts= \
    --tb=short -rfE -p no:cacheprovider --timeout 240 -m gpu_alone --junitxml=$OUT/tests_alone.xml ${TESTS:-tests} \
    > $OUT/tests_alone.log 2>&1
grep -h -E "^(FAILED|ERROR)|(FAILED|ERROR) tests/|passed|failed" $OUT/tests.log $OUT/tests_alone.log | tail -40
elapsed
tuning_cache_save

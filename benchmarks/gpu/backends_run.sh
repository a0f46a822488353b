#!/usr/bin/env bash
# Device calls for issue 8 (FA4 backend + auto dispatch): install the carried peer wheels (whichever half of
# .peers1/.peers2 this call carries; ../shared/tools/peer-wheels.sh), then, with FA4's kernel disk cache on,
#   1. if TESTS_S > 0: the FA4 and FlexAttention GPU tests (tests/test_fa4_gpu.py, tests/test_flex_backend.py
#      -k gpu), alone, for up to TESTS_S seconds (each FA4 test compiles its CuTe kernels: run beside the
#      warm-up with 150 s they were cut off twice, 13 tests in);
#   2. if WARM_S > 0: the compile warm-up of the backends suite, then the suite: candidates -> dispatch table
#      -> subquad-auto and the peers, up to BENCH_DEADLINE_S,
# writing pytest.log, warm.log, bench.log, backends.json and dispatch_table.json to $OUT.
#   bash benchmarks/gpu/backends_run.sh WARM_S BENCH_DEADLINE_S [TESTS_S]
#   e.g. one call `... 0 0 500` (tests), the next `... 130 300` (bench): a call may run 600 s at most.
set -u
warm_s=${1:-140}; bench_s=${2:-150}; tests_s=${3:-0}
for d in .peers1 .peers2; do [ -d "$d" ] && bash "$d/peer-install.sh" | tail -1; done
export PYTHONPATH=$HOME/.cache/subquad-site:$HOME/.cache/subquad-site/nvidia_cutlass_dsl/dsl_packages:$PWD
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1
python3 -c "import torch, triton, flash_attn.cute; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "FA4 not importable yet (carry the other half)"; exit 3; }
if [ "$tests_s" -gt 0 ]; then
  timeout "$tests_s" python3 -m pytest tests/test_fa4_gpu.py tests/test_flex_backend.py -k gpu -q \
    -p no:cacheprovider -rf > "$OUT/pytest.log" 2>&1
  echo "rc=$?" >> "$OUT/pytest.log"
  tail -15 "$OUT/pytest.log"
fi
[ "$warm_s" -gt 0 ] || exit 0
timeout $((warm_s + 10)) python3 -m subquad.bench.suites.backends --warm-only "$warm_s" > "$OUT/warm.log" 2>&1
grep -v -E "s$" "$OUT/warm.log" | grep -v -i warn | tail -20
timeout $((bench_s + 80)) python3 -m subquad.bench.suites.backends "$OUT" --deadline "$bench_s" > "$OUT/bench.log" 2>&1
grep -E "deadline" "$OUT/bench.log" | head
tail -62 "$OUT/bench.log"

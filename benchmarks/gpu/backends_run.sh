#!/usr/bin/env bash
# One device call for issue 8 (FA4 backend + auto dispatch): install the carried peer wheels (whichever half of
# .peers1/.peers2 this call carries; ../shared/tools/peer-wheels.sh), then, with FA4's kernel disk cache on,
#   1. the FA4 and FlexAttention GPU tests (tests/test_fa4_gpu.py, tests/test_flex_backend.py -k gpu) in parallel
#      with the compile warm-up of the backends suite,
#   2. the backends suite: candidates -> dispatch table -> subquad-auto and the peers, up to a deadline,
# writing pytest.log, warm.log, bench.log, backends.json and dispatch_table.json to $OUT.
#   bash benchmarks/gpu/backends_run.sh [WARM_S] [BENCH_DEADLINE_S]
set -u
warm_s=${1:-140}; bench_s=${2:-150}
for d in .peers1 .peers2; do [ -d "$d" ] && bash "$d/peer-install.sh" | tail -1; done
export PYTHONPATH=$HOME/.cache/subquad-site:$HOME/.cache/subquad-site/nvidia_cutlass_dsl/dsl_packages:$PWD
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1
python3 -c "import torch, triton, flash_attn.cute; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "FA4 not importable yet (carry the other half)"; exit 3; }
(timeout $((warm_s + 30)) python3 -m pytest tests/test_fa4_gpu.py tests/test_flex_backend.py -k gpu -q -p no:cacheprovider -rf > "$OUT/pytest.log" 2>&1;
 echo "rc=$?" >> "$OUT/pytest.log") &
timeout $((warm_s + 10)) python3 -m subquad.bench.suites.backends --warm-only "$warm_s" > "$OUT/warm.log" 2>&1
wait
tail -30 "$OUT/pytest.log"
grep -v -E "s$" "$OUT/warm.log" | grep -v -i warn | tail -20
timeout $((bench_s + 80)) python3 -m subquad.bench.suites.backends "$OUT" --deadline "$bench_s" > "$OUT/bench.log" 2>&1
grep -E "deadline" "$OUT/bench.log" | head
tail -62 "$OUT/bench.log"

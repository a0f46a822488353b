# Sourced first by a device command (bash): the peers carried as files, the tuning cache, and a clock.
#
#   run(command="source benchmarks/gpu/prelude.sh; ...; tuning_cache_save",
#       carry=[".peers2/fla_core-0.6.0-py3-none-any.whl", ".peers3", ".tuning-cache", ...])
#
# fla from its carried wheel into $HOME/site, mamba-ssm's source tree (.peers3, from mamba-src.sh), both on
# PYTHONPATH; Triton's autotuning results and subquad's compiled kernels from .tuning-cache (tuning-cache.sh).
# `elapsed` prints the seconds since the prelude; `left` the seconds left of DEVICE_BUDGET (default 520, a
# call's 600 less the start and the saves): give each step `timeout $(left)` so that the saves still run.
export PYTHONUNBUFFERED=1
# the commit the rows' versions name (the copy of the tree has no git directory): written here before a call,
#   git rev-parse --short=12 HEAD > .calls/commit   (with "+dirty" appended for uncommitted changes)
[ -f .calls/commit ] && export SUBQUAD_COMMIT="$(cat .calls/commit)"
T0=$(date +%s)
elapsed() { echo "t=$(( $(date +%s) - T0 ))"; }
left() { echo $(( ${DEVICE_BUDGET:-520} - ($(date +%s) - T0) )); }
source benchmarks/gpu/tuning-cache.sh
for wheel in .peers2/fla_core-*.whl; do
    [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --target "$HOME/site" "$wheel"
done
export PYTHONPATH=".:$HOME/site:.peers3${PYTHONPATH:+:$PYTHONPATH}"

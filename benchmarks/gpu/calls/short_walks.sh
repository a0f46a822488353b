# One cold call (name nvidia-h100-x1): the two-programs-an-SM tiles on the planned patterns (9a6cd89, not yet
# measured). Each forward tile forced in turn on strided / fixed / dilated 2 x 16k
# (`tuning.FWD_SHORT_WALKS` off meanwhile), then issue 9's suite rows at 16k against flex TRITON, the
# autotuner's choice printed. FA4 (flex FLASH) needs both peer halves on one machine: not here.
#   run(command="bash benchmarks/gpu/calls/short_walks.sh", carry=[".calls", ".tuning-cache"], kind="nvidia-h100-x1")
export DEVICE_BUDGET=${DEVICE_BUDGET:-550}
source benchmarks/gpu/prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
SWEEP_SHAPES= SWEEP_CASES=strided-16k,fixed-16k,dilated-16k \
    SWEEP_FWD=128x128x8x3,128x64x8x3,128x64x4x3,128x64x8x2x128,64x64x4x3 SWEEP_DKDV=none \
    timeout $(( $(left) - 250 )) python3 benchmarks/gpu/flash_config_sweep.py 2>&1 | grep -v -i warn | tail -20
elapsed
SUITE_CASES=strided256,fixed128x8,dilated4096x4 SUITE_MAX_N=16384 TRITON_PRINT_AUTOTUNING=1 \
    timeout $(( $(left) - 25 )) python3 benchmarks/gpu/suite_run.py patterns patterns16k 2>&1 | grep -v -i warn \
    | grep -E "best config|subquad|flex" | tail -30
elapsed
tuning_cache_save

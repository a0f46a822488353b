# (sourced by the call scripts) FA4 and the CuTe DSL from the halves carried as .peers1 and .peers2 (../shared/tools/peer-wheels.sh), once both have arrived on this machine
for d in .peers1 .peers2; do [ -d "$d" ] && bash "$d/peer-install.sh" | tail -1; done
export PYTHONPATH=$HOME/.cache/subquad-site:$HOME/.cache/subquad-site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
python3 -c "import flash_attn.cute; print('FA4 importable')" 2>&1 | tail -1

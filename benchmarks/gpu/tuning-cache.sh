# Autotuning results kept from one device call to the next (sourced by a device command).
#
# fla's backward kernels autotune for ~300 s per op on a fresh machine (benchmarks/NOTES.md, session 10), and
# every call gets a fresh machine. Triton can keep each autotuner's timings on disk (TRITON_CACHE_AUTOTUNING=1,
# keyed by Triton's version, the target, the kernel's source and the tuning key): a later call then compiles the
# chosen configuration only. Those files travel back in one tarball under $OUT, and come again through `carry`:
#
#   here, after a call:  cp <files_at>/autotune.tgz .tuning-cache/   (.tuning-cache/ is git-ignored)
#   device command:      source benchmarks/gpu/tuning-cache.sh; ...; tuning_cache_save
#   with carry:          [".tuning-cache", ...]
export TRITON_CACHE_DIR="$HOME/.triton-tuned"
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .tuning-cache/autotune.tgz ]; then
    tar -xzf .tuning-cache/autotune.tgz -C "$TRITON_CACHE_DIR"
    echo "tuning-cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotuning results loaded"
fi

tuning_cache_save() {
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/autotune.tgz" --null -T -)
    echo "tuning-cache: $(tar -tzf "$OUT/autotune.tgz" | wc -l) autotuning results saved to \$OUT/autotune.tgz"
}

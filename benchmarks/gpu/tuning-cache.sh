# Autotuning results and compiled kernels kept from one device call to the next (sourced by a device command).
#
# fla's backward kernels autotune for ~300 s per op on a fresh machine (benchmarks/NOTES.md, session 10), and
# every call gets a fresh machine. Triton can keep each autotuner's timings on disk (TRITON_CACHE_AUTOTUNING=1,
# keyed by Triton's version, the target, the kernel's source and the tuning key): a later call then compiles the
# chosen configuration only. Those files travel back in a tarball under $OUT, and come again through `carry`.
#
# Compiled kernels travel the same way (kernels.tgz: the binaries and their metadata, without the intermediate
# forms), so that the GPU tests of a later call do not spend minutes compiling the same kernels again. Triton's
# cache groups name their files by absolute path: the cache directory is the same on every machine.
#
#   here, after a call:  rm -f .tuning-cache/kernels.tgz*; cp <files_at>/*.tgz* .tuning-cache/
#                        (.tuning-cache/ is git-ignored; the kernels come as parts when the tarball passes 15 MB)
#   device command:      source benchmarks/gpu/tuning-cache.sh; ...; tuning_cache_save
#   with carry:          [".tuning-cache", ...]
export TRITON_CACHE_DIR="$HOME/.triton-tuned"
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
for tarball in .tuning-cache/autotune.tgz .tuning-cache/kernels.tgz; do
    [ -f "$tarball" ] && tar -xzf "$tarball" -C "$TRITON_CACHE_DIR"
done
if compgen -G ".tuning-cache/kernels.tgz.part*" > /dev/null; then
    cat .tuning-cache/kernels.tgz.part* | tar -xz -C "$TRITON_CACHE_DIR"
fi
# the untuned GPU tests' first-fit scores (0 for the fit, infinite after it), which tarballs made before
# tuning._kernel kept them off the disk carry under the tuned keys: never timings
grep -rlZ --include='*.autotune.json' '\[0.0, 0.0, 0.0\]' "$TRITON_CACHE_DIR" | xargs -0 -r rm -f
echo "tuning-cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotuning results," \
    "$(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l) compiled kernels loaded"

tuning_cache_save() {
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/autotune.tgz" --null -T -)
    echo "tuning-cache: $(tar -tzf "$OUT/autotune.tgz" | wc -l) autotuning results saved to \$OUT/autotune.tgz"
    # subquad's own kernels only: flex's (inductor writes here too) and fla's pushed the tarball past 15 MB; and
    # the newest KERNELS_KEPT of them (by compile time, which extraction keeps): each kernel change compiles
    # every variant anew, and the older ones had pushed the parts past what a call brings back
    local names
    names=$(grep -rh -A1 '@triton.jit' subquad | grep -oP '^def \K\w+' | paste -sd'|')
    (cd "$TRITON_CACHE_DIR" && find . -name '*.cubin' -printf '%T@ %p\n' | grep -E "/($names)\.cubin$" | sort -rn |
        head -n "${KERNELS_KEPT:-800}" | while read -r _ cubin; do
            find "$(dirname "$cubin")" -maxdepth 1 \( -name '*.cubin' -o -name '*.json' \) -print0
        done | tar -czf "$OUT/kernels.tgz" --null -T -)
    # a call brings back 16 MiB a file (8 files, 64 MiB in all): a larger tarball travels in parts
    echo "tuning-cache: $(tar -tzf "$OUT/kernels.tgz" | grep -c cubin) compiled kernels saved to \$OUT/kernels.tgz"
    if [ "$(stat -c %s "$OUT/kernels.tgz")" -gt 15000000 ]; then
        split -b 15000000 -d "$OUT/kernels.tgz" "$OUT/kernels.tgz.part" && rm "$OUT/kernels.tgz"
        echo "tuning-cache: in $(ls "$OUT"/kernels.tgz.part* | wc -l) parts"
    fi
}

#!/usr/bin/env bash
# What a machine's first book process compiles that `ttsbatch warmup` did not (CUDA GPU):
# a cold warm-up, a listing of the compiler caches, the book (scripts/gpu_book_ab.sh, no
# warm-up of its own), then every cache file the book added, with its size. The first T3
# capture of a machine's first book process ran 1.5-2.0 s against 0.03 s in later processes
# (BENCHMARKS.md, twenty-fifth and twenty-sixth sessions); the files it leaves name the cause.
# Needs scripts/gpu_prelude.sh sourced and TTSBATCH_CACHE_DIR set. Writes $OUT/first_book_new.txt.
set -uo pipefail
: "${OUT:?set OUT}" "${TTSBATCH_CACHE_DIR:?set TTSBATCH_CACHE_DIR}"
ckpt=${TTSBATCH_FULL_CKPT:-/tmp/ttsbatch-full}
python3 -m ttsbatch warmup --model-dir "$ckpt" --device cuda > "$OUT/first_warmup.log" 2>&1 || { tail -5 "$OUT/first_warmup.log"; exit 1; }
tail -2 "$OUT/first_warmup.log"
touch /tmp/first_book.mark
sleep 1
WARMUP=0 SENTENCES=1 bash scripts/gpu_book_ab.sh "first:" "${@}"
find "$TTSBATCH_CACHE_DIR" -type f -newer /tmp/first_book.mark -printf '%s\t%P\n' | sort -k2 > "$OUT/first_book_new.txt"
echo "files the book runs added to $TTSBATCH_CACHE_DIR: $(wc -l < "$OUT/first_book_new.txt")"
grep -v "/work/\|voices/" "$OUT/first_book_new.txt" | head -40
# the driver's PTX JIT cache (a kernel without code for this GPU compiles once per machine)
echo "driver JIT cache files added: $(find "$HOME/.nv" /tmp -maxdepth 4 -path '*ComputeCache*' -type f -newer /tmp/first_book.mark 2>/dev/null | wc -l)"

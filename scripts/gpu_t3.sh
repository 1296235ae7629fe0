#!/usr/bin/env bash
# Fast T3 on a CUDA GPU: the gpu-marked tests, then the T3 benchmark, then a short summary.
#
#   scripts/gpu_t3.sh [all|tests|bench] [BOOK]
#
# Env: PY (python, default .venv/bin/python), TTSBATCH_FULL_CKPT (full random checkpoint dir,
# written there once if missing; default /tmp/ttsbatch-full), OUT (logs; default $OUT or
# /tmp/ttsbatch-gpu), BENCH_ARGS (extra args for python -m ttsbatch.bench, e.g. "--max-vram 40").
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
BOOK=${2:-samples/story.txt}
PY=${PY:-.venv/bin/python}
CKPT=${TTSBATCH_FULL_CKPT:-/tmp/ttsbatch-full}
OUT=${OUT:-/tmp/ttsbatch-gpu}
mkdir -p "$OUT"
export TTSBATCH_FULL_CKPT="$CKPT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_t3.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true

if [ ! -f "$CKPT/t3_cfg.safetensors" ]; then
  echo "writing a full random checkpoint to $CKPT ..."
  "$PY" -c "from ttsbatch.engine.model import write_random_checkpoint as w; w('$CKPT', 'full', seed=0)" || { echo "checkpoint write failed" >&2; exit 3; }
fi

tests_rc=skipped
bench_rc=skipped
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  "$PY" -m pytest -q -s -m gpu tests/gpu/test_t3_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  # shellcheck disable=SC2086
  "$PY" -m ttsbatch.bench --model-dir "$CKPT" --device cuda --book "$BOOK" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo
echo "================ gpu_t3 summary ================"
[ -f "$OUT/gpu_tests.log" ] && { grep -E "^\[gpu\]|passed|failed|error" "$OUT/gpu_tests.log" | tail -n 20; }
[ -f "$OUT/bench.log" ] && { sed -n '/^T3 bench on/,$p' "$OUT/bench.log"; }
echo "tests rc=$tests_rc  bench rc=$bench_rc  (logs in $OUT)"

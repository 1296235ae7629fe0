#!/usr/bin/env bash
# The whole book under several engine settings, in one device call (CUDA GPU):
#
#   bash scripts/gpu_book_ab.sh "fa2:" "graphs:--engine-opt s3gen_graphs=true" "gil:--switch-interval-ms 0.5" "fa2:"
#
# Each argument is LABEL:BENCH-OPTIONS (`ttsbatch bench` options, e.g. --engine-opt KEY=VALUE,
# --switch-interval-ms). `ttsbatch warmup` runs first in a process of its own, so every
# measured run loads its compiled code from the cache: on a fresh machine the first process
# after a cold compile ran the book ~4.5 s slower than the next (57.9-58.2 s against 53.4,
# H100, eleventh session), whatever the settings; list the baseline twice (first and last)
# to see the drift. SENTENCES (default 16, the issue's stock sample) sets the stock chunks
# per run: 1 for engine A/B runs, whose ratio to stock is not the point (16 cost ~45 s a run).
# A run takes ~125 s on an H100/H200 (model load, warm-up from the cache, the book): four do
# not fit in one 600-s call with the warm-up process; two or three do.
# Writes $OUT/ab_LABEL_N.json and prints one line per run.
# Needs scripts/gpu_prelude.sh sourced (wheels, ffmpeg, /tmp/ttsbatch-full).
set -uo pipefail
: "${OUT:?set OUT}"
ckpt=${TTSBATCH_FULL_CKPT:-/tmp/ttsbatch-full}
book=${BOOK:-bench/book.txt}
device=${DEVICE:-cuda}  # cpu: a smoke test of this script (with e.g. "base:--max-chars 200")
# WARMUP=0 skips the warm-up process when an earlier call on this machine filled the cache
# (it costs ~60 s even then: a model load and a render per bucket)
if [ "$device" != cpu ] && [ "${WARMUP:-1}" != 0 ]; then  # warmup compiles for CUDA only
  python3 -m ttsbatch warmup --model-dir "$ckpt" --device "$device" > "$OUT/ab_warmup.log" 2>&1 || { tail -5 "$OUT/ab_warmup.log"; exit 1; }
  tail -2 "$OUT/ab_warmup.log"
fi
n=0
for spec in "$@"; do
  n=$((n + 1))
  label=${spec%%:*}
  opts=${spec#*:}
  json="$OUT/ab_${label}_$n.json"
  # shellcheck disable=SC2086  # opts is a list of words
  python3 -m ttsbatch bench --model-dir "$ckpt" --device "$device" --book "$book" --parts book --sentences "${SENTENCES:-16}" $opts \
    --json "$json" > "$OUT/ab_${label}_$n.log" 2>&1 || { echo "$label: failed"; tail -5 "$OUT/ab_${label}_$n.log"; continue; }
  python3 - "$json" "$label" "$opts" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))["book"]["fast"]
h = dict(f.get("host_timeline") or {})
spans, captures = h.pop("spans", []), h.pop("t3_captures", [])
print(f"{sys.argv[2]:>10} [{sys.argv[3]}]: wall {f['wall_s']} s, {f['x_realtime']}x, synth {f['synth_s']} s, "
      f"after {f['after_synth_s']} s {f['tail_s']} ({f.get('tail_chunks')} chunks left to append), busy {f['gpu_busy']} ({f['gpu_busy_source']}), attention {f['s3gen_attention']}, "
      f"reserved {f['peak_gpu_reserved_gib']} GiB, CFM graphs captured {f['s3gen_graph_captures']} {f.get('s3gen_graph_error') or ''} "
      f"({f['s3gen_capture_s']} s), GC {f['gc']['seconds']} s (longest {f['gc']['longest_ms']} ms, "
      f"{f['gc']['objects']} objects), dynamo {f['dynamo']}, ffn {f.get('s3gen_ffn')} {f.get('s3gen_ffn_tuning')}, "
      f"FA4 calls {f.get('s3gen_fa4_calls')}, pack {f.get('s3gen_pack')}, CFM frames {f.get('s3gen_cfm_frames')}, "
      f"S3Gen thread {h}, mark group {f.get('mark_group')}, track process {f.get('track_process')}, store workers at end {f.get('store_workers_at_end')}, T3 graphs captured {f['t3'].get('graphs_captured')} "
      f"({f['t3'].get('capture_s')} s), T3 rows {f.get('t3_rows')}, T3 host: prefills {f['t3'].get('prefill_s')} s, "
      f"steps {f['t3'].get('step_launch_s')} s, looks waiting {f['t3'].get('look_wait_s')} s ({f['t3'].get('host_checks')} looks)")
# S3Gen's thread span by span, and T3's captures during the book (seconds from the book's start)
print("    spans: " + " | ".join(f"{w} {a:.2f}-{b:.2f} ({n})" for w, a, b, n in spans))
print("    T3 captures: " + " | ".join(f"{a:.2f}-{b:.2f} {w}" for a, b, w in captures))
tr = f.get("gpu_trace")  # --gpu-trace: busy from every kernel the GPU ran, and where its time went
if tr:
    print(f"    trace: busy {tr['busy']} over {tr.get('window_s')} s ({tr.get('window')}, clock skew {tr.get('clock_skew_s')} s), {tr['activities']} activities")
    for s, v in list((tr.get("streams") or {}).items())[:4]:
        print(f"    stream {s}: {v['seconds']} s of activity, busy {v.get('busy')}, longest {v['longest']}")
    for name, sec, n in tr.get("kernels") or []:
        print(f"    {sec:8.3f} s {n:7d}x {name}")
EOF
done

#!/usr/bin/env python
"""Where T3's time goes besides the decode steps (CUDA GPU): the per-sentence costs.

    python scripts/gpu_batch1.py [--ckpt DIR] [--sentences 4] [--tokens-per-char 1.0]
    python scripts/gpu_batch1.py --sentences 2048 --rows 256,384 [--refill-min 8] [--check-every 8]

The bench's batch-1 case (``ttsbatch bench``: the book's first sentences, one at a time, a
token budget per character), or with ``--rows`` its full batch (``--fast-sentences``: rows
refilled as they finish; ``row_use`` is the share of row-steps that decoded a live row) run three times: to compile and capture, timed, and with every
phase synchronized before and after and timed on the host: the sentence's prompt embedding
(``row_input``), the prefill (``FastT3.prefill``; its ``_start_rows`` also apart), each decode step (``step``); the rest of the wall
time is the host's loop (the done checks, harvesting). Writes $OUT/batch1.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--sentences", type=int, default=4)
    ap.add_argument("--tokens-per-char", type=float, default=1.0)
    ap.add_argument("--book", default=str(ROOT / "bench" / "book.txt"))
    ap.add_argument("--eager-prefill", action="store_true", help="every prefill eager (no one-row prefill graphs)")
    ap.add_argument("--rows", default="1", help="comma-separated batch sizes (sentences decoded at once), each timed")
    ap.add_argument("--refill-min", default="", help="comma-separated values of FastT3.generate's refill_min, each timed (default: rows/16)")
    ap.add_argument("--check-every", type=int, default=8)
    ap.add_argument("--no-template", action="store_true", help="no voice template (every sequence reads its whole prompt from its own cache)")
    ap.add_argument("--prefill-profile", type=int, default=0, metavar="N",
                    help="instead: time one refill of N rows (host launch vs synced) and profile it")
    args = ap.parse_args()
    import torch

    from ttsbatch.bench import book_requests
    from ttsbatch.config import GenerationOptions
    from ttsbatch.engine import t3_fast
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    if not torch.cuda.is_available():
        print("gpu_batch1.py: no CUDA GPU", file=sys.stderr)
        return 2
    model = load_model(Path(args.ckpt), "cuda")
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    gen = GenerationOptions(tokens_per_char=args.tokens_per_char, ignore_eos=True)
    reqs = book_requests(Path(args.book), args.sentences, gen)  # the bench's batch-1 sentences
    tokens = sum(r.budget for r in reqs)
    fast = t3_fast.FastT3(model)
    if args.no_template:
        fast._ensure_template = lambda *a: None
    if args.eager_prefill:
        fast.prefill = lambda st, rows, inputs: t3_fast.prefill(fast.w, st, rows, inputs)
    if args.prefill_profile:
        return profile_prefill(fast, conds, reqs[: args.prefill_profile], gen)
    for rows, refill in [(r, m) for r in args.rows.split(",") for m in (args.refill_min.split(",") if args.refill_min else [""])]:
        rows, refill = int(rows), int(refill) if refill else None
        try:
            res = measure(args, fast, conds, reqs, gen, tokens, rows, refill)
        except torch.OutOfMemoryError as e:
            res = dict(rows=rows, error=f"out of memory: {str(e).splitlines()[0]}")
            fast.state = None
            torch.cuda.empty_cache()
        print(json.dumps(res, indent=1), flush=True)
        if os.environ.get("OUT"):
            name = f"batch{rows}" + ("_eager_prefill" if args.eager_prefill else "") + ("_no_template" if args.no_template else "") + (f"_refill{refill}" if refill else "")
            Path(os.environ["OUT"], name + ".json").write_text(json.dumps(res, indent=1))
    return 0


def measure(args, fast, conds, reqs, gen, tokens, rows, refill_min=None) -> dict:
    import torch

    from ttsbatch.engine import t3_fast

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(fast.generate(conds, reqs, gen, max_rows=rows, check_every=args.check_every, refill_min=refill_min))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()
    before = dict(fast.stats)
    torch.cuda.reset_peak_memory_stats()
    wall = run()
    delta = {k: fast.stats[k] - before[k] for k in ("steps", "row_steps", "prefills", "host_checks")}
    steps = delta["steps"]
    peak = torch.cuda.max_memory_allocated() / (1 << 30)

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*a, **k)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t
            calls[name] += 1
            return r
        return wrapper

    orig_start, orig_prefill = t3_fast._start_rows, fast.prefill
    t3_fast._start_rows = timed("start_rows (inside prefill)", orig_start)
    fast.prefill = timed("prefill", fast.prefill)
    fast.row_input = timed("row_input", fast.row_input)
    fast.step = timed("step", fast.step)
    try:
        synced = run()
    finally:
        t3_fast._start_rows = orig_start
        del fast.row_input, fast.step
        fast.prefill = orig_prefill
    phases = {k: dict(ms=round(v * 1e3, 2), calls=calls[k], ms_per_call=round(v * 1e3 / calls[k], 3)) for k, v in spent.items()}
    rest = synced - sum(v for k, v in spent.items() if "inside" not in k)
    return dict(device=torch.cuda.get_device_name(), rows=rows, rows_used=fast.rows_used, eager_prefill=args.eager_prefill,
                template=not args.no_template,
                refill_min=refill_min, check_every=args.check_every, sentences=len(reqs), tokens=tokens, steps=steps,
                row_use=round(delta["row_steps"] / max(1, steps * fast.rows_used), 4), prefills=delta["prefills"],
                host_checks=delta["host_checks"], peak_gib=round(peak, 2),
                wall_ms=round(wall * 1e3, 2), tokens_per_s=round(tokens / wall, 1), wall_ms_per_step=round(wall * 1e3 / steps, 3),
                synced_ms=round(synced * 1e3, 2), phases=phases, rest_ms=round(rest * 1e3, 2))


def profile_prefill(fast, conds, reqs, gen) -> int:
    """One refill of len(reqs) rows into a 256-row state: the host's time to launch it and
    the time to finish it; then the profiler's top kernels and host ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ttsbatch.engine import t3_fast

    need = max(fast.cond_emb(conds).shape[0] + len(t3_fast.text_token_ids(fast.model, r.text)) + 2 + r.budget for r in reqs)
    st = fast.new_state(256, need, max(r.budget for r in reqs), 2)
    rows = list(range(0, 2 * len(reqs), 2))
    with torch.inference_mode():
        inputs = [fast.row_input(conds, r, gen, 2) for r in reqs]
        for _ in range(3):
            fast.prefill(st, rows, inputs)
        torch.cuda.synchronize()
        launch, total = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            fast.prefill(st, rows, inputs)
            launch.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            total.append(time.perf_counter() - t0)
        res = dict(rows=len(reqs), launch_ms=round(1e3 * min(launch), 2), total_ms=round(1e3 * min(total), 2))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fast.prefill(st, rows, inputs)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    print(json.dumps(res))
    return 0

if __name__ == "__main__":
    sys.exit(main())

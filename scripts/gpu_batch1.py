#!/usr/bin/env python
"""Where batch 1's time goes besides the decode steps (CUDA GPU): the per-sentence costs.

    python scripts/gpu_batch1.py [--ckpt DIR] [--sentences 4] [--tokens-per-char 1.0]

The bench's batch-1 case (``ttsbatch bench``: the book's first sentences, one at a time, a
token budget per character) run three times: to compile and capture, timed, and with every
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
    if args.eager_prefill:
        fast.prefill = lambda st, rows, inputs: t3_fast.prefill(fast.w, st, rows, inputs)

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(fast.generate(conds, reqs, gen, max_rows=1))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()
    steps0 = fast.stats["steps"]
    wall = run()
    steps = fast.stats["steps"] - steps0

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
    res = dict(device=torch.cuda.get_device_name(), eager_prefill=args.eager_prefill, sentences=len(reqs), tokens=tokens, steps=steps,
               wall_ms=round(wall * 1e3, 2), tokens_per_s=round(tokens / wall, 1), wall_ms_per_step=round(wall * 1e3 / steps, 3),
               synced_ms=round(synced * 1e3, 2), phases=phases, rest_ms=round(rest * 1e3, 2))
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "batch1" + ("_eager_prefill" if args.eager_prefill else "") + ".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where a book's synthesis time goes: T3 and S3Gen apart, then overlapped (CUDA GPU).

    python scripts/gpu_book_stages.py [--ckpt DIR] [--book bench/book.txt] [--modes serial,overlap]

The book is chunked as ``ttsbatch BOOK`` does (default options, 1.0 speech token per
character, ``ignore_eos``) and its requests go through ``FastEngine.synthesize_stream``
only: no Perth, store, stitching or MP3 (``ttsbatch bench --parts book`` times those too).

- ``serial``: T3 and S3Gen one after the other (``overlap=False``); every S3Gen call is
  timed between two device syncs, so T3's share is the rest of the wall time. T3's counters,
  its batch occupancy (row-steps per step over rows), and S3Gen's batches by bucket.
- ``overlap``: the engine as the pipeline runs it (T3 on its own thread and stream, S3Gen's
  work on a stream of high priority and T3's on one of low priority, the engine's default
  since the eleventh session); the wall time, and how long the S3Gen side waited for T3's
  next collection.
- ``overlap-same-priority``: as ``overlap`` with both streams at the default priority (the
  engine before the eleventh session; that session's ``overlap`` row).
- ``overlap-priority``: the same as ``overlap`` (the name of the eleventh session's row).

The engine is warmed up first (``warm_engine``, as ``ttsbatch warmup``). Prints a JSON line
per mode; writes $OUT/book_stages.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--book", default=str(ROOT / "bench" / "book.txt"))
    ap.add_argument("--modes", default="serial,overlap")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script)")
    ap.add_argument("--attention", default="fa2", help="the CFM estimator's attention: fa2, or fa4 (FlashAttention 4, when installed)")
    ap.add_argument("--compile-encoder", action="store_true", help="S3Gen's flow encoder compiled (compile_encoder)")
    ap.add_argument("--max-chunks", type=int, default=0, help="only the first N chunks (0: all)")
    args = ap.parse_args()

    import torch

    from ttsbatch.config import load_options
    from ttsbatch.engine.fast import FastEngine
    from ttsbatch.engine.model import load_model, write_random_checkpoint
    from ttsbatch.engine.stock import SynthesisRequest
    from ttsbatch.engine.voice import BUILTIN, VoiceCache
    from ttsbatch.plan import seed_for
    from ttsbatch.text import chunk_document, read_document
    from ttsbatch.warmup import WarmupReport, warm_engine

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda and not torch.cuda.is_available():
        print("gpu_book_stages.py: no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 2
    if not (Path(args.ckpt) / "s3gen.safetensors").exists():
        write_random_checkpoint(args.ckpt, "full", seed=0)
    options = load_options(None, {"generation": {"tokens_per_char": 1.0, "ignore_eos": True}})
    gen = options.generation
    chunks = chunk_document(read_document(Path(args.book)), options.text)
    if args.max_chunks:
        chunks = chunks[: args.max_chunks]
    reqs = [SynthesisRequest(c.text, seed_for(f"{i:08x}"), gen.token_budget(len(c.text))) for i, c in enumerate(chunks)]
    model = load_model(args.ckpt, args.device)
    conds = VoiceCache(model).get(BUILTIN, gen.exaggeration)
    engine = FastEngine(model, s3gen_attention=args.attention, compile_encoder=args.compile_encoder)
    t0 = time.perf_counter()
    warm_engine(engine, conds, WarmupReport(args.device, engine.name, ""))
    result: dict = dict(chunks=len(reqs), tokens=sum(r.budget for r in reqs), gpu=torch.cuda.get_device_name() if cuda else "cpu",
                        attention=engine.s3.attention, encoder_compiled=engine.s3.encoder.compiled,
                        warmup_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(result), flush=True)

    s3_synth = engine.s3.synthesize
    sr = model.sample_rate
    # the engine's own streams (T3 low, S3Gen high priority), kept: a new S3Gen stream would
    # start a second pool of S3Gen's memory in the caching allocator
    own = (engine._t3_stream, engine._s3_stream)
    same = (torch.cuda.Stream(), torch.cuda.Stream()) if cuda else (None, None)
    for mode in args.modes.split(","):
        engine.overlap = mode.startswith("overlap")
        streams = own if mode in ("overlap", "overlap-priority") else same
        engine._t3_stream, engine._s3_stream = streams if engine.overlap and cuda else (None, None)
        for k in engine.t3.stats:
            engine.t3.stats[k] = 0
        s3_calls: list[dict] = []
        waits = [0.0]

        def timed(token_lists, *a, **kw):
            if not engine.overlap:
                sync()
            t = time.perf_counter()
            out = s3_synth(token_lists, *a, **kw)
            if not engine.overlap:
                sync()
            s3_calls.append(dict(items=len(token_lists), s=time.perf_counter() - t,
                                 audio_s=sum(len(w) for w in out) / sr, tokens=sum(len(x) for x in token_lists)))
            return out

        engine.s3.synthesize = timed
        batches0 = engine.s3.times.batches
        sync()
        t0 = time.perf_counter()
        audio = 0.0
        stream = engine.synthesize_stream(reqs, conds, gen)
        while True:
            tw = time.perf_counter()
            try:
                _, res = next(stream)  # S3Gen's work: on the engine's _s3_stream
            except StopIteration:
                break
            waits[0] += time.perf_counter() - tw
            audio += len(res.wav) / sr
        sync()
        wall = time.perf_counter() - t0
        engine.s3.synthesize = s3_synth
        s3_s = sum(c["s"] for c in s3_calls)
        st = dict(engine.t3.stats)
        rows = engine.t3.rows_used
        r = dict(
            mode=mode, wall_s=round(wall, 2), audio_s=round(audio, 1), x_realtime=round(audio / wall, 1),
            s3gen_s=round(s3_s, 2), s3gen_calls=len(s3_calls), s3gen_batches=engine.s3.times.batches - batches0,
            s3gen_x_realtime=round(audio / s3_s, 1) if not engine.overlap else None,
            t3_s=round(wall - s3_s, 2) if not engine.overlap else None,
            t3_tokens_per_s=round(result["tokens"] / (wall - s3_s)) if not engine.overlap else None,
            t3=st, t3_rows=rows, t3_occupancy=round(st["row_steps"] / max(1, st["steps"]) / max(1, rows), 3),
            # the consumer's time in next() less S3Gen's own: waiting for T3 (and the host work between)
            s3gen_waited_s=round(waits[0] - s3_s, 2),
            s3gen_items=[c["items"] for c in s3_calls],
        )
        result[mode] = r
        print(json.dumps(r), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "book_stages.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

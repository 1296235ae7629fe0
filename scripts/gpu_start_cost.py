"""A process's start on the GPU, as a book's process meets it: model load, then the engine's
warm-up (one short chunk, then one per S3Gen bucket: what `ttsbatch warmup` runs), with
fast-engine options, and how much of it dynamo spent tracing (Inductor's cache keeps compiled
graphs, not dynamo's trace, so every process traces its regions again):

    python scripts/gpu_start_cost.py --model-dir /tmp/ttsbatch-full --cache-dir /tmp/ttc \
        --engine-opt compile_encoder=true --json $OUT/start_enc.json

Run it once to fill the cache, then again: the second process is what a book after
`ttsbatch warmup` pays.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--cache-dir", required=True, help="ttsbatch's cache dir (its compile/ holds Inductor's and Triton's caches)")
    ap.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()

    from ttsbatch.engine.select import use_compile_cache

    use_compile_cache(args.cache_dir)
    import torch
    from torch._dynamo.utils import compilation_time_metrics

    from ttsbatch.bench_book import parse_engine_options
    from ttsbatch.engine.fast import FastEngine
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.voice import BUILTIN, VoiceCache
    from ttsbatch.warmup import WarmupReport, warm_engine

    opts = parse_engine_options(args.engine_opt)
    t0 = time.perf_counter()
    model = load_model(args.model_dir, args.device)
    load_s = time.perf_counter() - t0
    engine = FastEngine(model, **opts)
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    rep = warm_engine(engine, conds, WarmupReport(args.device, "fast", "random"))
    if args.device == "cuda":
        torch.cuda.synchronize()
    out = dict(
        engine_options=opts, imports_s=round(t0 - t_start, 2), model_load_s=round(load_s, 2),
        first_chunk_s=round(rep.first_chunk_s, 2), buckets_s=round(rep.buckets_s, 2), compiled=rep.compiled,
        dynamo_tracing_s=round(sum(compilation_time_metrics.get("bytecode_tracing", [])), 2),
        dynamo_compile_s=round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 2),
        process_to_warm_s=round(time.perf_counter() - t_start, 2),
    )
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""`ttsbatch warmup`: get everything a run needs ready before the first book.

What a later process can reuse is made and kept on disk: the model weights (hub cache), the
voice's conditioning (the voice cache), and PyTorch's compiler caches (Inductor/Triton,
pointed into ttsbatch's cache dir by ``engine.select.use_compile_cache``). What cannot
outlive a process (CUDA graphs, allocator pools) is exercised once so that failures show up
here, not an hour into a book: Perth loads, the engine renders one short chunk, and on a GPU
the fast engine one more per S3Gen length bucket (T3 at several row counts, S3Gen at the
longest bucket: its compiled regions take every shape after that); the timings are reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ttsbatch")


@dataclass
class WarmupReport:
    device: str
    engine: str
    model: str
    load_s: float = 0.0  # model load (download included when it happened)
    voice_s: float = 0.0  # voice conditioning (computed or read from the cache)
    first_chunk_s: float = 0.0  # the first short chunk, start to audio (compiling included)
    buckets_s: float = 0.0  # one chunk per S3Gen length bucket
    chunks: int = 0
    compiled: dict | None = None  # compiler cache use (dynamo/inductor counters), when compiling


def warm_engine(engine, conds, rep: WarmupReport) -> WarmupReport:
    """Run every engine path once: one short chunk, then (fast engine on a GPU) one chunk per
    S3Gen length bucket. Fills ``rep``'s timings; the compiled code lands in the caches."""
    import torch._dynamo.utils as dynamo_utils

    from .config import GenerationOptions
    from .engine.stock import SynthesisRequest

    dynamo_utils.counters.clear()
    # Short budgets: the point is to run every code path once, not to speak.
    gen = GenerationOptions(ignore_eos=True, max_new_tokens=12)
    t0 = time.perf_counter()
    engine.synthesize([SynthesisRequest("Warm up.", 1, 12)], conds, gen)
    rep.first_chunk_s = time.perf_counter() - t0
    rep.chunks = 1
    s3 = getattr(engine, "s3", None)
    if s3 is not None and s3.is_cuda:  # fast engine on a GPU: one chunk per S3Gen length bucket (graphs, kernels)
        from .engine.s3gen_batched import DEFAULT_BUCKETS

        # fine buckets (FastEngine's s3gen_bucket_frames): one chunk near each default bucket,
        # not one per bucket (the compiled regions take every length after the first)
        buckets = s3.buckets
        if len(buckets) > len(DEFAULT_BUCKETS):
            buckets = sorted({s3.bucket_for(b // 2) for b in DEFAULT_BUCKETS})
        budgets = [max(1, b // 2) for b in buckets]
        gen = GenerationOptions(ignore_eos=True, max_new_tokens=max(budgets))
        reqs = [SynthesisRequest("Warm up, bucket %d." % i, 2 + i, n) for i, n in enumerate(budgets)]
        t0 = time.perf_counter()
        engine.synthesize(reqs, conds, gen)
        rep.buckets_s = time.perf_counter() - t0
        rep.chunks += len(reqs)
    regions = engine.regions() if hasattr(engine, "regions") else {}
    if any(r.compiled for r in regions.values()):
        c = dynamo_utils.counters
        rep.compiled = dict(
            graphs=c["stats"].get("unique_graphs", 0), graph_breaks=sum(c["graph_break"].values()),
            cache_hits=c["inductor"].get("fxgraph_cache_hit", 0), cache_misses=c["inductor"].get("fxgraph_cache_miss", 0),
        )
    return rep


def warmup(model_dir, device: str, voice, engine_name: str, max_vram_gb, cache_root: Path) -> WarmupReport:
    from .config import GenerationOptions
    from .engine.model import describe
    from .engine.select import load_for_run
    from .engine.voice import VoiceCache

    t0 = time.perf_counter()
    run = load_for_run(model_dir, device, engine_name, None, max_vram_gb, cache_root)
    model, engine = run.model, run.engine
    rep = WarmupReport(model.device, engine.name, describe(model), load_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    conds = VoiceCache(model, cache_root).get(voice, GenerationOptions().exaggeration)
    rep.voice_s = time.perf_counter() - t0
    return warm_engine(engine, conds, rep)

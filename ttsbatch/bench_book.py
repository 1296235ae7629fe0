"""End-to-end benchmark: a whole book, text file to watermarked MP3, fast engine vs stock.

In one process: the book is chunked as ``ttsbatch BOOK`` does (default options), the first
``stock_sentences`` chunks are rendered by stock Chatterbox (T3 + S3Gen, one at a time) to
get stock's audio-seconds per second, then the whole book goes through the real pipeline
(``render_book``: fast engine, Perth, store, stitch, MP3, verify) into a fresh work dir.
Both sides get the same per-character token budget with ``ignore_eos`` (random weights never
stop by themselves), so both make the same amount of audio per character.

Reported: on a GPU, the warm-up first (``warm_engine``, what ``ttsbatch warmup`` runs:
compiling the CFM estimator's regions or loading them from the compile cache, timed); then
audio length, wall time and real-time factor of the whole run (model load and warm-up
excluded, T3's graph capture included), time to the first stored chunk, the stages (synthesis,
with the track stitched and encoded beside it; what is left after it: the end of the
encode, chapters, verify), S3Gen's stage times, T3's counters, peak GPU memory, peak host
RSS, GPU busy fraction (NVML utilization sampled every 100 ms), and dynamo's counters.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("ttsbatch")


class GpuBusy:
    """Samples the GPU's utilization (share of time a kernel ran) in a background thread.

    Through NVML (``pynvml``), a library call per sample; else through ``nvidia-smi``, a
    process per sample. ``source`` says which."""

    def __init__(self, period: float = 0.1):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._period = period
        self.source, self._read = self._reader()
        self._thread = threading.Thread(target=self._loop, name="ttsbatch-gpu-busy", daemon=True) if self._read else None

    @staticmethod
    def _reader():
        """``(source name, read())``, read() giving the utilization in percent; (None, None)."""
        read = _nvml_pynvml()
        if read is not None:
            return "pynvml", read
        if shutil.which("nvidia-smi"):
            def smi():
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                return int(out.strip().splitlines()[0])
            return "nvidia-smi", smi
        return None, None

    def _loop(self):
        while not self._stop.wait(self._period):
            try:
                self.samples.append((time.perf_counter(), self._read()))
            except Exception:
                return

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def busy(self, start: float, end: float) -> float | None:
        vals = [u for t, u in self.samples if start <= t <= end]
        return round(sum(vals) / len(vals) / 100, 3) if vals else None


class GcTimer:
    """Time the interpreter spends in garbage collection (``gc.callbacks``), per generation.

    A collection holds the GIL: every thread of the pipeline, S3Gen's launches included,
    waits for it. (In a 2-hour book on an H100 the collections took 0.01-0.04 s in all,
    longest pause 2-4 ms: BENCHMARKS.md, twelfth session.)"""

    def __init__(self):
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._t = 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
            return
        dt = time.perf_counter() - self._t
        g = info.get("generation", 2)
        self.count[g] += 1
        self.seconds[g] += dt
        self.longest = max(self.longest, dt)

    def __enter__(self):
        import gc

        self.objects = len(gc.get_objects())  # tracked objects when the run starts
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._callback)

    def report(self) -> dict:
        return dict(seconds=round(sum(self.seconds), 3), longest_ms=round(self.longest * 1000, 1),
                    collections=self.count, seconds_by_generation=[round(s, 3) for s in self.seconds],
                    objects=self.objects)


def _nvml_pynvml():
    """NVML's utilization read of GPU 0 through ``pynvml``, or None where it is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None
    return lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def parse_engine_options(items: list[str]) -> dict:
    """``--engine-opt KEY=VALUE`` items as keyword arguments of ``FastEngine`` (true/false,
    numbers and words), for trying an engine option against the default in one device call.
    A key the engine does not take is an ``InputError`` naming the ones it does."""
    import inspect

    from .engine.fast import FastEngine
    from .errors import InputError

    known = [k for k in inspect.signature(FastEngine).parameters if k not in ("self", "model")]
    opts: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise InputError(f"--engine-opt {item}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        opts[key] = _option_value(raw.strip())
    return opts


def _option_value(raw: str):
    """true/false, none (or nothing), an int, a float, else the word itself."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", ""):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def book_chunks(book: Path, options, max_chars: int | None = None):
    """``(document, chunks)`` of ``book`` as ``ttsbatch BOOK`` chunks it; ``max_chars``: a
    shorter book, the same text cut after the paragraph that reaches ``max_chars``."""
    from dataclasses import replace

    from .text import chunk_document, read_document

    doc = read_document(book)
    if max_chars:
        kept, n = [], 0
        for ch in doc.chapters:
            paras = []
            for p in ch.paragraphs:
                if n >= max_chars:
                    break
                paras.append(p)
                n += len(p)
            if paras:
                kept.append(replace(ch, paragraphs=tuple(paras)))
        doc = replace(doc, chapters=tuple(kept))
    return doc, chunk_document(doc, options.text)


def run_book_bench(
    model_dir: Path | None,
    book: Path,
    output: Path | None = None,
    device: str = "auto",
    max_vram_gb: float | None = None,
    tokens_per_char: float = 1.0,
    stock_sentences: int = 16,
    max_chars: int | None = None,
    out=None,
    engine_options: dict | None = None,
    gpu_trace: bool = False,
) -> dict:
    import torch

    from .config import load_options
    from .engine.fast import FastEngine, HostTimeline
    from .engine.model import describe, load_model, pick_device
    from .engine.stock import StockEngine, SynthesisRequest
    from .engine.voice import BUILTIN, VoiceCache
    from . import pipeline
    from .store import ChunkStore

    def say(msg: str) -> None:
        print(msg, file=out or sys.stdout, flush=True)  # stdout as it is now, not at import

    from .engine.select import preflight
    from .store import cache_dir

    device = pick_device(device)
    cuda = device.startswith("cuda")
    # as a book run starts: ffmpeg checked (the run ends in an MP3: fail now, not after the
    # stock run), the compile cache `ttsbatch warmup` fills, Perth loaded and warming up
    watermarker = preflight(device, cache_dir())
    options = load_options(None, {"generation": {"tokens_per_char": tokens_per_char, "ignore_eos": True}})
    gen = options.generation
    t_text = time.perf_counter()
    doc, chunks = book_chunks(book, options, max_chars)
    t_text = time.perf_counter() - t_text
    chars = sum(len(c.text) for c in chunks)
    model = load_model(model_dir, device)
    r: dict = dict(
        book=str(book), chars=chars, chunks=len(chunks), chunking_s=round(t_text, 2), tokens_per_char=tokens_per_char,
        model=json.loads(describe(model)), device_name=torch.cuda.get_device_name() if cuda else "cpu",
        max_vram_gb=max_vram_gb, date=time.strftime("%Y-%m-%d"),
    )
    say(f"book bench: {book.name}: {len(chunks)} chunks, {chars} characters, {r['device_name']}")
    conds = VoiceCache(model).get(BUILTIN, gen.exaggeration)

    # -- stock Chatterbox on the first chunks of the book, end to end (T3 + S3Gen) ----------------
    if stock_sentences:
        stock = StockEngine(model)
        step = max(1, len(chunks) // stock_sentences)  # spread over the book, not just its opening
        sample = chunks[::step][:stock_sentences]
        reqs = [SynthesisRequest(c.text, 1000 + i, gen.token_budget(len(c.text))) for i, c in enumerate(sample)]
        stock.synthesize([SynthesisRequest(sample[0].text, 1, 25)], conds, gen)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        audio = sum(len(x.wav) for x in stock.synthesize(reqs, conds, gen)) / model.sample_rate
        dt = time.perf_counter() - t0
        r["stock"] = dict(chunks=len(sample), audio_s=round(audio, 1), seconds=round(dt, 2), x_realtime=round(audio / dt, 2))
        say(f"stock: {r['stock']}")

    # -- the fast engine through the real pipeline, the whole book -----------------------------
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    import torch._dynamo.utils as dynamo_utils

    engine_options = dict(engine_options or {})
    engine = FastEngine(model, **{"max_vram_gb": max_vram_gb, **engine_options})
    if cuda:  # what `ttsbatch warmup` does, in this process: compiles (or loads) every region first
        from .warmup import WarmupReport, warm_engine

        w = warm_engine(engine, conds, WarmupReport(device, engine.name, ""))
        r["warmup"] = dict(first_chunk_s=round(w.first_chunk_s, 2), buckets_s=round(w.buckets_s, 2), compiled=w.compiled)
        say(f"warm-up: {r['warmup']}")
        torch.cuda.reset_peak_memory_stats()
    dynamo_utils.counters.clear()  # from here on, any compile is a recompile the book caused
    work = Path(tempfile.mkdtemp(prefix="ttsbatch-bench-"))
    output = output or work / "book.mp3"
    captures0 = engine.s3.times.graph_captures, engine.s3.times.capture_s  # the warm-up's
    frames0 = engine.s3.times.cfm_frames
    s3_host0 = engine.s3.times.launch_s, engine.s3.times.sync_s, engine.s3.times.launch_cpu_s
    t3_stats0 = dict(engine.t3.stats)
    engine.timeline = HostTimeline()  # the book's own, not the warm-up's
    from .gpu_trace import GpuTrace

    with GpuBusy() as gpu, GcTimer() as gc_time, GpuTrace(gpu_trace and cuda) as trace:
        t0, wall_clock = time.perf_counter(), time.time()
        report = pipeline.render_book(
            doc, chunks, source=book, output=output, work_dir=work / "work", voice=BUILTIN, options=options,
            model=model, engine=engine, watermarker=watermarker, batch_size=4096, progress="none",
        )
        wall = time.perf_counter() - t0
    # The store's index says when each chunk was stored and how long its audio is (before
    # trimming and pauses): the first-chunk latency and the audio the engine made.
    stored = list(ChunkStore(work / "work").meta().values())
    first = min(e["created"] for e in stored) - wall_clock if stored else None
    chunk_audio = sum(e["seconds"] for e in stored)
    synth = report.synth_seconds
    r["fast"] = dict(
        audio_s=round(report.audio_seconds, 1), audio_h=round(report.audio_seconds / 3600, 2), wall_s=round(wall, 2),
        x_realtime=round(report.audio_seconds / wall, 1), chunk_audio_s=round(chunk_audio, 1),
        chunk_x_realtime=round(chunk_audio / wall, 1), synth_s=round(synth, 2),
        synth_x_realtime=round(report.audio_seconds / synth, 1), after_synth_s=round(wall - synth, 2),  # the rest of the stitch and encode, chapters, verify
        tail_s={k: round(v, 2) for k, v in report.tail_seconds.items()}, tail_chunks=report.tail_chunks,
        first_chunk_s=round(first, 2) if first is not None else None, watermark_score=report.watermark_score,
        t3={k: round(v - t3_stats0[k], 2) for k, v in engine.t3.stats.items()}, t3_rows=engine.t3.rows_used, t3_graph_error=engine.t3.graph_error,
        compile_errors={k: r.error for k, r in engine.regions().items() if r.error}, s3gen_items=engine.s3.times.items,
        s3gen_batches=engine.s3.times.batches, s3gen_attention=engine.s3.attention, engine_options=engine_options,
        # frames the CFM estimator ran over per CFG half in the book (padding or packing gaps included)
        s3gen_pack=engine.s3.pack, s3gen_cfm_frames=engine.s3.times.cfm_frames - frames0,
        # the S3Gen thread's wall: waiting for T3's collections, launching S3Gen's work, waiting for
        # its GPU results, and the pipeline's time with the results; when T3's thread was done
        host_timeline=dict(
            t3_wait_s=round(engine.timeline.t3_wait_s, 2),
            s3gen_launch_s=round(engine.s3.times.launch_s - s3_host0[0], 2),
            s3gen_sync_s=round(engine.s3.times.sync_s - s3_host0[1], 2),
            # of the launch seconds, those the S3Gen thread ran on a CPU (the rest: waiting for
            # the GIL or for room in the GPU's queue); T3's thread's CPU seconds
            s3gen_launch_cpu_s=round(engine.s3.times.launch_cpu_s - s3_host0[2], 2),
            t3_cpu_s=round(engine.timeline.t3_cpu_s, 2),
            consumer_s=round(engine.timeline.consumer_s, 2), collections=engine.timeline.collections,
            late_joined=engine.timeline.late_joined,  # the book's last chunks in a collection's last batch
            store_wait_s=round(report.store_wait_seconds, 2),  # of consumer_s: the store workers' queue full
            t3_done_s=None if engine.timeline.t3_done_at is None else round(engine.timeline.t3_done_at - t0, 2),
            # the engine's last result handed over: the synthesis ends when the store has it all
            engine_done_s=None if engine.timeline.done_at is None else round(engine.timeline.done_at - t0, 2),
            # S3Gen's thread in order: (what, start s, end s, chunks), "t3_wait" or "s3gen"; and
            # T3's graph captures during the book: (start s, end s, what)
            spans=[(what, round(a - t0, 3), round(b - t0, 3), n) for what, a, b, n in engine.timeline.spans],
            t3_captures=[(round(a - t0, 3), round(b - t0, 3), what) for a, b, what in engine.t3.capture_log if a >= t0],
        ),
        # CFM steps captured during the book (s3gen_graphs: one per shape; the warm-up's are not counted)
        s3gen_graph_captures=engine.s3.times.graph_captures - captures0[0], s3gen_graph_error=engine.s3.graph_error,
        s3gen_capture_s=round(engine.s3.times.capture_s - captures0[1], 2),
        s3gen_ffn=engine.s3.ffn, s3gen_ffn_tuning=None if engine.s3.ffn == "region" else dict(
            config=engine.s3.fused.ffn.config, ms={str(k): v for k, v in engine.s3.fused.ffn.timings.items()}),
        # FA4 launches through its public function (one per layout) and directly (fa4.FA4Varlen)
        s3gen_fa4_calls=None if engine.s3.fa4 is None else dict(
            public=engine.s3.fa4.public_calls, direct=engine.s3.fa4.direct_calls, recording=engine.s3.fa4.direct),
        switch_interval_ms=round(sys.getswitchinterval() * 1000, 3), mark_group=pipeline.MARK_GROUP, track_process=pipeline.TRACK_PROCESS, store_workers_at_end=pipeline.STORE_WORKERS_AT_END, gc=gc_time.report(),
        output_bytes=output.stat().st_size,
        peak_gpu_gib=round(torch.cuda.max_memory_allocated() / (1 << 30), 2) if cuda else None,
        peak_gpu_reserved_gib=round(torch.cuda.max_memory_reserved() / (1 << 30), 2) if cuda else None,
        gpu_busy=gpu.busy(t0 + (first or 0), t0 + synth), gpu_busy_source=gpu.source,
        # --gpu-trace: the same window's busy fraction from every kernel and copy the GPU ran
        # (its records held in host memory until the end: peak RSS is not comparable then)
        gpu_trace=trace.report(t0 + (first or 0), t0 + synth) if trace.enabled else None,
        peak_host_rss_gib=round(_peak_rss_gib(), 2),
        dynamo={k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("graph_break", "stats", "recompiles")},
    )
    say(f"fast: {r['fast']}")
    if "stock" in r:
        # like for like: audio the engines made per wall second (stock's is raw chunk audio too)
        r["speedup_vs_stock"] = round(r["fast"]["chunk_x_realtime"] / r["stock"]["x_realtime"], 1)
        say(f"end to end: {r['fast']['x_realtime']}x real time; stock {r['stock']['x_realtime']}x; ratio {r['speedup_vs_stock']}x")
    shutil.rmtree(work, ignore_errors=True)
    return r

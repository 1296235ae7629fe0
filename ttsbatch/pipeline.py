"""Wiring: plan -> engine -> watermark -> store -> stitch -> export -> verify.

``synthesize_pending`` is the resumable part: every finished chunk is watermarked and in
the store before the next batch starts, so an interrupted run loses at most one batch.
``render_book`` stitches the plan from the store, in document order, into the output file
while the chunks are still being rendered (:mod:`.track`); the file appears only when
complete (atomic rename) and only after its watermark is found.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from . import faults
from .config import GenerationOptions, Options, as_dict
from .errors import TtsbatchError, WatermarkError
from .plan import PlannedChunk, make_plan, pending
from .progress import Progress
from .store import TEMP_SUFFIX, ChunkStore, adopt_chunks, sibling_work_dirs, store_lock, write_manifest
from .text import Chunk, Document
from .track import BookTrack
from .track_process import TrackProcess

log = logging.getLogger("ttsbatch")

FORMAT_VERSION = 1  # of the manifest

# Chunks the store threads of a GPU run mark with Perth at once (_ChunkSink's ``group``).
# Module-level so that `ttsbatch bench --mark-group` can compare it with 1 (chunk by chunk).
MARK_GROUP = 32
# Whether a GPU run's track (stitching, encoding) runs in a process of its own
# (ttsbatch.track_process) instead of a thread: S3Gen's launches took 31.4-32.5 s of a 2-hour
# book against 35.5 s, GPU busy 85.5-88.4% against 80.6% (H200, twentieth session).
# `ttsbatch bench --track-thread` compares.
TRACK_PROCESS = True
# Store threads (Perth and the FLAC encoder) once the engine is done: its last S3Gen collection
# (~256 chunks) is handed over at once, and the synthesis ends when it is stored: 0.9-1.1 s
# after the engine with the two threads that work beside it, 0.2-0.4 s with four (H200,
# twenty-first session) when all four existed from the start, two held back by a semaphore;
# but that pool cost S3Gen's launches ~1.5 s of CPU in the same runs, and the book gained
# nothing. Now the extra threads are made when the engine is done (_ChunkSink.ready); one
# 20-minute book on a fresh machine still took 0.98 s to store its last 194 chunks with them
# (new threads' first Perth calls?). Two until an A/B on a whole book says more:
# `ttsbatch bench --store-workers-at-end 4`.
STORE_WORKERS_AT_END = 2


@dataclass(frozen=True)
class ChunkDone:
    """One chunk synthesized, watermarked and stored (yielded as the run goes)."""

    planned: PlannedChunk
    seconds: float  # audio length
    tokens: int  # speech tokens the engine generated


@dataclass(frozen=True)
class ChunkFailed:
    """One chunk the engine could not render, even alone; the run goes on without it."""

    planned: PlannedChunk
    error: str  # one line


class ChunksFailed(TtsbatchError):
    """Some chunks failed: the rest is stored, no output is written (exit 1)."""


@dataclass
class RunReport:
    """What a run did, for the summary line and for tests."""

    chunks_total: int = 0  # chunks in the plan (identical texts counted once)
    chunks_cached: int = 0  # already in the store when the run started
    chunks_rendered: int = 0  # synthesized by this run
    chunks_failed: int = 0  # could not be rendered
    audio_seconds: float = 0.0  # length of the output
    synth_seconds: float = 0.0  # wall time spent synthesizing
    # after synthesis: waiting for the track's encoders and joining (finish), writing the
    # output with its chapters (publish), checking its watermark (verify)
    tail_seconds: dict = field(default_factory=dict)
    tail_chunks: int = 0  # chunks the track had still to append when synthesis ended
    # the engine's thread waiting for the store workers to catch up (their queue full)
    store_wait_seconds: float = 0.0
    rendered_ids: list[str] = field(default_factory=list)
    output: Path | None = None
    watermark_score: float | None = None


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA (or any accelerator's) out-of-memory, however the engine surfaced it."""
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return "out of memory" in str(e).lower()


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            from .engine.capture import empty_cache

            empty_cache()  # not beside the engine's T3 thread capturing a graph
    except ImportError:  # pragma: no cover
        pass


class _ChunkSink:
    """Watermarks and stores finished chunks on a worker thread, beside the engine.

    The engine hands over each chunk as soon as it has it and goes on; at most ``depth``
    chunks wait (bounded memory). ``workers`` threads mark and store them, ``group`` at a
    time (Perth's ``apply_batch``: one batched pass on the GPU instead of a pass, a host
    sync and their Python per chunk); :meth:`ready` hands a smaller group over too, and
    returns the chunks stored so far, in the order they were handed over. A failure to mark
    or store (disk full, say) is raised from :meth:`ready` / :meth:`drain`, so it stops the
    run as it would inline.

    ``background=False`` does the same work inline. That is the choice when the engine runs on
    the CPU: there the worker would compete for the same cores, and concurrent CPU work
    changes how the BLAS library splits the engine's matrix products, so the rounding and,
    at near-tied logits, the sampled tokens would depend on timing. Runs must be repeatable.
    """

    def __init__(
        self,
        watermarker,
        store: ChunkStore,
        engine_name: str,
        sr: int,
        depth: int = 1024,
        background: bool = True,
        workers: int = 2,
        group: int = 32,
        end_workers: int = 2,
    ):
        # depth: the fast engine hands over a whole S3Gen collection (256 chunks, ~0.5 MB
        # each) at once, on S3Gen's thread, which launches nothing meanwhile; a shallow queue
        # made it wait for Perth chunk by chunk (14 s of a 2-hour book, profiled), and a depth
        # of one collection makes it wait whenever the previous one is not yet stored (S3Gen's
        # thread spent 1.3-3.5 s of a book in the pipeline's hands, `bench`'s host_timeline
        # "consumer_s", H200, eighteenth session; 0.05 s with four, nineteenth). Four
        # collections: at most ~0.5 GB of audio waiting at the book's mean chunk length,
        # whatever the book's length. workers: Perth's resampling and the FLAC encoder release
        # the GIL. group: Perth marking chunk by chunk held the GIL for ~2 s of a 2-hour book
        # (py-spy, eleventh session), time the engine's threads wait to launch; the fast
        # engine's collections are multiples of 32.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ttsbatch-store") if background else None
        # end_workers: once the engine's call has ended (ready), groups not yet started are
        # shared with end_workers - workers more threads (a pool of their own, made then)
        self._workers, self._end_workers = workers, end_workers
        self._end_pool: ThreadPoolExecutor | None = None
        self._groups: dict = {}  # a handed-over group's future -> its chunks, until the first is collected
        self._waiting: deque = deque()  # (future of a group's samples stored, index in the group, planned, tokens)
        self._group: list = []  # (planned, wav, tokens) not yet handed to a worker
        self._group_size = max(1, min(group, depth))  # a full group never waits on itself
        self._local = threading.local()
        self._watermarker, self._store, self._engine, self._sr, self._depth = watermarker, store, engine_name, sr, depth
        self.waited_s = 0.0  # put() blocked on a full queue

    def _store_marked(self, planned: PlannedChunk, marked, tokens: int) -> int:
        meta = {"text": planned.chunk.text, "tokens": tokens, "engine": self._engine}
        self._store.put(planned.id, marked, self._sr, meta)
        faults.point("chunk-stored")
        return len(marked)

    def _mark_and_store(self, planned: PlannedChunk, wav, tokens: int) -> ChunkDone:
        marked = self._watermarker.apply(wav, self._sr) if len(wav) else wav
        return ChunkDone(planned, self._store_marked(planned, marked, tokens) / self._sr, tokens)

    def _mark_and_store_group(self, group: list) -> list[int]:
        with self._gpu_stream():
            marked = self._watermarker.apply_batch([wav for _, wav, _ in group], self._sr)
        return [self._store_marked(planned, m, tokens) for (planned, _, tokens), m in zip(group, marked)]

    def _gpu_stream(self):
        """A CUDA stream of this worker's own when Perth runs on a GPU: its small kernels then
        run beside S3Gen's instead of queueing between them on the default stream."""
        import contextlib

        if self._pool is None or not str(getattr(self._watermarker, "device", "cpu")).startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(torch.device(self._watermarker.device))
        return torch.cuda.stream(stream)

    def put(self, planned: PlannedChunk, wav, tokens: int) -> list[ChunkDone]:
        """Queue one chunk; returns the chunks stored meanwhile (waits if ``depth`` are queued)."""
        if self._pool is None:
            return [self._mark_and_store(planned, wav, tokens)]
        self._group.append((planned, wav, tokens))
        if len(self._group) >= self._group_size:
            self._hand_over()
        done = self._collect()
        if len(self._waiting) + len(self._group) >= self._depth:
            t0 = time.perf_counter()
            while self._waiting and len(self._waiting) + len(self._group) >= self._depth:
                done.append(self._next())
            self.waited_s += time.perf_counter() - t0
        return done

    def _hand_over(self) -> None:
        """The open group to a worker."""
        if not self._group:
            return
        group, self._group = self._group, []
        future = self._pool.submit(self._mark_and_store_group, group)
        self._groups[future] = group
        self._waiting.extend((future, k, planned, tokens) for k, (planned, _, tokens) in enumerate(group))

    def _widen(self) -> None:
        """The engine is done: of the groups not yet started, those at positions ``workers``
        to ``end_workers - 1`` of every ``end_workers`` (so the store still finishes them
        roughly in order) move to ``end_workers - workers`` new threads."""
        extra = self._end_workers - self._workers
        if extra <= 0 or self._end_pool is not None:
            return
        self._end_pool = ThreadPoolExecutor(max_workers=extra, thread_name_prefix="ttsbatch-store-end")
        moved, queued = {}, 0
        for future, group in list(self._groups.items()):
            if future.running() or future.done():
                continue
            if queued % self._end_workers >= self._workers and future.cancel():  # not started: it moves
                moved[future] = self._end_pool.submit(self._mark_and_store_group, group)
                self._groups[moved[future]] = self._groups.pop(future)
            queued += 1
        if moved:
            self._waiting = deque((moved.get(f, f), k, planned, tokens) for f, k, planned, tokens in self._waiting)

    def _next(self) -> ChunkDone:
        future, k, planned, tokens = self._waiting.popleft()
        self._groups.pop(future, None)  # its samples: stored or failed
        return ChunkDone(planned, future.result()[k] / self._sr, tokens)

    def _collect(self) -> list[ChunkDone]:
        done = []
        while self._waiting and self._waiting[0][0].done():
            done.append(self._next())
        return done

    def ready(self) -> list[ChunkDone]:
        """Hands the open group over (the engine's call has ended: no more chunks to group with
        it soon, and the GPU and the cores are free for the store: ``end_workers`` threads
        work from now on); the chunks stored so far."""
        if self._pool is not None:
            self._hand_over()
            self._widen()
        return self._collect()

    def drain(self) -> list[ChunkDone]:
        if self._pool is not None:
            self._hand_over()
        return [self._next() for _ in range(len(self._waiting))]

    def close(self) -> None:
        """Let queued chunks finish storing (an interrupt keeps what was rendered), then stop.
        Chunks not yet handed over are handed over first: they are rendered, so they are kept."""
        if self._pool is not None:
            self._hand_over()
            self._pool.shutdown(wait=True)
            if self._end_pool is not None:
                self._end_pool.shutdown(wait=True)


def _on_gpu(engine) -> bool:
    """Whether the engine runs on a GPU: then the host work beside it (marking, storing,
    stitching) goes to threads of its own; on the CPU it stays inline (see _ChunkSink)."""
    return str(getattr(engine, "device", "cpu")).startswith("cuda")


def _engine_results(engine, requests, conds, generation):
    """``(index, result)`` as the engine finishes them: streamed where the engine can."""
    stream = getattr(engine, "synthesize_stream", None)
    if stream is not None:
        return iter(stream(requests, conds, generation))
    return iter(enumerate(engine.synthesize(requests, conds, generation)))


def synthesize_pending(
    todo: Sequence[PlannedChunk],
    *,
    engine,
    conds,
    generation: GenerationOptions,
    watermarker,
    store: ChunkStore,
    batch_size: int,
    report: RunReport | None = None,
) -> Iterator[ChunkDone | ChunkFailed]:
    """Synthesize ``todo`` in batches, in order; each chunk is marked and stored, then yielded.

    On a GPU, chunks are marked and stored on a worker thread as the engine hands them over,
    so the engine never waits for the disk (on the CPU inline: see :class:`_ChunkSink`).
    Out of memory: the unfinished part of the batch is halved and retried, and later batches keep the smaller size. Any other engine error: the
    unfinished chunks are retried one at a time, so one bad chunk costs only itself; a chunk
    that fails alone is yielded as ChunkFailed. ``report``: its ``store_wait_seconds`` gets
    the time the engine's side waited for the store workers.
    """
    from .engine.stock import SynthesisRequest

    remaining = list(todo)
    size = batch_size
    alone: list[PlannedChunk] = []  # chunks to retry one at a time after an error
    sink = _ChunkSink(watermarker, store, engine.name, engine.sample_rate, background=_on_gpu(engine), group=MARK_GROUP,
                      end_workers=STORE_WORKERS_AT_END)
    try:
        while remaining or alone:
            if alone:
                batch = [alone.pop(0)]
            else:
                batch, remaining = remaining[:size], remaining[size:]
            requests = [SynthesisRequest(p.chunk.text, p.seed, p.budget) for p in batch]
            finished: set[int] = set()
            error = None
            results = None
            while True:
                try:  # only the engine's own failures are caught here; the sink's propagate
                    if results is None:
                        results = _engine_results(engine, requests, conds, generation)
                    j, result = next(results)
                except StopIteration:
                    break
                except Exception as e:  # KeyboardInterrupt and SIGTERM are BaseException: they pass
                    error = e
                    break
                finished.add(j)
                yield from sink.put(batch[j], result.wav, result.tokens)
            yield from sink.ready()
            if error is None:
                continue
            unfinished = [p for j, p in enumerate(batch) if j not in finished]
            if not unfinished:
                continue
            if is_out_of_memory(error) and len(unfinished) > 1:
                size = max(1, len(unfinished) // 2)
                log.warning("out of GPU memory with %d chunks in a batch; retrying with %d", len(batch), size)
                _free_accelerator_memory()
                remaining[:0] = unfinished
                continue
            if len(unfinished) > 1:
                log.warning("a batch of %d chunks failed (%s); retrying them one at a time", len(unfinished), _line(error))
                alone.extend(unfinished)
                continue
            log.error("chunk %d failed: %s", unfinished[0].chunk.index + 1, _line(error))
            yield ChunkFailed(unfinished[0], _line(error))
        yield from sink.drain()
    finally:
        sink.close()
        if report is not None:
            report.store_wait_seconds += sink.waited_s


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def run_chunks(
    plan: list[PlannedChunk],
    *,
    engine,
    conds,
    options: Options,
    watermarker,
    store: ChunkStore,
    batch_size: int,
    progress: str,
    report: RunReport,
    on_stored=None,
) -> None:
    """Render what the store lacks, reporting progress; fills ``report``; raises ChunksFailed.

    ``on_stored(planned)`` is called for each chunk once it is in the store (the book's track
    follows the run that way)."""
    todo = pending(plan, store)
    unique = {p.id for p in plan}
    report.chunks_total = len(unique)
    report.chunks_cached = len(unique) - len(todo)
    if report.chunks_cached:
        log.info("resuming: %d of %d chunks already rendered", report.chunks_cached, len(unique))
    started = time.perf_counter()
    failed: list[ChunkFailed] = []
    with Progress(progress, total=len(todo), cached=report.chunks_cached) as bar:
        for item in synthesize_pending(
            todo,
            engine=engine,
            conds=conds,
            generation=options.generation,
            watermarker=watermarker,
            store=store,
            batch_size=batch_size,
            report=report,
        ):
            if isinstance(item, ChunkFailed):
                failed.append(item)
                continue
            report.chunks_rendered += 1
            report.rendered_ids.append(item.planned.id)
            if on_stored is not None:
                on_stored(item.planned)
            bar.chunk(item.planned.chunk.index, item.planned.id, item.seconds)
    report.synth_seconds = time.perf_counter() - started
    report.chunks_failed = len(failed)
    if failed:
        first = failed[0]
        raise ChunksFailed(
            f"{len(failed)} chunk(s) failed (first: chunk {first.planned.chunk.index + 1}: {first.error}); "
            "the others are stored; run the same command again to retry"
        )


def ends_with(path: Path, tail: Path, block: int = 8 << 20) -> bool:
    """Whether the file ``path`` ends with the bytes of the file ``tail`` (read a block at a time)."""
    n, size = tail.stat().st_size, path.stat().st_size
    if n == 0 or n > size:
        return False
    with open(path, "rb") as a, open(tail, "rb") as b:
        a.seek(size - n)
        while True:
            x = b.read(block)
            if not x:
                return True
            if a.read(len(x)) != x:
                return False


def encode_verified(track: Path, output: Path, options: Options, watermarker, chapters=(), title: str | None = None):
    """Encode the WAV ``track`` into ``output`` (see :func:`publish_verified`)."""
    from .audio.export import encode

    return publish_verified(
        lambda staged: encode(track, staged, options.export, chapters=list(chapters), title=title), output, watermarker
    )


def staged_path(output: Path) -> Path:
    """Where :func:`publish_verified` has ``output`` written before it is checked and renamed."""
    return output.with_name(f".{output.stem}.partial{output.suffix}")


def publish_verified(write, output: Path, watermarker, frames: Path | None = None):
    """``write(path)`` the output beside ``output`` under a temporary name, check the mark, rename.

    The output never exists unfinished or unmarked. The temporary name is fixed (callers hold
    the work dir's lock): a run killed here leaves it, and the next run overwrites it.

    ``frames``: a file whose bytes ``write`` copies unchanged to the end of the output (a
    book's MP3 frames, which ``finish_stream`` remuxes under a new header with ``-c copy``).
    The mark is then read from those frames while ``write`` runs, and the output is checked
    to end with exactly those bytes, so the check reads the audio the output holds; if it
    does not end with them, the output itself is checked, as without ``frames``. (A 2-hour
    book: the remux ~2.2 s and the check ~1.5 s on the H100's host, one after the other.)
    """
    from .audio.watermark import MIN_MARK_S, verify_file

    staged = staged_path(output)
    try:
        if frames is None:
            write(staged)
            check = verify_file(staged, watermarker)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="ttsbatch-verify") as pool:
                early = pool.submit(verify_file, frames, watermarker)
                write(staged)
                check = early.result()
            if not ends_with(staged, frames):
                check = verify_file(staged, watermarker)
        faults.point("encoded")
        if not check.marked:
            # Perth's mark lives in STFT frames of 64 ms: a few tokens of audio cannot hold one
            short = f", too short to hold Perth's watermark, which needs about {MIN_MARK_S:g} s" if check.duration_s < MIN_MARK_S else ""
            raise WatermarkError(
                f"the watermark was not found in the encoded output (score {check.score:.2f}; "
                f"{check.duration_s:.2f} s of audio{short}); nothing written"
            )
        os.replace(staged, output)
    finally:
        staged.unlink(missing_ok=True)
    return check


def manifest_for(doc: Document, source: Path, voice, model_id: str, options: Options, plan: list[PlannedChunk]) -> dict:
    return {
        "format": FORMAT_VERSION,
        "input": str(source),
        "voice": voice.id,
        "model": model_id,
        "options": as_dict(options),
        "chunks": [
            {"id": p.id, "chapter": p.chunk.chapter, "boundary": p.chunk.boundary, "text": p.chunk.text}
            for p in plan
        ],
    }


def render_book(
    doc: Document,
    chunks: list[Chunk],
    *,
    source: Path,
    output: Path,
    work_dir: Path,
    voice,
    options: Options,
    model,
    engine,
    watermarker,
    batch_size: int = 1,
    progress: str = "none",
    cache_dir: Path | None = None,
    lock_timeout: float = 0,
) -> RunReport:
    """The whole job for a book; resumable; the output appears only when complete and marked."""
    from .audio.export import add_chapters, finish_stream, sync_file
    from .engine.voice import VoiceCache

    report = RunReport(output=output)
    # The engine is part of the audio's identity: stock and fast sample differently.
    plan = make_plan(chunks, voice.id, options.generation, f"{model.model_id}:{engine.name}")
    store = ChunkStore(work_dir)
    with store_lock(work_dir, timeout=lock_timeout):
        store.remove_temp_files()  # leftovers of a run that was killed mid-write
        # the same book rendered before to another format (book.mp3, now book.m4b): its chunks
        adopt_chunks(store, (p.id for p in plan), sibling_work_dirs(work_dir))
        write_manifest(work_dir, manifest_for(doc, source, voice, model.model_id, options, plan))
        conds = VoiceCache(model, cache_dir).get(voice, options.generation.exaggeration)
        # The track is stitched and encoded as chunks arrive (in the engine's own thread on
        # the CPU, beside it on a GPU), into a temporary file the next run would clean up.
        encoded = work_dir / f".track-{os.getpid()}{TEMP_SUFFIX}"
        try:
            ext = output.suffix.lower()
            # an MP3 in segments is copied under its header as it is joined, where it is staged
            remux_to = staged_path(output) if ext == ".mp3" else None
            if _on_gpu(engine) and TRACK_PROCESS:
                track_cm = TrackProcess(plan, doc, store, options, encoded, ext, remux_to=remux_to)
            else:
                track_cm = BookTrack(plan, doc, store, options, encoded, ext, background=_on_gpu(engine), remux_to=remux_to)
            with track_cm as track:
                run_chunks(
                    plan,
                    engine=engine,
                    conds=conds,
                    options=options,
                    watermarker=watermarker,
                    store=store,
                    batch_size=batch_size,
                    progress=progress,
                    report=report,
                    on_stored=track.stored,
                )
                t0 = time.perf_counter()
                chapters, seconds = track.finish()
                report.tail_seconds["finish"] = time.perf_counter() - t0
                for part, s in track.finish_seconds.items():  # finish = append + encode
                    report.tail_seconds[f"finish_{part}"] = s
                report.tail_chunks = track.finish_appended
                frames_only = track.frames_only
                remuxed = track.remuxed
            marks = chapters if len(chapters) > 1 else ()

            def write(staged):
                t = time.perf_counter()
                if remuxed == staged and add_chapters(staged, marks, doc.display_title, seconds, doc.author):
                    sync_file(staged)
                else:  # one segment, another format, or the live remux failed
                    finish_stream(encoded, staged, chapters=marks, title=doc.display_title, total_s=seconds, artist=doc.author)
                report.tail_seconds["publish"] = time.perf_counter() - t

            t0 = time.perf_counter()
            # bare MP3 frames are remuxed unchanged: their mark is read while the remux runs
            check = publish_verified(write, output, watermarker, frames=encoded if frames_only else None)
            report.tail_seconds["verify"] = time.perf_counter() - t0 - report.tail_seconds["publish"]
        finally:
            encoded.unlink(missing_ok=True)
    report.audio_seconds = seconds
    report.watermark_score = check.score
    return report

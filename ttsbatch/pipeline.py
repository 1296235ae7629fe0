"""Wiring: plan -> engine -> watermark -> store -> stitch -> export -> verify.

``synthesize_pending`` is the resumable part: every finished chunk is watermarked and in
the store before the next batch starts, so an interrupted run loses at most one batch.
``render`` stitches a whole plan from the store, in document order, into the output file,
which appears only when complete (atomic rename) and only after its watermark is found.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from .config import GenerationOptions, Options, as_dict
from .errors import WatermarkError
from .plan import PlannedChunk, batches, make_plan, pending
from .store import ChunkStore, store_lock, write_manifest
from .text import Chunk, Document

log = logging.getLogger("ttsbatch")

FORMAT_VERSION = 1  # of the manifest


@dataclass(frozen=True)
class ChunkDone:
    """One chunk synthesized, watermarked and stored (yielded as the run goes)."""

    planned: PlannedChunk
    seconds: float  # audio length
    tokens: int  # speech tokens the engine generated


@dataclass
class RunReport:
    """What a run did, for the summary line and for tests."""

    chunks_total: int = 0  # chunks in the plan (identical texts counted once)
    chunks_cached: int = 0  # already in the store when the run started
    chunks_rendered: int = 0  # synthesized by this run
    audio_seconds: float = 0.0  # length of the output
    synth_seconds: float = 0.0  # wall time spent synthesizing
    rendered_ids: list[str] = field(default_factory=list)
    output: Path | None = None
    watermark_score: float | None = None


def synthesize_pending(
    todo: Sequence[PlannedChunk],
    *,
    engine,
    conds,
    generation: GenerationOptions,
    watermarker,
    store: ChunkStore,
    batch_size: int,
) -> Iterator[ChunkDone]:
    """Synthesize ``todo`` in length-sorted batches; each chunk is marked and stored, then yielded."""
    from .engine.stock import SynthesisRequest

    sr = engine.sample_rate
    for batch in batches(list(todo), batch_size):
        requests = [SynthesisRequest(p.chunk.text, p.seed, p.budget) for p in batch]
        results = engine.synthesize(requests, conds, generation)
        for planned, result in zip(batch, results):
            marked = watermarker.apply(result.wav, sr) if len(result.wav) else result.wav
            meta = {"text": planned.chunk.text, "tokens": result.tokens, "engine": engine.name}
            store.put(planned.id, marked, sr, meta)
            yield ChunkDone(planned, len(marked) / sr, result.tokens)


def progress_bar(total: int, quiet: bool, desc: str = "chunks") -> tqdm:
    """One bar for the whole run: chunks, audio seconds, real-time factor and ETA."""
    return tqdm(total=total, desc=desc, unit="chunk", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def run_chunks(
    plan: list[PlannedChunk],
    *,
    engine,
    conds,
    options: Options,
    watermarker,
    store: ChunkStore,
    batch_size: int,
    quiet: bool,
    report: RunReport,
    on_chunk: Callable[[ChunkDone], None] | None = None,
) -> None:
    """Render what the store lacks, with a progress bar; fills ``report``."""
    todo = pending(plan, store)
    unique = {p.id for p in plan}
    report.chunks_total = len(unique)
    report.chunks_cached = len(unique) - len(todo)
    if report.chunks_cached:
        log.info("resuming: %d of %d chunks already rendered", report.chunks_cached, len(unique))
    started = time.perf_counter()
    audio = 0.0
    with progress_bar(len(todo), quiet) as bar:
        for done in synthesize_pending(
            todo,
            engine=engine,
            conds=conds,
            generation=options.generation,
            watermarker=watermarker,
            store=store,
            batch_size=batch_size,
        ):
            audio += done.seconds
            report.chunks_rendered += 1
            report.rendered_ids.append(done.planned.id)
            elapsed = time.perf_counter() - started
            bar.set_postfix(audio=f"{audio:.0f}s", rtf=f"{elapsed / max(audio, 1e-9):.2f}", refresh=False)
            bar.update(1)
            if on_chunk:
                on_chunk(done)
    report.synth_seconds = time.perf_counter() - started


def stitch_to_file(plan: list[PlannedChunk], doc: Document, store: ChunkStore, options: Options, track_path: Path):
    """Join the stored chunks in document order into a WAV track; returns (chapters, seconds)."""
    from .audio.stitch import TrackWriter

    sr = None
    chapter = None
    with TrackWriter(track_path, store.get(plan[0].id)[1], options.stitch) as writer:
        for p in plan:
            wav, sr = store.get(p.id)
            if p.chunk.chapter != chapter:
                chapter = p.chunk.chapter
                title = doc.chapters[chapter].title or (doc.name if chapter == 0 else f"Part {chapter + 1}")
                writer.start_chapter(title)
            writer.add(wav, p.chunk.boundary)
        return list(writer.chapters), writer.duration_s


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
    quiet: bool = False,
    cache_dir: Path | None = None,
) -> RunReport:
    """The whole job for a book; resumable; the output appears only when complete and marked."""
    from .audio.export import encode
    from .audio.watermark import verify_file
    from .engine.voice import VoiceCache

    report = RunReport(output=output)
    plan = make_plan(chunks, voice.id, options.generation, model.model_id)
    store = ChunkStore(work_dir)
    with store_lock(work_dir):
        store.remove_temp_files()  # leftovers of a run that was killed mid-write
        write_manifest(work_dir, manifest_for(doc, source, voice, model.model_id, options, plan))
        conds = VoiceCache(model, cache_dir).get(voice, options.generation.exaggeration)
        run_chunks(
            plan,
            engine=engine,
            conds=conds,
            options=options,
            watermarker=watermarker,
            store=store,
            batch_size=batch_size,
            quiet=quiet,
            report=report,
        )
        # Encode beside the output under a temporary name, check the mark, then rename: the
        # output never exists unfinished or unmarked.
        track = work_dir / f"track-{os.getpid()}.wav"
        staged = output.with_name(f".{output.stem}.partial-{os.getpid()}{output.suffix}")
        try:
            chapters, seconds = stitch_to_file(plan, doc, store, options, track)
            encode(track, staged, options.export, chapters=chapters if len(chapters) > 1 else [], title=doc.name)
            check = verify_file(staged, watermarker)
            if not check.marked:
                raise WatermarkError(f"the watermark was not found in the encoded output (score {check.score:.2f}); nothing written")
            os.replace(staged, output)
        finally:
            track.unlink(missing_ok=True)
            staged.unlink(missing_ok=True)
    report.audio_seconds = seconds
    report.watermark_score = check.score
    return report

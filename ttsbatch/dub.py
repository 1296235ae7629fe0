"""The subtitle job: each cue's speech placed at its time on one track (``ttsbatch srt``).

Built on the same stages as books: every spoken cue becomes one or more Chunks (a long cue
is split like a paragraph and joined again), planned with ``plan.make_plan`` and rendered
with ``pipeline.run_chunks`` into the ChunkStore of the work directory (watermarked, stored,
resumable; identical lines are rendered once). Then, from the store:

1. each cue's audio is its chunks, silence-trimmed and faded, joined with the sentence
   pause; its natural length goes to ``audio.timing.fit_timeline``;
2. a cue that must be sped up is time-stretched (ffmpeg ``atempo``, pitch kept) and then
   **watermarked again**: Perth's mark survives atempo (measured on noise and on speech:
   score >= 0.99 up to 1.6x, 0.986 at 2x), but re-marking costs ~10 ms a cue and makes the
   mark independent of how a stretch treats it;
3. the track is written with a TrackWriter: silence up to sample ``round(start * sr)``,
   then the cue's audio, never two voices at once; the track lasts until ``duration`` (or
   the last cue's end), longer if speech runs past it;
4. it is encoded under a temporary name beside the output, its watermark is checked, and it
   is renamed into place; then the adjusted SRT and the JSON timing report are written
   (atomically) beside it.

The adjusted SRT has one cue per *spoken* cue, numbered from 1, with the displayed text of
the input and the times of the speech actually produced (start and end of the voice, to the
millisecond). Cues without speech (sounds, music, empty) are left out of it and are listed in
the report with their reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from .audio.timing import FitOptions, Placement, Slot, fit_timeline, time_stretch
from .config import Options, StitchOptions, as_dict
from .pipeline import FORMAT_VERSION, RunReport, encode_verified, run_chunks
from .plan import PlannedChunk, make_plan
from .store import ChunkStore, StoreError, adopt_chunks, atomic_write_bytes, sibling_work_dirs, store_lock, write_manifest
from .text.document import Chunk
from .text.subtitles import SKIP_REASONS, Cue, cue_chunks

log = logging.getLogger("ttsbatch")

REPORT_VERSION = 1  # of the timing report


@dataclass
class DubReport(RunReport):
    """A RunReport plus what the subtitle job did per cue."""

    cues: list[dict] = field(default_factory=list)  # one row per cue, as in the timing report
    totals: dict = field(default_factory=dict)
    srt_path: Path | None = None  # the adjusted SRT
    report_path: Path | None = None  # the JSON timing report


def sidecar_paths(source: Path, output: Path) -> tuple[Path, Path]:
    """(adjusted SRT, timing report) beside ``output``: OUT.srt (OUT.adjusted.srt where OUT.srt
    would be the input itself) and OUT.timing.json."""
    srt_path = output.with_suffix(".srt")
    if srt_path.resolve() == Path(source).resolve():
        srt_path = output.with_suffix(".adjusted.srt")
    return srt_path, output.with_suffix(".timing.json")


def plan_cues(cues: list[Cue], options: Options, voice_id: str, model_id: str) -> list[tuple[Cue, list[PlannedChunk]]]:
    """Every spoken cue with its planned chunks (ids, seeds, budgets), in time order."""
    per_cue = cue_chunks(cues, options.text)
    flat: list[Chunk] = [c for _, chunks in per_cue for c in chunks]
    planned = iter(make_plan(flat, voice_id, options.generation, model_id))
    return [(cue, [next(planned) for _ in chunks]) for cue, chunks in per_cue]


def cue_audio(store: ChunkStore, planned: list[PlannedChunk], stitch: StitchOptions) -> tuple[np.ndarray, int]:
    """A cue's speech: its chunks trimmed and faded, joined with the sentence pause."""
    from .audio.stitch import apply_fades, trim_silence

    parts: list[np.ndarray] = []
    sr = 0
    for k, p in enumerate(planned):
        wav, sr = store.get(p.id)
        if stitch.trim_silence:
            wav = trim_silence(wav, sr, stitch)
        if k:
            parts.append(np.zeros(round(sr * stitch.sentence_pause_ms / 1000), dtype=np.float32))
        parts.append(apply_fades(wav, sr, stitch.fade_ms))
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), sr


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)


def adjusted_srt(rows: list[dict]) -> str:
    """The SRT of the speech produced: spoken cues only, renumbered, times to the millisecond."""
    import srt

    subs = []
    for row in rows:
        if row["skipped"] is None:
            subs.append(srt.Subtitle(
                index=len(subs) + 1,
                start=timedelta(milliseconds=round(row["speech_start"] * 1000)),
                end=timedelta(milliseconds=round(row["speech_end"] * 1000)),
                content=row["display"],
            ))
    return srt.compose(subs, reindex=False)


def render_subtitles(
    cues: list[Cue],
    *,
    source: Path,
    output: Path,
    work_dir: Path,
    voice,
    options: Options,
    fit: FitOptions,
    model,
    engine,
    watermarker,
    duration: float | None = None,
    batch_size: int = 1,
    progress: str = "none",
    cache_dir: Path | None = None,
    lock_timeout: float = 0,
) -> DubReport:
    """The whole subtitle job; resumable; the output appears only when complete and marked."""
    from .audio.stitch import TrackWriter
    from .engine.voice import VoiceCache

    report = DubReport(output=output)
    # The engine is part of the audio's identity (as for books): stock and fast sample differently.
    per_cue = plan_cues(cues, options, voice.id, f"{model.model_id}:{engine.name}")
    plan = [p for _, planned in per_cue for p in planned]
    srt_path, report_path = sidecar_paths(source, output)
    store = ChunkStore(work_dir)
    with store_lock(work_dir, timeout=lock_timeout):
        store.remove_temp_files()
        adopt_chunks(store, (p.id for p in plan), sibling_work_dirs(work_dir))  # the same cues for another format
        write_manifest(work_dir, {
            "format": FORMAT_VERSION,
            "kind": "subtitles",
            "input": str(source),
            "voice": voice.id,
            "model": model.model_id,
            "options": as_dict(options),
            "fit": as_dict(fit),
            "cues": [{"index": cue.index, "start": cue.start, "end": cue.end, "chunks": [p.id for p in planned]}
                     for cue, planned in per_cue],
        })
        conds = VoiceCache(model, cache_dir).get(voice, options.generation.exaggeration)
        run_chunks(plan, engine=engine, conds=conds, options=options, watermarker=watermarker, store=store,
                   batch_size=batch_size, progress=progress, report=report)

        # Natural lengths first (one cue in memory at a time), then the fit, then the track.
        sr = engine.sample_rate
        slots = []
        for cue, planned in per_cue:
            wav, sr = cue_audio(store, planned, options.stitch)
            slots.append(Slot(cue.start, cue.end, len(wav) / sr))
        base_end = duration if duration is not None else max(c.end for c in cues)
        placements = fit_timeline(slots, fit, track_end=base_end)

        track = work_dir / f"track-{os.getpid()}.wav"
        placed: dict[int, tuple[int, int, int, Placement]] = {}  # cue index -> start, length, natural samples
        try:
            writer_opts = dataclasses.replace(options.stitch, trim_silence=False)
            with TrackWriter(track, sr, writer_opts) as writer:
                for (cue, planned), placement in zip(per_cue, placements):
                    wav, _ = cue_audio(store, planned, options.stitch)
                    natural = len(wav)
                    if placement.stretch > 1.0:
                        wav = watermarker.apply(time_stretch(wav, sr, placement.stretch), sr)
                    writer.pad_to(placement.start)
                    start = writer.add(wav, "end")
                    placed[cue.index] = (start, len(wav), natural, placement)
                writer.pad_to(max(base_end, writer.duration_s))
                seconds = writer.duration_s
            check = encode_verified(track, output, options, watermarker)
        finally:
            track.unlink(missing_ok=True)

        report.audio_seconds = seconds
        report.watermark_score = check.score
        report.cues = _rows(cues, placed, {cue.index: planned for cue, planned in per_cue}, sr)
        report.totals = _totals(report, fit)
        report.srt_path, report.report_path = srt_path, report_path
        blob = {
            "format": REPORT_VERSION,
            "input": str(source),
            "output": str(output),
            "adjusted_srt": str(srt_path),
            "sample_rate": options.export.sample_rate or sr,
            "max_stretch": fit.max_stretch,
            "shift": fit.shift,
            "totals": report.totals,
            "cues": report.cues,
        }
        _write_sidecar(srt_path, adjusted_srt(report.cues))
        _write_sidecar(report_path, json.dumps(blob, ensure_ascii=False, indent=1) + "\n")
    return report


def _write_sidecar(path: Path, text: str) -> None:
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise StoreError(f"wrote the audio but cannot write {path}: {e.strerror or e}") from None


def _rows(cues: list[Cue], placed: dict, planned_by_cue: dict, sr: int) -> list[dict]:
    rows = []
    for cue in cues:
        row = {
            "index": cue.index + 1,
            "number": cue.number,
            "line": cue.line,
            "text": cue.text,
            "display": cue.raw,  # the subtitle text as shown (skipped cues too)
            "planned_start": _r(cue.start),
            "planned_end": _r(cue.end),
            "speech_start": None,
            "speech_end": None,
            "speech_length": None,
            "natural_length": None,
            "stretch": None,
            "overrun": None,
            "delay": None,
            "skipped": cue.skipped,
            "chunks": [p.id for p in planned_by_cue.get(cue.index, [])],
        }
        if cue.index in placed:
            start, n, natural, p = placed[cue.index]
            row.update(
                speech_start=_r(start / sr),
                speech_end=_r((start + n) / sr),
                speech_length=_r(n / sr),
                natural_length=_r(natural / sr),
                stretch=round(p.stretch, 4),  # the factor atempo was given (never above max_stretch)
                overrun=_r(p.overrun),
                delay=_r(max(0.0, start / sr - cue.start)),
            )
        elif cue.skipped is None:  # spoken text that chunked to nothing (cannot happen after cleaning)
            row["skipped"] = "unspeakable"
        rows.append(row)
    return rows


def _totals(report: DubReport, fit: FitOptions) -> dict:
    spoken = [r for r in report.cues if r["skipped"] is None]
    skipped = [r for r in report.cues if r["skipped"] is not None]
    by_reason = {reason: sum(r["skipped"] == reason for r in skipped) for reason in SKIP_REASONS}
    return {
        "cues": len(report.cues),
        "spoken": len(spoken),
        "skipped": len(skipped),
        "skipped_by_reason": {k: v for k, v in by_reason.items() if v},
        "stretched": sum(r["stretch"] > 1.0 for r in spoken),
        "max_stretch_used": max((r["stretch"] for r in spoken), default=1.0),
        "overrun_cues": sum(r["overrun"] > 0 for r in spoken),
        "overrun_seconds": _r(sum(r["overrun"] for r in spoken)),
        "delayed_cues": sum(r["delay"] > 0.0005 for r in spoken),
        "max_delay": _r(max((r["delay"] for r in spoken), default=0.0)),
        "audio_seconds": _r(report.audio_seconds),
        "chunks_total": report.chunks_total,
        "chunks_rendered": report.chunks_rendered,
        "chunks_reused": report.chunks_cached,
        "watermark_score": _r(report.watermark_score),
    }

"""Joining chunk audio into one track, streamed to disk chunk by chunk.

Only the current chunk is ever in memory: a 10-hour book costs the same RAM as a sentence.
Sample accounting is exact (integers throughout) because subtitles and chapter marks are
computed from the recorded positions. Per-chunk work is plain numpy: pydub's AudioSegment
would round-trip float32 through integer PCM and offers nothing a 10-line numpy fade lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from ..config import StitchOptions
from ..text.document import Boundary

FRAME_S = 0.010  # RMS frame for silence detection: short enough to find a word's onset


def _as_mono(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        wav = wav.reshape(-1)  # (1, n) from the engine; anything else is a caller bug anyway
    return wav


def trim_silence(wav: np.ndarray, sr: int, opts: StitchOptions = StitchOptions()) -> np.ndarray:
    """Cut leading/trailing silence quieter than ``opts.silence_threshold_db`` (dBFS RMS per
    10 ms frame), keeping ``opts.keep_ms`` of it at each edge so onsets are not clipped.

    A chunk that is silent throughout is returned unchanged: trimming it to nothing would
    silently drop a chunk, and its length still tells the listener something was there.
    """
    wav = _as_mono(wav)
    frame = max(1, round(sr * FRAME_S))
    n_frames = -(-len(wav) // frame)
    if n_frames == 0:
        return wav
    padded = np.zeros(n_frames * frame, dtype=np.float32)
    padded[: len(wav)] = wav
    rms = np.sqrt(np.mean(np.square(padded.reshape(n_frames, frame), dtype=np.float64), axis=1))
    loud = np.flatnonzero(rms > 10.0 ** (opts.silence_threshold_db / 20.0))
    if loud.size == 0:
        return wav
    keep = round(sr * opts.keep_ms / 1000)
    start = max(0, loud[0] * frame - keep)
    end = min(len(wav), (loud[-1] + 1) * frame + keep)
    return wav[start:end]


def apply_fades(wav: np.ndarray, sr: int, fade_ms: float) -> np.ndarray:
    """Raised-cosine fade in and out (a copy): first and last samples become exactly 0, so
    chunk joins and pauses never click. Fades shrink to half the chunk on very short chunks."""
    wav = np.array(_as_mono(wav), dtype=np.float32, copy=True)
    n = min(round(sr * fade_ms / 1000), len(wav) // 2)
    if n > 0:
        ramp = (0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)).astype(np.float32)  # 0 -> ~1
        wav[:n] *= ramp
        wav[-n:] *= ramp[::-1]
    return wav


def prepare_chunk(wav: np.ndarray, sr: int, opts: StitchOptions = StitchOptions()) -> np.ndarray:
    """A chunk as the track holds it: trimmed (if ``opts.trim_silence``), then faded; it
    depends on nothing but the chunk, so it may be done in any order."""
    wav = _as_mono(wav)
    if opts.trim_silence:
        wav = trim_silence(wav, sr, opts)
    return apply_fades(wav, sr, opts.fade_ms)


class TrackWriter:
    """Writes one mono track incrementally: chunk, pause, chunk, pause, ...

    ::

        with TrackWriter(tmp_wav, 24000, opts.stitch) as track:
            track.start_chapter("Chapter 1")
            start = track.add(wav, "sentence")
        encode(tmp_wav, out, opts.export, chapters=track.chapters)

    The file is float32 RF64 (a WAV that may exceed 4 GiB: float32 at 24 kHz passes that
    after ~12 hours); soundfile and ffmpeg read it like WAV. With ``sink`` instead of a path
    the samples go to ``sink.write`` (a StreamEncoder, say), and ``close`` closes the sink.
    """

    def __init__(self, path: Path | None, sample_rate: int = 24000, opts: StitchOptions = StitchOptions(), sink=None):
        if (path is None) == (sink is None):
            raise ValueError("TrackWriter writes to a path or to a sink, one of the two")
        self.path = Path(path) if path is not None else None
        self.sample_rate = sample_rate
        self.opts = opts
        self.samples = 0  # samples written so far = start sample of the next chunk
        self.chunk_starts: list[int] = []  # first sample of each added chunk (after trimming)
        self.chunk_ends: list[int] = []  # one past its last sample (its pause follows)
        self.chapters: list[tuple[str, float]] = []  # (title, start seconds), for export
        self._file = sink if sink is not None else sf.SoundFile(
            str(self.path), "w", samplerate=sample_rate, channels=1, subtype="FLOAT", format="RF64")
        self._closed = False

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    def _pause_samples(self, boundary: Boundary) -> int:
        ms = {
            "sentence": self.opts.sentence_pause_ms,
            "paragraph": self.opts.paragraph_pause_ms,
            "chapter": self.opts.chapter_pause_ms,
            "end": 0,
        }[boundary]
        return round(self.sample_rate * ms / 1000)

    def _write(self, wav: np.ndarray) -> None:
        self._file.write(wav)
        self.samples += len(wav)

    def start_chapter(self, title: str | None) -> None:
        """Mark a chapter starting at the current position (the next chunk's first sample)."""
        name = title.strip() if title and title.strip() else f"Chapter {len(self.chapters) + 1}"
        self.chapters.append((name, self.duration_s))

    def add(self, wav: np.ndarray, boundary: Boundary = "sentence", chapter_title: str | None = None) -> int:
        """Append one chunk (trimmed if ``opts.trim_silence``, then faded) and the pause its
        ``boundary`` calls for. ``chapter_title`` is a shortcut for ``start_chapter`` first.
        Returns the chunk's start sample."""
        if chapter_title is not None:
            self.start_chapter(chapter_title)
        return self.add_prepared(prepare_chunk(wav, self.sample_rate, self.opts), boundary)

    def add_prepared(self, wav: np.ndarray, boundary: Boundary = "sentence") -> int:
        """``add`` for a chunk :func:`prepare_chunk` has trimmed and faded already (ahead of
        its turn, on another thread, say). Returns its start sample."""
        start = self.samples
        self.chunk_starts.append(start)
        self._write(wav)
        self.chunk_ends.append(self.samples)
        self.add_silence(self._pause_samples(boundary))
        return start

    def add_silence(self, n_samples: int) -> None:
        """Append ``n_samples`` of digital silence, written in blocks (chapter pauses, cue gaps)."""
        block = np.zeros(min(max(n_samples, 0), self.sample_rate * 10), dtype=np.float32)
        left = max(n_samples, 0)
        while left > 0:
            n = min(left, len(block))
            self._write(block[:n])
            left -= n

    def pad_to(self, seconds: float) -> int:
        """Pad with silence up to ``seconds`` (subtitle cues start at their time). Returns the
        samples by which the track is already past that time (0 if it was padded)."""
        target = round(seconds * self.sample_rate)
        self.add_silence(target - self.samples)
        return max(0, self.samples - target)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()

    def __enter__(self) -> TrackWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""An MP3 track encoded in segments, by several ffmpeg processes at once.

LAME is single-threaded, and on real speech it is slow: a 600 s speech clip at 24 kHz and
128 kbit/s CBR took 5.4 s on this project's 2-core dev machine (112x real time; white noise,
what the random-weight benchmark produces, 326x). One encoder therefore caps a whole book
at ~100x real time, whatever the GPU does. :class:`SegmentedEncoder` is a drop-in for
:class:`~ttsbatch.audio.export.StreamEncoder` (``write``/``close``/``abort``) that takes
``cut()`` wherever the track is silent (after a paragraph's or a chapter's pause):

- ``write`` appends raw float PCM to the current segment's spool file (never waits for LAME);
- ``cut`` hands the segment to a pool of ffmpeg processes once it is ``segment_s`` long, so
  the book is encoded while it renders, several segments at a time, and what is left at the
  end is one segment's encode;
- ``hurry`` (the engine is done) cuts shorter segments and lets every core but one encode,
  so the last burst of audio is encoded in parallel;
- each encoded segment is appended to ``path`` as soon as every one before it is (the
  join is a byte concatenation: segments are written without ID3 or Xing headers, pure
  frames), so most of the book is joined while it renders; ``close`` waits for the rest and
  joins it. ``finish_stream`` then copies the frames into the output with a fresh header and
  the chapters; or, with ``remux_to``, a :class:`~ttsbatch.audio.export.FramesRemux` has
  made that copy as the frames were joined, and :func:`~ttsbatch.audio.export.add_chapters`
  completes it.

Each segment's MP3 holds LAME's start delay and end padding: about 50 ms more silence in the
pause at each cut (a book of one segment is encoded exactly as before: gapless, its header
tells players to skip them). Chapter marks stay exact: ``close`` counts each segment's frames
(ffmpeg's ``framecrc`` muxer lists every packet and its duration), and :meth:`output_time`
maps a time of the written track to the joined file, where each segment starts at the sum of
the durations before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ExportOptions
from ..store import StoreError
from .export import FramesRemux, encode_args
from .ffmpeg import FFmpegError, ff_path, run_ffmpeg

log = logging.getLogger("ttsbatch")

SEGMENT_S = 120.0  # a segment is cut at the first silent point past this length
# Where samples land in the joined file, in samples of the output rate: LAME delays each
# segment's audio by ENCODER_DELAY within its own frames, and the joined file's header
# (no encoder delay: it cannot know of the segments) makes decoders skip DECODER_DELAY at
# its start, the MP3 filterbank's. So sample j of segment k plays at
# (frames before k) + ENCODER_DELAY + j, and the file is (all frames) - DECODER_DELAY long.
ENCODER_DELAY = 576
DECODER_DELAY = 529


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cpusets)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


def default_workers() -> int:
    """Encoders at once: a quarter of the cores (the rest run the engine and the store), or
    ``TTSBATCH_MP3_ENCODERS``. One means no gain over a single streaming encoder
    (``BookTrack`` then uses that)."""
    env = os.environ.get("TTSBATCH_MP3_ENCODERS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, _cores() // 4))


def final_workers() -> int:
    """Encoders at once once the engine is done (:meth:`SegmentedEncoder.hurry`): every core
    but one, which stitches."""
    return max(1, _cores() - 1)


@dataclass
class _Segment:
    written_start: int  # first sample of the segment in the written track
    samples: int  # samples written into it
    pcm: Path
    mp3: Path
    job: Future | None = None
    gapless: bool = False  # encoded with LAME's header: the book is this one segment
    encoded: bool = False  # its MP3 is complete (then it may be joined)
    frames_s: float = 0.0  # duration of its MP3 frames (set when encoded)
    out_start_s: float = 0.0  # where its first written sample plays in the joined file (set by close)


class SegmentedEncoder:
    """Mono float PCM in, one MP3 ``path`` out, encoded by up to ``workers`` ffmpeg
    processes (see the module docstring). Spool and segment files live in a directory beside
    ``path`` (``x.parts.tmp`` for ``x.tmp``), which ``close`` and ``abort`` remove."""

    def __init__(
        self,
        path: Path,
        sample_rate: int,
        opts: ExportOptions = ExportOptions(),
        workers: int | None = None,
        segment_s: float = SEGMENT_S,
        remux_to: Path | None = None,
        title: str | None = None,
        header_padding: int = 4096,
        artist: str | None = None,
    ):
        """``remux_to``: where a :class:`FramesRemux` copies the joined frames as they come,
        under a header with ``title`` (and ``artist``) and ``header_padding`` bytes for the chapters
        (:attr:`remuxed` says whether it is complete). Only several segments are joined: a
        book of one segment is never remuxed live."""
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.opts = opts
        self.min_samples = round(segment_s * sample_rate)
        self.segment_s = segment_s
        # the pool holds a thread for every encoder the end may run (hurry); until then a
        # semaphore lets only ``workers`` of them encode, beside the engine
        self.workers = workers or default_workers()
        self._slots = threading.Semaphore(self.workers)
        self._hurried = False
        self._aborted = False
        # beside path, its suffix kept last (".track-1.tmp" -> ".track-1.parts.tmp"): a killed
        # run's parts are swept with its other temporary files
        self.dir = self.path.with_name(f"{self.path.stem}.parts{self.path.suffix}")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._pool = ThreadPoolExecutor(max_workers=max(self.workers, final_workers()), thread_name_prefix="ttsbatch-mp3")
        self.segments: list[_Segment] = []
        self.samples = 0
        self._file = None
        # the join: segments[:_joined] are in path (opened on the first), ending at _joined_s
        self._join_lock = threading.Lock()
        self._joined = 0
        self._joined_s = 0.0
        self._out = None
        self._join_error: OSError | None = None
        self._remux_args = (Path(remux_to), title, header_padding, artist) if remux_to is not None else None
        self._remux: FramesRemux | None = None
        self._remuxed = False
        self._new_segment()

    def _new_segment(self) -> None:
        k = len(self.segments)
        seg = _Segment(self.samples, 0, self.dir / f"{k:05d}.f32", self.dir / f"{k:05d}.mp3")
        self.segments.append(seg)
        try:
            self._file = open(seg.pcm, "wb")
        except OSError as e:
            raise StoreError(f"cannot write the track's parts in {self.dir}: {e.strerror or e}") from None

    def write(self, wav: np.ndarray) -> None:
        data = np.ascontiguousarray(wav, dtype="<f4")
        try:
            self._file.write(data.tobytes())
        except OSError as e:  # a full disk, most likely
            raise StoreError(f"cannot write the track's parts in {self.dir}: {e.strerror or e}") from None
        self.segments[-1].samples += len(data)
        self.samples += len(data)

    def cut(self) -> None:
        """A silent point: a new segment begins here if the current one is long enough.
        (``StreamEncoder`` has the same ``cut``/``output_time``/``duration_s``, trivially.)"""
        if self.segments[-1].samples >= self.min_samples:
            self._submit(gapless=False)
            self._new_segment()

    def hurry(self, workers: int | None = None, segment_s: float | None = None) -> None:
        """The engine is done: what is still to come (a book's last S3Gen collection, ~1,000 s
        of audio handed over at once) is cut into ``segment_s`` segments (None: a quarter of
        the usual) and encoded by up to ``workers`` ffmpeg processes (None: every core but
        one; never more than the pool's threads, :func:`final_workers` when it was made).
        Each cut adds LAME's ~50 ms to a pause, as every cut does. Thread-safe; a second
        call does nothing."""
        if self._hurried:
            return
        self._hurried = True
        short = self.segment_s / 4 if segment_s is None else segment_s
        self.min_samples = min(self.min_samples, round(short * self.sample_rate))
        extra = max(0, (workers or final_workers()) - self.workers)
        for _ in range(extra):
            self._slots.release()

    def _submit(self, gapless: bool) -> None:
        self._file.close()
        seg = self.segments[-1]
        seg.gapless = gapless
        seg.job = self._pool.submit(self._encode, seg, gapless)

    def _encode(self, seg: _Segment, gapless: bool) -> None:
        with self._slots:
            if self._aborted:  # waited for a slot while the track was given up
                return
            self._encode_now(seg, gapless)
        seg.encoded = True
        if not gapless:  # one of several: join what is ready, beside the engine
            self._join_ready()

    def _join_ready(self) -> None:
        """Append to ``path``, in order, every encoded segment whose predecessors are all
        joined (then delete it: the disk holds the book's MP3 about once, not twice). Called
        by each encoder thread when its segment is done, and by ``close``; an OSError (a full
        disk) stops the join and is raised by ``close``."""
        with self._join_lock:
            while not self._aborted and self._join_error is None and self._joined < len(self.segments):
                seg = self.segments[self._joined]
                if not seg.encoded or seg.gapless:
                    return
                try:
                    if self._out is None:
                        self._out = open(self.path, "wb")
                        self._start_remux()
                    frames = seg.mp3.read_bytes()  # ~2 MB: a segment's two minutes
                    self._out.write(frames)
                    seg.mp3.unlink()
                except OSError as e:
                    self._join_error = e
                    return
                self._feed_remux(frames)
                seg.out_start_s = self._joined_s + ENCODER_DELAY / self.out_rate
                self._joined_s += seg.frames_s
                self._joined += 1

    def _start_remux(self) -> None:
        if self._remux_args is None:
            return
        try:
            self._remux = FramesRemux(*self._remux_args)
        except OSError as e:  # ffmpeg could not be started: the remux at the end will do
            log.warning("the live MP3 remux could not start (%s); the book is remuxed at the end", e)

    def _feed_remux(self, frames: bytes) -> None:
        """The live remux is a shortcut: if it fails, the book is remuxed from ``path`` at
        the end, as without it."""
        if self._remux is None:
            return
        try:
            self._remux.write(frames)
        except FFmpegError as e:
            log.warning("the live MP3 remux failed (%s); the book is remuxed at the end", e)
            self._remux.abort()
            self._remux = None

    @property
    def remuxed(self) -> Path | None:
        """The MP3 file with the whole track under a header, but no chapters yet (after
        ``close``), if ``remux_to`` was given and the live remux completed; else None."""
        return self._remux_args[0] if self._remuxed else None

    def _encode_now(self, seg: _Segment, gapless: bool) -> None:
        """One segment. ``gapless`` (the book is this one segment): with LAME's header, as
        a single stream would be; else pure frames, counted."""
        frames_only = [] if gapless else ["-write_xing", "0", "-id3v2_version", "0"]
        run_ffmpeg(
            ["-v", "error", "-y", "-f", "f32le", "-ar", str(self.sample_rate), "-ac", "1", "-i", ff_path(seg.pcm),
             *encode_args(".mp3", self.opts), *frames_only, "-f", "mp3", ff_path(seg.mp3)],
            what=f"encoding part {seg.mp3.stem} of {self.path.name}",
        )
        seg.pcm.unlink()
        seg.frames_s = seg.samples / self.sample_rate if gapless else _frames_seconds(seg.mp3)

    def close(self) -> None:
        """Encode what is left, wait for every segment, join them into ``path``."""
        if len(self.segments) > 1 and self.segments[-1].samples == 0:  # cut at the very end: nothing left
            self._file.close()
            self.segments.pop().pcm.unlink()
        else:
            self._submit(gapless=len(self.segments) == 1)
        try:
            for seg in self.segments:
                seg.job.result()  # raises the segment's FFmpegError
            if len(self.segments) == 1:  # gapless: the one segment is the track
                os.replace(self.segments[0].mp3, self.path)
            else:
                self._join_ready()  # the segments the encoders' threads did not join yet
                if self._join_error is not None:
                    raise self._join_error
                assert self._joined == len(self.segments), "every segment is encoded, none gapless"
                self._out.close()
                if self._remux is not None:
                    try:
                        self._remux.close()
                        self._remuxed = True
                    except FFmpegError as e:
                        log.warning("the live MP3 remux failed (%s); the book is remuxed at the end", e)
                        self._remux.abort()
                    self._remux = None
        except OSError as e:  # joining: a full disk, most likely
            self.abort()
            raise StoreError(f"cannot write the track {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        self._pool.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def frames_only(self) -> bool:
        """Whether ``path`` is bare MP3 frames (after ``close``): several segments, joined; a
        book of one segment is encoded with its header (gapless)."""
        return len(self.segments) > 1

    @property
    def out_rate(self) -> int:
        return self.opts.sample_rate or self.sample_rate

    @property
    def duration_s(self) -> float:
        """Length of the joined file as decoders play it (after ``close``)."""
        frames = sum(seg.frames_s for seg in self.segments)
        return frames if len(self.segments) == 1 else frames - DECODER_DELAY / self.out_rate

    def output_time(self, written_s: float) -> float:
        """Where a time of the written track plays in the joined file (after ``close``); the
        start stays at 0. One segment (gapless): the same time."""
        s = round(written_s * self.sample_rate)
        if len(self.segments) == 1 or s == 0:
            return written_s
        seg = next(g for g in reversed(self.segments) if g.written_start <= s)
        return seg.out_start_s + (s - seg.written_start) / self.sample_rate

    def abort(self) -> None:
        """Stop: pending segments are dropped, running ones finish, every file is removed."""
        self._aborted = True
        with contextlib.suppress(Exception):
            self._file.close()
        with self._join_lock, contextlib.suppress(Exception):
            if self._out is not None:
                self._out.close()
            if self._remux is not None:
                self._remux.abort()
                self._remux = None
            if self._remuxed:  # closed, then given up (the caller's error)
                self._remux_args[0].unlink(missing_ok=True)
                self._remuxed = False
        # a running encode is not waited for: its files go with the directory
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.path.unlink(missing_ok=True)


def _frames_seconds(mp3: Path) -> float:
    """Duration of every frame of ``mp3`` (no header trims them): the sum of the packet
    durations ffmpeg's ``framecrc`` muxer lists, in the time base it states."""
    out = run_ffmpeg(["-v", "error", "-i", ff_path(mp3), "-c", "copy", "-f", "framecrc", "-"], what=f"reading {mp3.name}")
    num = den = None
    total = 0
    for line in out.decode("ascii", "replace").splitlines():
        if line.startswith("#tb 0:"):
            num, den = (int(x) for x in line.split(":", 1)[1].strip().split("/"))
        elif line and not line.startswith("#"):
            total += int(line.split(",")[3])
    if num is None:
        raise FFmpegError(f"reading {mp3.name} failed: no time base in ffmpeg's packet list")
    return total * num / den

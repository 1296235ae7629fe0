"""Encoding the stitched track into the user's format, and decoding any audio file back.

Everything streams through ffmpeg from files on disk, so a 10-hour book is never held in
Python memory. Outputs appear atomically: ffmpeg writes a hidden temporary file next to
``out``, which is fsynced and renamed over ``out`` only when complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from ..config import ExportOptions
from ..errors import InputError
from .ffmpeg import FFmpegError, stderr_tail, ff_path, ffmpeg_exe, probe, run_ffmpeg, starting_ffmpeg

__all__ = [
    "SUPPORTED_FORMATS",
    "FFmpegError",
    "check_writable_output",
    "decode_audio",
    "encode",
    "ffmpeg_exe",
    "probe_duration",
    "run_ffmpeg",
    "StreamEncoder",
    "finish_stream",
    "FramesRemux",
    "add_chapters",
    "sync_file",
]

SUPPORTED_FORMATS = {".wav", ".flac", ".mp3", ".m4a", ".m4b", ".ogg"}

# extension -> (ffmpeg muxer, codec arguments). The muxer is named with -f so the temporary
# file's name does not matter. WAV/FLAC are 16-bit: universally playable, half the size of
# float, and far below the model's noise floor. "-rf64 auto" switches to RF64 past 4 GiB.
_MUXERS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".m4a": "ipod", ".m4b": "ipod", ".ogg": "ogg"}
# Containers whose chapter marks ffmpeg writes (MP4 chapter track, ID3v2 CHAP frames).
_CHAPTER_FORMATS = {".m4a", ".m4b", ".mp3"}


def _codec_args(ext: str, opts: ExportOptions) -> list[str]:
    if ext == ".wav":
        return ["-c:a", "pcm_s16le"]
    if ext == ".flac":
        return ["-c:a", "flac", "-sample_fmt", "s16"]
    if ext == ".mp3":
        return ["-c:a", "libmp3lame", "-b:a", opts.mp3_bitrate]
    if ext in (".m4a", ".m4b"):
        return ["-c:a", "aac", "-b:a", opts.aac_bitrate]
    return ["-c:a", "libvorbis", "-q:a", "5"]  # .ogg: ExportOptions has no Vorbis bitrate


def encode_args(ext: str, opts: ExportOptions) -> list[str]:
    """ffmpeg's output arguments for audio in ``ext``'s format: codec, then the output rate."""
    return [*_codec_args(ext, opts), *(["-ar", str(opts.sample_rate)] if opts.sample_rate else [])]


def _mux_args(ext: str) -> list[str]:
    if ext == ".wav":
        return ["-rf64", "auto"]
    if ext in (".m4a", ".m4b"):
        return ["-movflags", "+faststart"]  # the index first: players start before reading it all
    return []


def _extension(out: Path) -> str:
    ext = out.suffix.lower()
    if ext not in SUPPORTED_FORMATS:
        raise InputError(
            f"{out}: unsupported output format {ext or '(no extension)'}; "
            f"use one of {', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    return ext


def check_writable_output(out: Path) -> None:
    """Fail early, before any synthesis, if ``out`` could not be written."""
    out = Path(out)
    _extension(out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory; name an output file")
    parent = out.parent
    if not parent.exists():
        raise InputError(f"{out}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: output directory {parent} is not writable")


def _escape_meta(value: str) -> str:
    # FFMETADATA: '=', ';', '#', '\' and newlines must be backslash-escaped; titles stay one line
    value = " ".join(str(value).split())
    return re.sub(r"([=;#\\])", r"\\\1", value)


def _chapter_spans(chapters: Sequence[tuple[str, float]], total_s: float) -> list[tuple[int, int, str]]:
    """(start ms, end ms, title) of each chapter: a chapter ends where the next begins, the
    last at ``total_s``; empty ones (no audio) are left out, they would confuse players."""
    marks = sorted((max(0.0, float(s)), t) for t, s in chapters)
    spans = []
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else total_s
        start_ms, end_ms = round(start * 1000), round(min(end, total_s) * 1000)
        if end_ms > start_ms:
            spans.append((start_ms, end_ms, name))
    return spans


def _ffmetadata(chapters: Sequence[tuple[str, float]], title: str | None, total_s: float, artist: str | None = None) -> str:
    lines = [";FFMETADATA1"]
    if title:
        lines.append(f"title={_escape_meta(title)}")
    if artist:  # the book's author: players show it as the artist
        lines.append(f"artist={_escape_meta(artist)}")
    for start_ms, end_ms, name in _chapter_spans(chapters, total_s):
        lines += ["[CHAPTER]", "TIMEBASE=1/1000", f"START={start_ms}", f"END={end_ms}", f"title={_escape_meta(name)}"]
    return "\n".join(lines) + "\n"


def sync_file(path: Path) -> None:
    """Make ``path`` durable (a file before it is renamed over an output; a directory after)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and directories on some OSes) refuse fsync
        pass
    finally:
        os.close(fd)


def encode(
    track_wav: Path,
    out: Path,
    opts: ExportOptions = ExportOptions(),
    chapters: Sequence[tuple[str, float]] = (),
    title: str | None = None,
    artist: str | None = None,
) -> None:
    """Encode the stitched WAV ``track_wav`` into ``out``; the format follows ``out``'s extension.

    ``chapters`` are (title, start seconds) marks written to .m4b/.m4a/.mp3. On any failure
    neither ``out`` nor a temporary file is left behind (an existing ``out`` is untouched).
    """
    track_wav = Path(track_wav)
    ext = _extension(Path(out))
    if not track_wav.is_file():
        raise InputError(f"{track_wav}: stitched track not found")
    _ffmpeg_into(track_wav, Path(out), encode_args(ext, opts), chapters, title,
                 lambda: sf.info(str(track_wav)).duration, what="encoding", artist=artist)


def _ffmpeg_into(source: Path, out: Path, codec: list[str], chapters, title, total_s, what: str, artist: str | None = None) -> None:
    """ffmpeg ``source`` -> ``out`` with ``codec`` arguments, chapters and title (``total_s()``
    gives the length the last chapter ends at), atomically: written beside ``out`` under a
    temporary name, renamed over it only when complete; nothing is left behind on failure."""
    ext = _extension(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{ext}")
    meta = out.with_name(f".{out.name}.tmp-{os.getpid()}.ffmeta")
    args = ["-v", "error", "-y", "-i", ff_path(source)]
    map_args = ["-map", "0:a:0"]
    try:
        if chapters or title or artist:
            meta.write_text(_ffmetadata(chapters, title, total_s(), artist), encoding="utf-8")
            args += ["-f", "ffmetadata", "-i", ff_path(meta)]
            map_args += ["-map_metadata", "1", "-map_chapters", "1" if ext in _CHAPTER_FORMATS else "-1"]
        run_ffmpeg([*args, *map_args, *codec, *_mux_args(ext), "-f", _MUXERS[ext], ff_path(tmp)], what=f"{what} {out.name}")
        if ext == ".mp3" and len(chapters) > _ID3_TOC_MAX:
            _nest_id3_toc(tmp)
        _publish(tmp, out)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial output
        tmp.unlink(missing_ok=True)
        raise
    finally:
        meta.unlink(missing_ok=True)


def _publish(tmp: Path, out: Path) -> None:
    """Make the finished ``tmp`` durable and rename it over ``out``."""
    sync_file(tmp)
    os.replace(tmp, out)
    sync_file(out.parent)  # make the rename itself durable


class _PipedFFmpeg:
    """An ffmpeg process writing ``path`` from what is fed to its stdin (``cmd`` reads pipe:0).

    ``_feed`` raises FFmpegError (with ffmpeg's complaint) if ffmpeg has died, e.g. of a full
    disk; ``close`` waits for ffmpeg and raises likewise; ``abort`` kills it and removes ``path``.
    """

    _what = "encoding"  # what the error line says failed

    def _start(self, cmd: list[str], path: Path) -> None:
        import tempfile

        self.path = Path(path)
        # stderr to a file, not a pipe: a pipe nobody reads while we write stdin could fill and
        # deadlock both processes
        self._stderr = tempfile.TemporaryFile()
        with starting_ffmpeg():
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def _failed(self) -> FFmpegError:
        self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        return FFmpegError(f"{self._what} {self.path.name} failed: {stderr_tail(self._stderr.read())}")

    def _feed(self, data: bytes) -> None:
        try:
            self._proc.stdin.write(data)
        except OSError:  # a broken pipe: ffmpeg is gone
            raise self._failed() from None

    def close(self) -> None:
        """Finish the file; raises FFmpegError if ffmpeg failed."""
        try:
            self._proc.stdin.close()
        except OSError:
            raise self._failed() from None
        if self._proc.wait() != 0:
            raise self._failed()
        self._stderr.close()

    def abort(self) -> None:
        """Stop ffmpeg and remove what it wrote."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        self._stderr.close()
        self.path.unlink(missing_ok=True)


class StreamEncoder(_PipedFFmpeg):
    """ffmpeg encoding mono float PCM as it is written, into ``path`` in ``ext``'s format.

    The book's track is encoded while its later chunks are still being rendered: the stitcher
    writes each chunk as soon as it is its turn, and ffmpeg (a separate process) encodes
    beside the engine. Nothing is held in memory beyond the pipe's buffer. Chapters and the
    title are added afterwards by :func:`finish_stream`, which copies the encoded audio.

    ``write`` raises FFmpegError (with ffmpeg's complaint) if ffmpeg has died, e.g. of a full
    disk; ``close`` waits for ffmpeg and raises likewise; ``abort`` kills it and removes ``path``.
    ``cut``, ``output_time`` and ``duration_s`` are the track's side of the sink interface it
    shares with :class:`~ttsbatch.audio.segments.SegmentedEncoder`: one gapless stream has
    nothing to cut, and its times are the written track's.
    """

    def __init__(self, path: Path, ext: str, sample_rate: int, opts: ExportOptions = ExportOptions()):
        self.sample_rate = sample_rate
        self.samples = 0
        ext = _extension(Path("x" + ext))
        self._start([ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-y",
                     "-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", "pipe:0",
                     # faststart is left to finish_stream (it rewrites the file anyway)
                     *encode_args(ext, opts), *([] if ext in (".m4a", ".m4b") else _mux_args(ext)),
                     "-f", _MUXERS[ext], ff_path(Path(path))], path)

    def write(self, wav: np.ndarray) -> None:
        data = np.ascontiguousarray(wav, dtype="<f4")
        self._feed(data.tobytes())
        self.samples += len(data)

    def cut(self) -> None:
        """A silent point: nothing to do for one stream."""

    def output_time(self, written_s: float) -> float:
        return written_s

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


def finish_stream(
    encoded: Path,
    out: Path,
    chapters: Sequence[tuple[str, float]] = (),
    title: str | None = None,
    total_s: float | None = None,
    artist: str | None = None,
) -> None:
    """``out`` from the audio a StreamEncoder wrote to ``encoded``, plus chapters, title and artist.

    The audio is copied, not re-encoded (seconds for a 10-hour book). Atomic like ``encode``.
    """
    encoded = Path(encoded)
    _ffmpeg_into(encoded, Path(out), ["-c", "copy"], chapters, title,
                 lambda: total_s if total_s is not None else probe_duration(encoded), what="writing", artist=artist)


def decode_audio(
    path: Path, sr: int | None = None, start_s: float = 0.0, duration_s: float | None = None
) -> tuple[np.ndarray, int]:
    """Decode (a window of) any audio file ffmpeg reads to mono float32 at ``sr`` (native if None).

    Returns ``(wav, sample_rate)``. Meant for voice references and verification windows,
    not whole books: the result is held in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such audio file")
    rate = sr or probe(path).sample_rate  # probe also rejects non-audio files with a clear line
    args = ["-v", "error"]
    if start_s > 0:
        args += ["-ss", f"{start_s:.6f}"]  # before -i: fast seek, accurate for decoded audio
    args += ["-i", ff_path(path)]
    if duration_s is not None:
        args += ["-t", f"{duration_s:.6f}"]
    args += ["-map", "0:a:0", "-f", "f32le", "-ac", "1", "-ar", str(rate), "-"]
    raw = run_ffmpeg(args, what=f"decoding {path.name}")
    wav = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # copy: writable, native order
    if wav.size == 0 and start_s == 0:
        raise InputError(f"{path}: contains no audio samples")
    return wav, rate


_TIME = re.compile(r"time=(\d+):(\d+):(\d+(?:\.\d+)?)")


def probe_duration(path: Path) -> float:
    """Duration in seconds: exact from the header for WAV/FLAC, else from ffmpeg's banner,
    else (no duration in the container) by decoding to nowhere and reading ffmpeg's clock."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such audio file")
    if path.suffix.lower() in (".wav", ".flac"):
        try:
            return sf.info(str(path)).duration
        except (RuntimeError, sf.LibsndfileError):
            pass  # e.g. a WAV codec libsndfile lacks: ffmpeg below
    p = probe(path)
    if p.duration_s is not None:
        return p.duration_s
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", ff_path(path), "-map", "0:a:0", "-f", "null", "-"]
    with starting_ffmpeg():
        stderr = subprocess.run(cmd, capture_output=True).stderr
    times = _TIME.findall(stderr.decode("utf-8", "replace"))
    if not times:
        raise InputError(f"{path}: cannot determine its duration")
    h, m, s = times[-1]
    return int(h) * 3600 + int(m) * 60 + float(s)


class FramesRemux(_PipedFFmpeg):
    """ffmpeg copying bare MP3 frames (no ID3 or Xing header: segments joined by
    :class:`~ttsbatch.audio.segments.SegmentedEncoder`) from a pipe into ``out``, under the
    header :func:`finish_stream` would give them, as the frames come.

    ``finish_stream`` remuxes a finished file: for a 2-hour book ffmpeg reads and writes
    119 MB in ~2 s (2.1 s on the dev machine, most of it ffmpeg's own reading) while nothing
    else is left to do. Fed while the book renders, the same copy costs the book nothing at its
    end: ``close`` lets ffmpeg write the Xing header (frame count, seek table, the audio's CRC;
    the byte-identical header and frames of ``finish_stream``'s output), and
    :func:`add_chapters` then writes the chapters, unknown until the end, into the ID3 tag's
    padding, which ``padding`` bytes reserve. ``title`` is written now.
    """

    _what = "writing"

    def __init__(self, out: Path, title: str | None = None, padding: int = 4096, artist: str | None = None):
        meta = [*(["-metadata", f"title={title}"] if title else []), *(["-metadata", f"artist={artist}"] if artist else [])]
        self._start([ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-y", "-f", "mp3", "-i", "pipe:0",
                     "-map", "0:a:0", "-c", "copy", *meta, "-id3v2_version", "4",
                     "-metadata_header_padding", str(max(10, int(padding))), "-f", "mp3", ff_path(Path(out))], out)

    def write(self, frames: bytes) -> None:
        self._feed(frames)


def chapter_tag_bytes(titles: Sequence[str]) -> int:
    """ID3 bytes that chapters of these titles take (an upper bound): the padding to reserve
    so that :func:`add_chapters` writes them in place."""
    return 64 + sum(64 + len(t.encode("utf-8")) for t in titles)


# An ID3v2 table of contents (CTOC) counts its entries in one byte; ffmpeg's MP3 muxer writes
# the number of chapters into it regardless, so a book of 300 chapters got a table saying 44.
_ID3_TOC_MAX = 255


def _nest_id3_toc(mp3: Path, padding: int | None = None) -> None:
    """Give ``mp3``'s ID3v2 tag a table of contents that holds all of its chapters.

    Up to 255 chapters, ffmpeg's own table is right and is kept. Past that the chapters go
    into tables of at most 255 entries, listed by the top-level table, as the ID3v2 chapter
    addendum provides (players that read the CHAP frames alone see every chapter either way).
    ``padding``: the tag's padding in bytes (mutagen's default if None).
    """
    from mutagen.id3 import CTOC, ID3, CTOCFlags

    tag = ID3(str(mp3))
    chaps = sorted(tag.getall("CHAP"), key=lambda f: f.start_time)
    if len(chaps) <= _ID3_TOC_MAX:
        return
    tag.delall("CTOC")
    level, n = [c.element_id for c in chaps], 0
    while len(level) > _ID3_TOC_MAX:
        parents = []
        for i in range(0, len(level), _ID3_TOC_MAX):
            parents.append(f"toc{n}")
            tag.add(CTOC(element_id=f"toc{n}", flags=CTOCFlags.ORDERED, child_element_ids=level[i : i + _ID3_TOC_MAX], sub_frames=[]))
            n += 1
        level = parents
    tag.add(CTOC(element_id="toc", flags=CTOCFlags.TOP_LEVEL | CTOCFlags.ORDERED, child_element_ids=level, sub_frames=[]))
    tag.save(str(mp3), v2_version=4, padding=None if padding is None else (lambda info: padding))


def _id3_tag(mp3: Path, meta: Path, padding: int) -> bytes:
    """The ID3v2 tag ffmpeg's MP3 muxer writes for ``mp3``'s audio with the ffmetadata file
    ``meta`` and ``padding`` bytes of padding (ffmpeg copies one frame: the tag is what counts)."""
    from mutagen.id3 import ID3

    tiny = meta.with_suffix(".mp3")
    try:
        run_ffmpeg(["-v", "error", "-y", "-i", ff_path(mp3), "-f", "ffmetadata", "-i", ff_path(meta),
                    "-map", "0:a:0", "-map_metadata", "1", "-map_chapters", "1", "-c", "copy", "-frames:a", "1",
                    "-write_xing", "0", "-id3v2_version", "4", "-metadata_header_padding", str(padding),
                    "-f", "mp3", ff_path(tiny)], what=f"writing the chapters of {mp3.name}")
        _nest_id3_toc(tiny, padding)
        return tiny.read_bytes()[: ID3(str(tiny)).size]
    finally:
        tiny.unlink(missing_ok=True)


def add_chapters(path: Path, chapters: Sequence[tuple[str, float]], title: str | None, total_s: float,
                 artist: str | None = None) -> bool:
    """Put ``chapters`` ((title, start seconds), the last ending at ``total_s``) into the ID3v2
    tag of the MP3 ``path``, in place: the tag ffmpeg writes for them (as :func:`finish_stream`
    would: the same ffmetadata) is made exactly as long as ``path``'s tag with its padding
    and written over it, so the audio after it is not moved. False (``path`` untouched) if
    the tag's padding is too small for them (:class:`FramesRemux` reserves it)."""
    from mutagen.id3 import ID3

    if not _chapter_spans(chapters, total_s):
        return True
    path = Path(path)
    size = ID3(str(path)).size  # the header's 10 bytes included
    meta = path.with_name(f".{path.name}.chapters-{os.getpid()}.ffmeta")
    try:
        meta.write_text(_ffmetadata(chapters, title, total_s, artist), encoding="utf-8")
        least = len(_id3_tag(path, meta, padding=10))  # ffmpeg pads at least 10 bytes
        if least > size:
            return False
        tag = _id3_tag(path, meta, padding=10 + size - least)
    finally:
        meta.unlink(missing_ok=True)
    if len(tag) != size:  # never write a tag over audio
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, tag, 0)
    finally:
        os.close(fd)
    return True

"""The book's track, stitched and encoded while the engine is still rendering.

Chunks are stored in whatever order the engine finishes them; the track needs them in
document order. :class:`BookTrack` keeps a cursor into the plan: each time a chunk is
stored it is told so (:meth:`stored`), and it appends every chunk from the cursor on that is
now in the store (trimmed, faded, paused, as :class:`~ttsbatch.audio.stitch.TrackWriter`
does) to a :class:`~ttsbatch.audio.export.StreamEncoder`, so ffmpeg encodes beside the GPU
instead of after it. A 2-hour book's MP3 encode alone took 45 s on the GPU machine's CPU.
On a machine with cores to spare (8 or more), MP3 (LAME is single-threaded, and on the GPU
machine slower than the engine) goes to a :class:`~ttsbatch.audio.segments.SegmentedEncoder`
instead, cut after paragraph and chapter pauses into segments that several ffmpeg processes
encode at once; with fewer cores one streaming encoder is as fast, and gapless throughout.

``background=True`` (the GPU case) does the stitching on a thread of its own; otherwise it
happens inline in :meth:`stored` (on the CPU a second busy thread would slow the engine).
Either way only the chunk being stitched is in memory, and :meth:`finish` stitches whatever
is left (the store is listed once more, so a missed notice cannot lose a chunk).

The fast engine finishes chunks out of document order (T3 decodes 256 at once, each as long
as it is; S3Gen vocodes a collection of them by length), so a third of a book's chunks
(475-504 of 1,608, H200, twentieth session) are still to append when the engine ends: the
cursor waits for long chunks that finish late. ``prepare_ahead`` chunks stored ahead of the cursor are then read and
trimmed and faded on threads of their own as they come (:func:`prepare_chunk`, which
depends on nothing but the chunk), so what is left at the end is writing them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .audio import segments
from .audio.export import StreamEncoder, chapter_tag_bytes
from .audio.segments import SegmentedEncoder
from .audio.stitch import TrackWriter, prepare_chunk
from .config import Options
from .plan import PlannedChunk
from .store import ChunkStore, StoreError
from .text import Document


class BookTrack:
    """``with BookTrack(...) as track: run(..., on_stored=track.stored); chapters, s = track.finish()``.

    Leaving the block without :meth:`finish` (an error, an interrupt) aborts: ffmpeg is
    killed and the partial file removed.
    """

    def __init__(
        self,
        plan: list[PlannedChunk],
        doc: Document,
        store: ChunkStore,
        options: Options,
        encoded: Path,
        ext: str,
        background: bool = False,
        remux_to: Path | None = None,
        prepare_ahead: int = 0,
    ):
        """``remux_to``: where an MP3 track encoded in segments is copied under its header as
        it is joined (:class:`SegmentedEncoder`); :attr:`remuxed` then names it.
        ``prepare_ahead``: at most this many chunks stored ahead of the cursor are prepared
        (read, trimmed, faded) and held in memory meanwhile (with ``background``)."""
        if not plan:
            raise ValueError("a track needs at least one chunk")
        self.plan, self.doc, self.store, self.options = plan, doc, store, options
        self.encoded, self.ext = Path(encoded), ext
        self.remux_to = remux_to
        self._next = 0  # plan index of the next chunk to append
        self._chapter = None
        self._ready = store.ids()  # ids known to be in the store
        self._cond = threading.Condition()
        self._stop = False  # set by finish (stitch the rest, then end) and by abort
        self._error: BaseException | None = None
        self._encoder: StreamEncoder | None = None
        self._writer: TrackWriter | None = None
        self._finished = False
        # id -> future of (prepared samples, rate), for chunks stored ahead of the cursor
        self._prepared: dict[str, Future] = {}
        self._prepare_ahead = prepare_ahead if background else 0
        self._preparers = ThreadPoolExecutor(4, thread_name_prefix="ttsbatch-prepare") if self._prepare_ahead else None
        self.finish_seconds: dict[str, float] = {}
        self.finish_appended = 0  # chunks that were left to append when finish began
        self._thread = threading.Thread(target=self._loop, name="ttsbatch-track", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()
        else:
            self._advance()

    @property
    def stitched(self) -> int:
        """Chunks of the plan appended to the track so far."""
        return self._next

    # -- the engine's side ------------------------------------------------------------------

    def stored(self, planned: PlannedChunk) -> None:
        """Chunk ``planned`` is in the store now (cheap; inline mode stitches what it can)."""
        with self._cond:
            self._ready.add(planned.id)
            if (self._preparers is not None and len(self._prepared) < self._prepare_ahead and not self._stop
                    and planned.id not in self._prepared and self._next < len(self.plan)
                    and self.plan[self._next].id != planned.id):
                self._prepared[planned.id] = self._preparers.submit(self._prepare, planned.id)
            self._cond.notify()
        if self._thread is None:
            self._advance()
        elif self._error is not None:  # fail the run early, not at the end
            raise self._error

    @property
    def frames_only(self) -> bool:
        """Whether the encoded file (after ``finish``) is bare MP3 frames (the segment encoders'
        join of several segments: no ID3 or Xing header), which a ``-c copy`` remux copies
        unchanged to the end of its output."""
        return isinstance(self._encoder, SegmentedEncoder) and self._encoder.frames_only

    @property
    def remuxed(self) -> Path | None:
        """After :meth:`finish`: ``remux_to`` if it holds the whole track under an MP3 header
        with the title (chapters to add: :func:`~ttsbatch.audio.export.add_chapters`), else None."""
        return getattr(self._encoder, "remuxed", None)

    def finish(self) -> tuple[list[tuple[str, float]], float]:
        """Append the rest, close the encoder; returns (chapters, track seconds).
        ``finish_seconds`` then says where the time went: appending what was left (reading
        it from the store, stitching, spooling) and the encoder's close (the last encodes
        and the join)."""
        t0 = time.perf_counter()
        with self._cond:
            before = self._next
            self._ready |= self.store.ids()
            self._stop = True
            self._cond.notify()
            if isinstance(self._encoder, SegmentedEncoder):
                self._encoder.hurry()  # the engine is done: the cores are the encoders' now
        if self._thread is not None:
            self._thread.join()
        else:
            self._advance()
        if self._error is not None:
            raise self._error
        if self._next < len(self.plan):
            missing = self.plan[self._next]
            raise StoreError(f"chunk {missing.chunk.index + 1} ({missing.id}) is not in the store; run again to render it")
        t1 = time.perf_counter()
        self.finish_appended = self._next - before
        self._close_preparers()
        self._writer.close()  # closes the encoder: waits for ffmpeg
        self.finish_seconds = {"append": t1 - t0, "encode": time.perf_counter() - t1}
        self._finished = True
        enc = self._encoder  # times in the encoded file (segments add their encoder delays)
        return [(title, enc.output_time(t)) for title, t in self._writer.chapters], enc.duration_s

    def _prepare(self, id: str):
        wav, sr = self.store.get(id)
        return prepare_chunk(wav, sr, self.options.stitch), sr

    def _close_preparers(self) -> None:
        if self._preparers is not None:
            self._preparers.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            self._prepared.clear()

    def abort(self) -> None:
        with self._cond:
            self._stop = True
            self._ready = set()  # nothing more to append
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._close_preparers()
        if self._encoder is not None:
            self._encoder.abort()
        else:
            self.encoded.unlink(missing_ok=True)

    def __enter__(self) -> BookTrack:
        return self

    def __exit__(self, *exc) -> None:
        if not self._finished:
            self.abort()

    # -- stitching ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._next_is_ready():
                    self._cond.wait()
                if not self._next_is_ready():
                    return  # stopped, and nothing more can be appended
            try:
                self._advance()
            except BaseException as e:  # handed to the engine's thread by stored() / finish()
                self._error = e
                return

    def _chapter_title(self, k: int) -> str | None:
        """Chapter ``k``'s mark: its heading, else the book's name for the first, "Part N" after
        (TrackWriter names a blank one "Chapter N")."""
        return self.doc.chapters[k].title or (self.doc.display_title if k == 0 else f"Part {k + 1}")

    def _next_is_ready(self) -> bool:
        return self._next < len(self.plan) and self.plan[self._next].id in self._ready

    def _advance(self) -> None:
        """Append every chunk from the cursor on that is in the store."""
        while True:
            with self._cond:
                if not self._next_is_ready():
                    return
                p = self.plan[self._next]
                ahead = self._prepared.pop(p.id, None)
            if ahead is not None:
                wav, sr = ahead.result()  # its StoreError, if any, as store.get's
            else:
                wav, sr = self.store.get(p.id)
                wav = prepare_chunk(wav, sr, self.options.stitch)
            if self._writer is None:
                if self.ext == ".mp3" and segments.default_workers() > 1:
                    # the tag's padding holds the chapters (their times are known at the end)
                    titles = [self._chapter_title(k) or f"Chapter {k + 1}" for k in range(len(self.doc.chapters))]
                    encoder = SegmentedEncoder(self.encoded, sr, self.options.export, segment_s=segments.SEGMENT_S,
                                               remux_to=self.remux_to, title=self.doc.display_title,
                                               header_padding=chapter_tag_bytes(titles), artist=self.doc.author)
                    with self._cond:  # finish may be hurrying already
                        self._encoder = encoder
                        if self._stop:
                            encoder.hurry()
                else:
                    self._encoder = StreamEncoder(self.encoded, self.ext, sr, self.options.export)
                self._writer = TrackWriter(None, sr, self.options.stitch, sink=self._encoder)
            if p.chunk.chapter != self._chapter:
                self._chapter = p.chunk.chapter
                self._writer.start_chapter(self._chapter_title(p.chunk.chapter))
            self._writer.add_prepared(wav, p.chunk.boundary)
            if p.chunk.boundary in ("paragraph", "chapter"):
                self._encoder.cut()  # after the pause: a silent place for a segment to end
            self._next += 1

"""The book's track in a process of its own, beside a GPU engine.

:class:`~ttsbatch.track.BookTrack` stitches and encodes on a thread of the run's process. Its
Python (reading each chunk's FLAC, trimming, fading, spooling, the encoders' bookkeeping)
then shares one GIL with the engine's launching threads: each of its many GIL hand-overs
per chunk can wait a switch interval (5 ms) for them, so it falls behind the engine, and
each costs them the same wait. The nineteenth session measured what that sharing costs
with Perth: out of the process, S3Gen's launches took 7.6 s less of a 2-hour book.

:class:`TrackProcess` runs the same ``BookTrack`` in a spawned child with a GIL of its own.
The work is file-based already (chunks from the store, spool and MP3 files beside the
output), so the child needs only the plan and the ids of the chunks stored: one small pipe
write on the engine's side per ``SEND_EVERY`` of them. Its result is the thread's, byte for
byte. With cores and a GIL to spare, the child also prepares the chunks stored ahead of the
track's cursor (``PREPARE_AHEAD``), which a thread in the run's process would pay for in
the engine's GIL.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from pathlib import Path

from .config import Options
from .plan import PlannedChunk
from .store import ChunkStore, StoreError
from .text.document import Document

# Chunks stored ahead of the track's cursor that the child prepares meanwhile (BookTrack's
# prepare_ahead): ~340 MB at the mean chunk of bench/book.txt, in the child's memory.
PREPARE_AHEAD = 768
# Ids sent to the child at once: each send and each look for its errors is a system call,
# a GIL hand-over on the engine's side. The track lags by at most this many chunks (ms of work).
SEND_EVERY = 16


def _serve(conn) -> None:
    """The child: a threaded BookTrack made from the first message and fed the ids the pipe
    brings, until finish or abort."""
    import signal

    from .track import BookTrack

    # Ctrl-C reaches the whole process group: the run decides (it unwinds and sends "abort",
    # or its end closes the pipe), so the track is never torn down under it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    track = None
    try:
        _, plan, doc, root, options, encoded, ext, remux_to = conn.recv()
        by_id = {p.id: p for p in plan}
        track = BookTrack(plan, doc, ChunkStore(root), options, encoded, ext, background=True, remux_to=remux_to,
                          prepare_ahead=PREPARE_AHEAD)
        while True:
            msg = conn.recv()
            if msg[0] == "stored":
                for id in msg[1]:
                    track.stored(by_id[id])  # raises the stitcher's error early
            elif msg[0] == "finish":
                chapters, seconds = track.finish()
                conn.send(("done", chapters, seconds, track.frames_only, track.remuxed, track.finish_seconds,
                           track.finish_appended))
                return
            else:  # "abort"
                track.abort()
                conn.send(("aborted",))
                return
    except BaseException as e:  # EOFError: the run's process is gone
        if track is not None:
            with contextlib.suppress(BaseException):
                track.abort()
        with contextlib.suppress(BaseException):
            conn.send(("error", e))


class TrackProcess:
    """``BookTrack``'s interface (see there), its work done in a spawned process."""

    def __init__(
        self,
        plan: list[PlannedChunk],
        doc: Document,
        store: ChunkStore,
        options: Options,
        encoded: Path,
        ext: str,
        remux_to: Path | None = None,
    ):
        if not plan:
            raise ValueError("a track needs at least one chunk")
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds a CUDA context
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="ttsbatch-track", daemon=True)
        self._proc.start()
        child.close()
        # The plan (~0.5 MB for a 2-hour book) waits in the pipe until the child has imported
        # its modules (~0.6 s on the H200's host): a thread hands it over, the run goes on.
        start = ("start", plan, doc, store.root, options, Path(encoded), ext, remux_to)
        self._sender: threading.Thread | None = threading.Thread(
            target=self._send_start, args=(start,), name="ttsbatch-track-start", daemon=True)
        self._sent_error: BaseException | None = None
        self._sender.start()
        self._done = False
        self._pending: list[str] = []  # ids stored, not yet sent
        self._error: BaseException | None = None
        self.frames_only = False
        self.remuxed: Path | None = None
        self.finish_seconds: dict[str, float] = {}
        self.finish_appended = 0

    def _send_start(self, start: tuple) -> None:
        try:
            self._conn.send(start)
        except BaseException as e:  # raised by the next _send
            self._sent_error = e

    def _reply(self) -> tuple:
        """The child's next message; its death is one clear error."""
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise StoreError(f"the track's process ended unexpectedly (exit code {self._proc.exitcode})") from None

    def _raise_early(self) -> None:
        """A failure the child reported while it stitched: raised now, not at the end."""
        if self._error is None and self._conn.poll():
            msg = self._reply()
            self._error = msg[1] if msg[0] == "error" else StoreError(f"the track's process said {msg[0]!r}")
        if self._error is not None:
            raise self._error

    def stored(self, planned: PlannedChunk) -> None:
        """Chunk ``planned`` is in the store now."""
        self._pending.append(planned.id)
        if len(self._pending) >= SEND_EVERY:
            self._send_pending()

    def _send_pending(self) -> None:
        self._raise_early()
        if self._pending:
            self._send(("stored", tuple(self._pending)))
            self._pending = []

    def _send(self, msg: tuple) -> None:
        if self._sender is not None:  # one writer on the pipe at a time: the plan first
            self._sender.join()
            self._sender = None
        try:
            if self._sent_error is not None:
                raise OSError(str(self._sent_error))
            self._conn.send(msg)
        except OSError:  # the child is gone; its reason, if it sent one, is in the pipe
            self._raise_early()
            raise StoreError("the track's process ended unexpectedly") from None

    def finish(self) -> tuple[list[tuple[str, float]], float]:
        """Append the rest, close the encoder; returns (chapters, track seconds)."""
        self._send_pending()
        self._send(("finish",))
        msg = self._reply()
        if msg[0] == "error":
            self._error = msg[1]
            raise msg[1]
        _, chapters, seconds, self.frames_only, self.remuxed, self.finish_seconds, self.finish_appended = msg
        self._done = True
        self._stop()
        return chapters, seconds

    def _stop(self) -> None:
        self._conn.close()  # a child still waiting for a message gets EOFError: it cleans up and ends
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def abort(self) -> None:
        """Stop the child's encoders and remove what they wrote."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError, EOFError, StoreError):
            self._send(("abort",))
            if self._conn.poll(60):
                self._conn.recv()
        self._stop()

    def __enter__(self) -> TrackProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

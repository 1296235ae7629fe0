#!/usr/bin/env python
"""The track side of a book run without a model: chunks of speech arrive at RATE x real time.

    python scripts/track_tail_sim.py RATE CHUNKS SPEECH.f32
    WORKERS=2 python scripts/track_tail_sim.py 300 400 speech.f32   # force 2 segment encoders
    LATE=0.3 TRACK=process python scripts/track_tail_sim.py 300 400 speech.f32

Each chunk is 4.6 s cut from SPEECH.f32 (mono float32 at 24 kHz, e.g. samples/voice.wav
tiled to 10 minutes), in 6 chapters with paragraph pauses, encoded up front and moved into the store one by one; ``BookTrack``
is told of them at RATE x real time, as the engine would. Prints how long the track needs
after the last one (finish: the encoder's backlog and the join) and for the final remux
with chapters (the chapters written into the live remux's tag where the track was
encoded in segments). BENCHMARKS.md, "MP3 encoding". To compare with an older commit, run it with
that commit's checkout first on PYTHONPATH. ``LATE``: this fraction of the chunks (every
k-th) is told of last, as the fast engine renders the short sentences last; ``TRACK=process``:
the track in a process of its own (``TrackProcess``, which prepares chunks ahead of its
cursor), as a GPU run with ``--track-process``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ttsbatch.audio.export import add_chapters, finish_stream
from ttsbatch.config import GenerationOptions, Options
from ttsbatch.plan import make_plan
from ttsbatch.store import ChunkStore
from ttsbatch.text.document import Chapter, Chunk, Document
from ttsbatch.track import BookTrack
from ttsbatch.track_process import TrackProcess

SR = 24000
CHUNK_S = 4.6  # the mean chunk of bench/book.txt


def main() -> None:
    rate, n, speech = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    if os.environ.get("WORKERS"):  # for a track process too: it reads the environment
        os.environ["TTSBATCH_MP3_ENCODERS"] = os.environ["WORKERS"]
    x = np.fromfile(speech, dtype=np.float32)
    per = n // 6
    doc = Document("book", tuple(Chapter(f"C{k}", ("p",)) for k in range(6)))

    def boundary(i):
        if i == n - 1:
            return "end"
        return "chapter" if (i + 1) % per == 0 else ("paragraph" if i % 3 == 2 else "sentence")

    chunks = [Chunk(index=i, text=f"s{i}", source=f"s{i}", chapter=min(5, i // per), paragraph=i // 3, boundary=boundary(i))
              for i in range(n)]
    plan = make_plan(chunks, "voice", GenerationOptions(), "model")
    work = Path(tempfile.mkdtemp())
    store, staged = ChunkStore(work / "work"), ChunkStore(work / "staged")
    L = int(CHUNK_S * SR)
    for i, p in enumerate(plan):  # encoded up front, moved into the store when "rendered"
        off = (i * 7919) % (len(x) - L)
        staged.put(p.id, x[off : off + L], SR)

    def stored(p):
        store.path(p.id).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path(p.id), store.path(p.id))
        track.stored(p)

    out = work / "out.mp3"
    if os.environ.get("TRACK") == "process":
        track = TrackProcess(plan, doc, store, Options(), work / "enc.tmp", ".mp3", remux_to=out)
    else:
        track = BookTrack(plan, doc, store, Options(), work / "enc.tmp", ".mp3", background=True, remux_to=out)
    late = float(os.environ.get("LATE", "0"))
    every = round(1 / late) if late > 0 else 0
    held = [p for i, p in enumerate(plan) if every and i % every == every - 1]
    t0 = time.time()
    for i, p in enumerate(p for i, p in enumerate(plan) if not every or i % every != every - 1):
        time.sleep(max(0.0, t0 + (i + 1) * CHUNK_S / rate - time.time()))
        stored(p)
    for p in held:  # at once, at the end, as the engine's last collection
        stored(p)
    t_last = time.time()
    chapters, seconds = track.finish()
    t_fin = time.time()
    # the book's way: chapters into the live remux's tag; else the remux of the whole
    if not (track.remuxed == out and add_chapters(out, chapters, "book", seconds)):
        finish_stream(work / "enc.tmp", out, chapters=chapters, title="book", total_s=seconds)
    t_out = time.time()
    kind = f"{type(track).__name__} ({track.finish_appended} chunks left to append, {track.finish_seconds})"
    print(f"{kind}: {n * CHUNK_S:.0f} s of audio at {rate:g}x: stored in {t_last - t0:.1f} s; "
          f"finish {t_fin - t_last:.1f} s; remux {t_out - t_fin:.2f} s (live: {track.remuxed is not None}); {len(chapters)} chapters")


if __name__ == "__main__":
    main()

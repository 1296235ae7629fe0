#!/usr/bin/env python
"""The end of an MP3 book run without a model: remux with chapters, then the watermark check.

    python scripts/publish_verify_time.py [MINUTES] [ROUNDS]

Encodes MINUTES (default 60) of noise as a book's track is encoded (headerless frames from
the segment encoders; made once in /tmp/publish-verify-time), then times ``publish_verified``
with ``finish_stream`` as the book run calls it: the check after the remux (``frames=None``)
against the check read from the frames while the remux runs (``frames=...``). The noise is
not marked, so every run ends in the refusal to publish: the work is the same.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ttsbatch.audio.export import finish_stream
from ttsbatch.audio.segments import SegmentedEncoder
from ttsbatch.audio.watermark import load_watermarker
from ttsbatch.errors import WatermarkError
from ttsbatch.pipeline import publish_verified


def main() -> int:
    minutes = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    sr, d = 24000, Path("/tmp/publish-verify-time")
    d.mkdir(exist_ok=True)
    frames = d / f"frames-{minutes}min.mp3"
    if not frames.exists():
        enc = SegmentedEncoder(frames, sr, segment_s=120)
        rng = np.random.default_rng(0)
        for _ in range(minutes):
            enc.write((0.1 * rng.standard_normal(sr * 60)).astype(np.float32))
            enc.cut()
        enc.close()
    wm = load_watermarker("cpu")
    print(f"{frames.stat().st_size / 1e6:.1f} MB of frames, {minutes} min")
    for _ in range(rounds):
        for name, given in (("check after the remux", None), ("check beside the remux", frames)):
            t = time.perf_counter()
            try:
                publish_verified(lambda staged: finish_stream(frames, staged, chapters=[("One", 0.0), ("Two", 60.0)], title="t"),
                                 d / "out.mp3", wm, frames=given)
            except WatermarkError:
                pass
            print(f"{name}: {time.perf_counter() - t:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

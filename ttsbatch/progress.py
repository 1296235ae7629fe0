"""Progress for people (a tqdm bar) and for scripts (one JSON event per line), both on stderr."""

from __future__ import annotations

import json
import sys
import time
from typing import Literal

from tqdm import tqdm

Mode = Literal["bar", "json", "none"]


def resolve_mode(requested: str, quiet: bool) -> Mode:
    """``auto`` shows a bar only when stderr is a terminal (cron and pipes get none)."""
    if quiet and requested in ("auto", "bar"):
        return "none"
    if requested == "auto":
        return "bar" if sys.stderr.isatty() else "none"
    return requested  # type: ignore[return-value]


class Progress:
    """Chunks done, audio seconds, real-time factor and ETA, reported as the run goes."""

    def __init__(self, mode: Mode, total: int, cached: int = 0):
        self.mode = mode
        self.total = total
        self.done = 0
        self.audio_s = 0.0
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, unit="chunk", desc="chunks", disable=mode != "bar", file=sys.stderr, dynamic_ncols=True)
        self.event("start", total=total, cached=cached)

    def event(self, kind: str, **fields) -> None:
        """One JSON line on stderr in json mode; nothing otherwise."""
        if self.mode == "json":
            sys.stderr.write(json.dumps({"event": kind, **fields}, default=str) + "\n")
            sys.stderr.flush()

    def chunk(self, index: int, chunk_id: str, seconds: float) -> None:
        self.done += 1
        self.audio_s += seconds
        elapsed = time.perf_counter() - self.started
        rtf = elapsed / self.audio_s if self.audio_s else 0.0
        eta = elapsed / self.done * (self.total - self.done)
        self.bar.set_postfix(audio=f"{self.audio_s:.0f}s", rtf=f"{rtf:.2f}", refresh=False)
        self.bar.update(1)
        self.event(
            "chunk", index=index, id=chunk_id, done=self.done, total=self.total,
            audio_s=round(self.audio_s, 2), elapsed_s=round(elapsed, 2), rtf=round(rtf, 3), eta_s=round(eta, 1),
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

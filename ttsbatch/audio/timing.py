"""Fitting speech into subtitle cue windows, and the pitch-preserving time stretch it uses.

``fit_timeline`` decides, for each spoken cue in time order, where its speech starts and how
much it is sped up. The steps, in this order, each bounded:

1. **Start at the cue start**, or later if the previous speech has not ended yet (two voices
   never overlap; the cue is then *delayed*, and the delay is reported).
2. **Use the silence up to the next spoken cue's start** (past the cue's own end: cues
   without speech, such as ``[music]``, do not count). Speech that fits is placed as it is,
   never stretched (speech shorter than its cue starts at the cue start and keeps its speed).
3. **Speed it up** by ``length / window``, at most ``max_stretch`` (pitch preserved, see
   ``time_stretch``).
4. **Run over**: what still does not fit runs past the next cue's start (reported as
   ``overrun``). Default: the next cue starts when this speech ends (it is delayed), and
   later cues keep their own times, so the delay is absorbed by the first silence long
   enough. With ``shift``: every later cue moves later by the overrun (the spacing between
   cues is kept, the dub drifts from the video).

For the last cue the window ends at ``track_end`` (the requested duration or the last cue's
end); speech is never cut, so the track grows if the last speech runs past it.

Times are seconds (floats); the caller turns them into samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .ffmpeg import run_ffmpeg

__all__ = ["FitOptions", "Slot", "Placement", "fit_timeline", "time_stretch", "MAX_STRETCH_LIMIT"]

MAX_STRETCH_LIMIT = 2.0  # faster than twice the natural speed is not intelligible speech


@dataclass(frozen=True)
class FitOptions:
    """How speech is fitted into cue windows (not part of chunk ids: changing them re-renders nothing)."""

    max_stretch: float = 1.3  # fastest speed-up, 1.0 (never stretch) .. MAX_STRETCH_LIMIT
    shift: bool = False  # on run-over, move every later cue later by the overrun (else delay only the next ones that collide)


@dataclass(frozen=True)
class Slot:
    """One spoken cue as the fitter sees it."""

    start: float  # planned start (the cue's start), seconds
    end: float  # planned end (the cue's end), seconds
    length: float  # natural length of its speech, seconds


@dataclass(frozen=True)
class Placement:
    """Where a cue's speech goes and at what speed."""

    start: float  # where the speech starts, seconds
    length: float  # its length after stretching, seconds
    stretch: float  # speed-up factor: natural length / placed length (1.0 = unchanged)
    window: float  # seconds available from start to the next spoken cue (or the track end)
    overrun: float  # seconds the speech runs past that point (0 when it fits)
    delay: float  # start - planned start (pushed back by earlier speech, or shifted)

    @property
    def end(self) -> float:
        return self.start + self.length


_EPS = 1e-9


def fit_timeline(slots: Sequence[Slot], opts: FitOptions = FitOptions(), track_end: float | None = None) -> list[Placement]:
    """One Placement per slot (``slots`` sorted by start; see the module doc for the rules)."""
    if not 1.0 <= opts.max_stretch <= MAX_STRETCH_LIMIT:
        raise ValueError(f"max_stretch must be between 1.0 and {MAX_STRETCH_LIMIT}, got {opts.max_stretch}")
    out: list[Placement] = []
    cursor = 0.0  # where the previous speech ended
    offset = 0.0  # shift mode: how far every later cue has moved
    for i, slot in enumerate(slots):
        if i and slot.start < slots[i - 1].start:
            raise ValueError("slots must be sorted by start time")
        start = max(slot.start + offset, cursor)
        if i + 1 < len(slots):
            limit = slots[i + 1].start + offset
        else:
            limit = max(track_end if track_end is not None else slot.end, slot.end) + offset
        window = max(0.0, limit - start)
        length = max(0.0, slot.length)
        stretch = 1.0
        if length > window + _EPS:
            need = length / window if window > 0 else math.inf
            stretch = min(need, opts.max_stretch)
            length = length / stretch
        end = start + length
        overrun = max(0.0, end - limit) if end > limit + _EPS else 0.0
        if opts.shift:
            offset += overrun
        cursor = end
        out.append(Placement(start=start, length=length, stretch=stretch, window=window, overrun=overrun, delay=start - slot.start))
    return out


def time_stretch(wav: np.ndarray, sr: int, factor: float) -> np.ndarray:
    """``wav`` sped up by ``factor`` with pitch kept (ffmpeg's ``atempo``, WSOLA), exactly
    ``round(len(wav) / factor)`` samples long.

    ``atempo`` drops the last ~20 ms of its input (its window is never flushed) and moves the
    content by up to a window, so the input gets 200 ms of silence appended and the output is
    cut (or zero-padded) to the exact length. Factors at or below 1.0 return a copy.
    """
    x = np.asarray(wav, dtype=np.float32).reshape(-1)
    if factor <= 1.0 + 1e-6 or len(x) == 0:
        return x.copy()
    if factor > 100:
        raise ValueError(f"atempo cannot speed up by {factor}")
    target = round(len(x) / factor)
    padded = np.concatenate([x, np.zeros(sr // 5, dtype=np.float32)])
    raw = run_ffmpeg(
        ["-f", "f32le", "-ar", str(sr), "-ac", "1", "-i", "pipe:0",
         "-af", f"atempo={factor:.6f}", "-f", "f32le", "-ac", "1", "-ar", str(sr), "pipe:1"],
        input=padded.astype("<f4").tobytes(),
        what="time-stretching speech",
    )
    y = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if len(y) < target:
        y = np.concatenate([y, np.zeros(target - len(y), dtype=np.float32)])
    return np.ascontiguousarray(y[:target])

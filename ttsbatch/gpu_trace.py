"""The GPU's busy time from a CUDA activity trace, for ``ttsbatch bench --gpu-trace``.

Issue #4 asks for GPU busy >= 90% of the wall between a book's first and last batch, from a
profiler trace. ``bench`` samples NVML's utilization every 100 ms by default; this records
every kernel, copy and memset the GPU ran (torch.profiler, CUDA activities only: CUPTI, no
CPU ops) and measures the union of their intervals over a window, so kernels of T3's and
S3Gen's streams that overlap count once. It also sums each stream's kernel time and the
kernels that took longest, which says where the book's GPU time went.

Tracing costs the run something (CUPTI records ~0.6 M activities in a 2-hour book), and the
trace's records are held until the book ends: compare a traced run's wall and host RSS with
untraced runs', not with the targets.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

# CUPTI's activity buffers are capped (Kineto's default: 128 MB); a 2-hour book's ~0.6 M
# kernel records would overflow them, and Kineto drops what does not fit.
BUFFER_MB = 4096


@dataclass(frozen=True)
class Activity:
    """One thing the GPU ran: [start_ns, end_ns) on a stream (unix-epoch nanoseconds)."""

    start_ns: int
    end_ns: int
    stream: int
    name: str


def busy_ns(activities, start_ns: int, end_ns: int) -> int:
    """Nanoseconds of [start_ns, end_ns) during which at least one activity ran."""
    spans = sorted((max(a.start_ns, start_ns), min(a.end_ns, end_ns)) for a in activities)
    busy, reach = 0, start_ns
    for a, b in spans:
        if b <= max(a, reach):  # outside the window (clipped to nothing), or covered already
            continue
        busy += b - max(a, reach)
        reach = b
    return busy


def summarize(activities, start_ns: int | None = None, end_ns: int | None = None, top: int = 40) -> dict:
    """The busy fraction of [start_ns, end_ns) (default: the first activity's start to the
    last's end), each stream's summed activity time, busy fraction and longest kernels, and the
    ``top`` kernels by summed time over the whole trace. Seconds, rounded to the ms."""
    if not activities:
        return dict(activities=0, busy=None)
    start_ns = min(a.start_ns for a in activities) if start_ns is None else start_ns
    end_ns = max(a.end_ns for a in activities) if end_ns is None else end_ns
    by_name: dict[str, list] = defaultdict(lambda: [0, 0])
    by_stream: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    on_stream: dict[int, list] = defaultdict(list)
    for a in activities:
        d = a.end_ns - a.start_ns
        by_name[a.name][0] += d
        by_name[a.name][1] += 1
        by_stream[a.stream][a.name] += d
        on_stream[a.stream].append(a)
    window = max(end_ns - start_ns, 1)
    return dict(
        activities=len(activities),
        window_s=round(window / 1e9, 3),
        busy=round(busy_ns(activities, start_ns, end_ns) / window, 3),
        streams={
            # seconds: the stream's activities summed over the trace; busy: the share of the
            # window it had something running
            str(s): dict(seconds=round(sum(names.values()) / 1e9, 3),
                         busy=round(busy_ns(on_stream[s], start_ns, end_ns) / window, 3),
                         longest=[(n[:90], round(t / 1e9, 3)) for n, t in sorted(names.items(), key=lambda kv: -kv[1])[:5]])
            for s, names in sorted(by_stream.items(), key=lambda kv: -sum(kv[1].values()))
        },
        kernels=[(n[:120], round(t / 1e9, 3), c) for n, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    )


class GpuTrace:
    """Records the GPU's activities while open (``enabled``; else does nothing).

    ``to_ns(t)`` turns a ``time.perf_counter()`` reading into the trace's clock; ``clock_skew_s``
    says how far the first activity started after the trace did (a few ms when the clocks
    agree; the window falls back to the first and last activity when they do not)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.activities: list[Activity] = []
        self._prof = None
        self._ref = (0.0, 0)

    def __enter__(self):
        if not self.enabled:
            return self
        import torch

        conf = os.path.join(tempfile.mkdtemp(prefix="ttsbatch-kineto-"), "libkineto.conf")
        with open(conf, "w") as f:
            f.write(f"ACTIVITIES_MAX_GPU_BUFFER_SIZE_MB={BUFFER_MB}\n")
        os.environ.setdefault("KINETO_CONFIG", conf)
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self._prof.__enter__()
        self._ref = (time.perf_counter(), time.time_ns())
        return self

    def __exit__(self, *exc):
        if self._prof is None:
            return
        from torch.autograd import DeviceType

        self._prof.__exit__(*exc)  # its events are parsed lazily: only the raw records are read here
        for e in self._prof.profiler.kineto_results.events():
            if e.device_type() == DeviceType.CUDA:
                self.activities.append(Activity(e.start_ns(), e.end_ns(), e.device_resource_id(), e.name()))
        self._prof = None

    def to_ns(self, t: float) -> int:
        return self._ref[1] + int((t - self._ref[0]) * 1e9)

    def clock_skew_s(self) -> float | None:
        if not self.activities:
            return None
        return (min(a.start_ns for a in self.activities) - self._ref[1]) / 1e9

    def report(self, start: float, end: float) -> dict:
        """:func:`summarize` over [start, end) in ``perf_counter`` seconds, or over the whole
        trace when the clocks do not agree (the first activity earlier than the trace's start,
        or over a minute after it)."""
        skew = self.clock_skew_s()
        aligned = skew is not None and -0.001 <= skew < 60
        window = (self.to_ns(start), self.to_ns(end)) if aligned else (None, None)
        return dict(summarize(self.activities, *window), clock_skew_s=None if skew is None else round(skew, 4),
                    window="first to last batch" if aligned else "first to last activity")

"""One lock for the process's CUDA graph captures and its device-wide CUDA calls.

T3 (on its own thread) and S3Gen (on the main thread) both capture CUDA graphs mid-book, in
"thread_local" mode so that the other thread's kernels and allocations go on beside a
capture. What must not run beside an open capture is a call that waits for the whole device:
``torch.cuda.synchronize()`` and ``empty_cache()`` (whose ``cudaFree`` synchronizes). One
from another thread invalidates the capture: on an H100 the first S3Gen CFM capture of a
2-hour book failed so (cuBLAS "execution failed ... during capture") while T3's thread was
capturing (``torch.cuda.graph`` synchronizes and empties the cache first: neither model's
captures go through it any more) or sizing its rows.
Every capture takes this lock, and such calls go through :func:`empty_cache` and
:func:`synchronize` here, which take it; kernels, copies and stream syncs need not.
"""

from __future__ import annotations

import contextlib
import threading

# Reentrant, so that a holder may call empty_cache() or synchronize() below itself.
capture_lock = threading.RLock()


def empty_cache() -> None:
    """``torch.cuda.empty_cache()``, never beside another thread's open capture."""
    import torch

    with capture_lock:
        torch.cuda.empty_cache()


def synchronize(device=None) -> None:
    """``torch.cuda.synchronize(device)``, never beside another thread's open capture."""
    import torch

    with capture_lock:
        torch.cuda.synchronize(device)


def failure_line(e: BaseException) -> str:
    """A failed capture's exception as the one line an engine reports (``graph_error``)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@contextlib.contextmanager
def recording(graph, pool, stream):
    """Record the kernels launched inside into ``graph`` (memory from ``pool``) on ``stream``,
    a stream other than the legacy default one, holding :data:`capture_lock`, in
    "thread_local" mode: only this thread is barred from unsafe calls, so the other model's
    thread, Perth and the store go on beside it.

    Not ``torch.cuda.graph``: that one first synchronizes the whole device (waiting for the
    other thread's queued work), empties the allocator's cache (whose blocks the other
    thread then allocates from the driver again) and frees the pinned host blocks; a capture
    needs none of it."""
    import torch

    with capture_lock, torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()

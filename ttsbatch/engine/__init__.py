"""Engines: model loading, voice conditioning, and synthesis (stock reference path first).

Everything here imports torch and chatterbox lazily, so the CLI starts fast.
"""

import contextlib
import threading


class CaptureGuard:
    """Keeps other threads' GPU work out of CUDA graph captures, and nothing else apart.

    A CUDA call from another thread during a capture in CUDA's "global" mode (an allocation,
    a sync) invalidates the capture ("operation not permitted when stream is capturing").
    T3 captures its decode steps in "thread_local" mode and does not need this; S3Gen's
    whole-loop CFM graphs (``cuda_graphs=True``) do. Captures are exclusive
    (:meth:`capturing`); threads doing GPU work beside the engine (S3Gen while T3 decodes on
    its own thread, Perth in the store workers) share (:meth:`using`), so they run together
    and only wait while a graph is being captured. Both are reentrant per thread, and a
    thread that shares may capture once the other sharers are gone (S3Gen's own CFM graph).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared: dict[int, int] = {}  # thread id -> depth
        self._owner: int | None = None  # the capturing thread
        self._depth = 0
        self._pending = 0  # captures waiting: new sharers let them go first

    @contextlib.contextmanager
    def using(self):
        me = threading.get_ident()
        with self._cond:
            while (self._owner is not None and self._owner != me) or (self._pending and me not in self._shared):
                self._cond.wait()
            self._shared[me] = self._shared.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def capturing(self):
        me = threading.get_ident()
        with self._cond:
            self._pending += 1
            try:
                while (self._owner is not None and self._owner != me) or any(t != me for t in self._shared):
                    self._cond.wait()
            finally:
                self._pending -= 1
            self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                self._cond.notify_all()


capture_lock = CaptureGuard()

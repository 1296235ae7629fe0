"""Marking and storing finished chunks in worker processes, beside a GPU engine.

A GPU engine's two threads (T3's and S3Gen's) are Python that launches kernels, and every
other Python thread of the process takes the GIL from them. Perth's host side and the FLAC
encode on the store's threads held it for ~3.5 s of a 2-hour book (py-spy, BENCHMARKS.md,
eleventh session), and S3Gen's thread spends ~12 s of its launches off the CPU (eighteenth and
nineteenth sessions). Worker processes have GILs of their own.

Perth runs there on the CPU (one core marks a 4-s chunk in ~47 ms on the dev machine, so a
few workers keep up with the engine): a second CUDA context would time-slice the GPU with the
engine's. The workers are spawned (a fresh interpreter each: the engine's process has CUDA and
threads, which ``fork`` does not carry safely) as the run starts, beside the model load, and
load and warm up Perth there; they ignore SIGINT, so Ctrl-C reaches the run, which lets them
store what is queued (as the store threads do) and stops them.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

# This worker process's Perth and stores (module state of the worker, not of the run's process)
_worker: dict = {}


def _start(threads: int) -> None:
    """A worker's initializer: Perth on the CPU, warmed up. A failure to load is kept and raised
    by every chunk's call, so the run stops with Perth's own message instead of a broken pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(threads)
        from .audio.watermark import Watermarker

        marker = Watermarker("cpu")
        # librosa's import and numba's JIT of Perth's resampler: now, not on the first chunk
        marker.apply(np.random.default_rng(0).normal(0, 0.1, 12000).astype(np.float32), 24000)
        _worker["marker"] = marker
    except Exception as e:  # noqa: BLE001 - re-raised by _mark_and_store for every chunk
        _worker["error"] = e


def _ready() -> bool:
    return "marker" in _worker


def _mark_and_store(root: str, id: str, wav: np.ndarray, sr: int, meta: dict) -> int:
    """Mark ``wav`` and put it in the store at ``root``; the samples stored."""
    from .store import ChunkStore

    if "error" in _worker:
        raise _worker["error"]
    stores = _worker.setdefault("stores", {})
    if root not in stores:
        stores[root] = ChunkStore(Path(root))
    store = stores[root]
    marked = _worker["marker"].apply(wav, sr) if len(wav) else wav
    store.put(id, marked, sr, meta)
    return len(marked)


class MarkWorkers:
    """``workers`` processes that mark chunks with Perth (on their CPUs) and store them.

    Started at once (each loads and warms up Perth, ~3-5 s, while the caller goes on);
    :meth:`submit` queues one chunk and returns a future of the samples stored. ``threads``:
    torch's CPU threads per worker (one: the workers are the parallelism)."""

    def __init__(self, workers: int, threads: int = 1):
        if workers < 1:
            raise ValueError(f"MarkWorkers needs at least one worker, got {workers}")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start, initargs=(threads,)
        )
        # the pool starts a process per queued call while it has fewer than ``workers``: one
        # call each starts them all now, beside the model load, not when the first chunk comes
        self._started = [self._pool.submit(_ready) for _ in range(workers)]

    def submit(self, store_root: Path, id: str, wav: np.ndarray, sr: int, meta: dict) -> Future:
        return self._pool.submit(_mark_and_store, str(store_root), id, np.asarray(wav, dtype=np.float32), int(sr), meta)

    def close(self) -> None:
        """Wait for the queued chunks, then stop the processes."""
        self._pool.shutdown(wait=True)

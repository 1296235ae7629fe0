"""The work directory: a content-addressed chunk store, the run's manifest, and a lock.

Layout of a work directory (by default ``.<output name>.ttsbatch`` beside the output)::

    root/.lock                     held by the one ttsbatch process working here
    root/manifest.json             what the run is: input, voice, model, options, ordered chunk ids
    root/index.jsonl               one JSON line per stored chunk: id, text, seconds, sample_rate, created
    root/chunks/<id[:2]>/<id>.flac the audio of one chunk, keyed by its id (see ttsbatch.plan)

Guarantees:

* **Atomic.** Every file is written to a temporary file in the same directory, flushed,
  fsynced and then renamed over its final name (``os.replace``). A process killed at any
  moment leaves either the whole file or no file under the final name, never a truncated one
  that ``has()`` would accept. Stray temporary files (``.*.tmp``) are ignored and can be
  removed with ``ChunkStore.remove_temp_files()``.
* **Chunks are FLAC, 24-bit PCM.** Lossless for 24-bit audio and about half the size of float
  WAV; 24 bits keep the quantization error (2**-24 of full scale, about -144 dBFS) far below
  anything audible or anything the watermark detector cares about. Integer PCM cannot hold
  values outside [-1, 1] (libsndfile would wrap them around, a loud click), so ``put`` clips
  to [-1, 1] first and turns NaN into 0.
* **The index is advisory.** The audio file is the truth: ``has``/``ids`` look only at the
  chunk files. ``index.jsonl`` is append-only metadata for people and tools; a torn last line
  (a kill in mid-append) is skipped when it is read.
* **Shared across formats.** ``adopt_chunks`` links in the chunks that the same output's
  work directory for another format holds (``sibling_work_dirs``): ids do not depend on it.
* **Errors are one line.** A full disk or an unwritable directory makes ``put`` raise
  ``StoreError("cannot write chunk to ...: No space left on device")`` after removing its
  temporary file; the store is unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import platformdirs
import soundfile as sf

from . import faults
from .errors import TtsbatchError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.jsonl"
LOCK_NAME = ".lock"
CHUNK_SUFFIX = ".flac"
TEMP_SUFFIX = ".tmp"

_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


class StoreError(TtsbatchError):
    """The work directory cannot be written or read (disk full, no permission, corrupt chunk)."""


class StoreBusyError(TtsbatchError):
    """Another ttsbatch process holds the work directory's lock."""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _discard(path: Path) -> None:
    """Remove a chunk file that cannot be decoded: the next run finds it missing and renders it."""
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    Writes a temporary file beside ``path`` (created with the usual umask), fsyncs it, renames it
    over ``path`` and fsyncs the directory. The parent directory must exist. On any error the
    temporary file is removed and the ``OSError`` is raised unchanged (callers word it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("before-rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _encode_flac(wav: np.ndarray, sr: int) -> tuple[bytes, int]:
    """FLAC PCM_24 bytes of a mono float signal (clipped to [-1, 1], NaN -> 0) and its frame count."""
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (1-D array), got shape {x.shape}")
    if x.size == 0:
        # FLAC cannot hold zero frames (libsndfile writes an empty, unreadable file);
        # one sample of silence (42 µs at 24 kHz) stands in for "no audio".
        x = np.zeros(1, dtype=np.float32)
    x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, x, int(sr), format="FLAC", subtype="PCM_24")
    return buf.getvalue(), x.size


class ChunkStore:
    """Audio of finished chunks, keyed by chunk id, under ``root``.

    ``has`` is a cheap existence check; ``verify`` reads the file and deletes it if it cannot
    be decoded, so the next run renders it again. Safe to use from several threads of one
    process; several processes must hold ``store_lock(root)``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.index_path = self.root / INDEX_NAME
        self._index_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------
    def path(self, id: str) -> Path:
        """Where chunk ``id`` lives (whether or not it exists)."""
        if not isinstance(id, str) or not _ID_RE.match(id):
            raise ValueError(f"not a chunk id: {id!r}")
        return self.chunks_dir / id[:2] / f"{id}{CHUNK_SUFFIX}"

    # -- queries -------------------------------------------------------------------------
    def has(self, id: str) -> bool:
        """Is chunk ``id`` stored? (An existence check; see ``verify`` for a full read.)"""
        return self.path(id).is_file()

    __contains__ = has

    def ids(self) -> set[str]:
        """Ids of all stored chunks (one directory scan)."""
        out: set[str] = set()
        if not self.chunks_dir.is_dir():
            return out
        for sub in self.chunks_dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                name = entry.name
                if name.endswith(CHUNK_SUFFIX) and not name.startswith("."):
                    out.add(name[: -len(CHUNK_SUFFIX)])
        return out

    def __len__(self) -> int:
        return len(self.ids())

    # -- write ---------------------------------------------------------------------------
    def put(self, id: str, wav: np.ndarray, sr: int, meta: dict[str, Any] | None = None) -> Path:
        """Store the audio of chunk ``id`` atomically and append its metadata to the index.

        ``wav`` is mono float audio (1-D); it is clipped to [-1, 1] and stored as FLAC PCM_24.
        ``meta`` (JSON-serializable, e.g. ``{"text": ...}``) goes into ``index.jsonl`` together
        with id, seconds, sample_rate and created (Unix time). Putting an id again replaces it.
        Raises ``StoreError`` if the file cannot be written; nothing is left behind then.
        """
        final = self.path(id)
        data, frames = _encode_flac(wav, sr)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(final, data)
        except OSError as e:
            raise StoreError(f"cannot write chunk to {final.parent}: {_reason(e)}") from None
        record = {"id": id, "seconds": round(frames / int(sr), 4), "sample_rate": int(sr), "created": round(time.time(), 3)}
        record.update(meta or {})
        try:
            self._append_index(record)
        except OSError as e:
            # Keep put all-or-nothing: a chunk we could not index is removed again.
            with contextlib.suppress(OSError):
                final.unlink()
            raise StoreError(f"cannot write chunk index {self.index_path}: {_reason(e)}") from None
        return final

    def link(self, id: str, src: Path, meta: dict[str, Any] | None = None) -> None:
        """Store the finished chunk file ``src`` (another store's) as chunk ``id``: hard-linked
        under a temporary name and renamed into place (copied atomically where links fail), its
        metadata appended to the index. ``src`` is only read. Raises OSError."""
        final = self.path(id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.link(src, tmp)
            os.replace(tmp, final)
        except OSError:
            _discard(tmp)
            atomic_write_bytes(final, Path(src).read_bytes())
        self._append_index({"id": id, **(meta or {})})

    def _append_index(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._index_lock:
            fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line  # a torn line from a killed run: start a fresh one
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)

    # -- read ----------------------------------------------------------------------------
    def get(self, id: str) -> tuple[np.ndarray, int]:
        """Audio (float32, 1-D) and sample rate of chunk ``id``.

        Raises ``StoreError`` if it is missing or cannot be decoded (truncated, corrupt); a file
        that cannot be decoded is removed first, so that the next run renders it again (a run
        finds what is missing by the files that are there, not by reading each).
        """
        path = self.path(id)
        if not path.is_file():
            raise StoreError(f"chunk {id} is not in the store {self.root}")
        try:
            wav, sr = sf.read(path, dtype="float32", always_2d=False)
        except (sf.SoundFileError, OSError) as e:
            _discard(path)
            raise StoreError(f"chunk file {path} was unreadable ({_reason(e)}) and is removed; run again to render it "
                             "anew") from None
        if wav.ndim != 1:
            wav = wav.mean(axis=1, dtype=np.float32)
        return wav, int(sr)

    def verify(self, id: str) -> bool:
        """Read chunk ``id`` completely; if it cannot be decoded, delete it and return False."""
        path = self.path(id)
        if not path.is_file():
            return False
        try:
            info = sf.info(path)
            wav, _ = sf.read(path, dtype="float32", always_2d=False)
            ok = info.frames > 0 and len(wav) == info.frames
        except (sf.SoundFileError, OSError):
            ok = False
        if not ok:
            log.warning("removing unreadable chunk file %s; it will be rendered again", path)
            _discard(path)
        return ok

    def meta(self) -> dict[str, dict[str, Any]]:
        """Index records by id (the last record of an id wins; unreadable lines are skipped)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return out
        for line in raw.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                out[record["id"]] = record
        return out

    def remove_temp_files(self) -> int:
        """Delete temporary files left by killed runs; call it only while holding the lock."""
        n = 0
        if self.root.is_dir():
            for tmp in [*self.root.glob(f".*{TEMP_SUFFIX}"), *self.chunks_dir.glob(f"*/.*{TEMP_SUFFIX}")]:
                with contextlib.suppress(OSError):
                    if tmp.is_dir():  # an MP3 track's parts (audio.segments)
                        shutil.rmtree(tmp)
                    else:
                        tmp.unlink()
                    n += 1
        return n


# -- manifest ----------------------------------------------------------------------------------


def write_manifest(root: Path, data: dict[str, Any]) -> Path:
    """Write ``root/manifest.json`` atomically (Paths and other odd values become strings)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    try:
        blob = json.dumps(data, ensure_ascii=False, indent=1, default=str).encode("utf-8")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
    except OSError as e:
        raise StoreError(f"cannot write manifest to {root}: {_reason(e)}") from None
    return path


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest in ``root``, or None if there is none or it cannot be read.

    An unreadable manifest counts as absent: it is rebuilt from the input, and the chunk store
    (the valuable part) does not depend on it.
    """
    path = Path(root) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable manifest %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


# -- locking -----------------------------------------------------------------------------------


@contextlib.contextmanager
def store_lock(root: Path, timeout: float = 0) -> Iterator[filelock.BaseFileLock]:
    """Hold ``root/.lock`` for the duration of the ``with`` block.

    ``timeout`` is how long to wait for another process to finish (0: fail at once; a negative
    value waits forever). Raises ``StoreBusyError`` if the lock stays taken and ``StoreError``
    if ``root`` cannot be created.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create work directory {root}: {_reason(e)}") from None
    lock = filelock.FileLock(str(root / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StoreBusyError(f"another ttsbatch is working in {root}; wait for it or use another --work-dir") from None
    except OSError as e:
        raise StoreError(f"cannot lock work directory {root}: {_reason(e)}") from None
    try:
        yield lock
    finally:
        lock.release()


# -- places ------------------------------------------------------------------------------------


def default_work_dir(output: Path) -> Path:
    """The work directory of an output file: hidden, beside it (``dir/.book.mp3.ttsbatch``)."""
    output = Path(output)
    return output.parent / f".{output.name}.ttsbatch"


def sibling_work_dirs(work_dir: Path) -> list[Path]:
    """Work directories of the same output in other formats: ``.book.m4b.ttsbatch`` beside ``.book.mp3.ttsbatch``.

    Only default work directories (``.<stem>.<ext>.ttsbatch``) have siblings; the list is in
    name order and leaves ``work_dir`` itself out.
    """
    work_dir = Path(work_dir)
    m = re.fullmatch(r"\.(.+)\.[^.]+\.ttsbatch", work_dir.name)
    if not m:
        return []
    sibling = re.compile(rf"\.{re.escape(m.group(1))}\.[^.]+\.ttsbatch")
    try:
        entries = sorted(work_dir.parent.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.name != work_dir.name and sibling.fullmatch(e.name) and e.is_dir()]


def adopt_chunks(store: ChunkStore, ids, donors) -> int:
    """Link into ``store`` the chunks of ``ids`` it lacks that a donor work directory holds.

    A chunk id is the hash of everything its audio depends on (text, voice, options, model,
    engine) and nothing of the output format, so the chunks a book rendered for ``book.mp3``
    are the chunks of ``book.m4b``: taken, not rendered again. Each is hard-linked (copied
    where links fail) under a temporary name and renamed into place, so the store stays atomic;
    the donor is only read (its chunk files are never written in place, only replaced).
    Returns how many were adopted.
    """
    wanted = set(ids) - store.ids()
    adopted = 0
    for donor in donors:
        if not wanted:
            break
        other = ChunkStore(donor)
        found = wanted & other.ids()
        if not found:
            continue
        records = other.meta()
        taken = 0
        for id in sorted(found):
            try:
                store.link(id, other.path(id), {**records.get(id, {}), "adopted_from": str(donor)})
            except OSError as e:  # it is rendered instead
                log.debug("could not take chunk %s from %s: %s", id, donor, e)
                continue
            wanted.discard(id)
            taken += 1
        if taken:
            log.info("took %d finished chunk(s) from %s", taken, donor)
        adopted += taken
    return adopted


def cache_dir() -> Path:
    """ttsbatch's cache directory ($TTSBATCH_CACHE_DIR if set, else the platform's user cache).

    Not created here; callers make the subdirectories they need.
    """
    env = os.environ.get("TTSBATCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("ttsbatch"))


__all__ = [
    "ChunkStore",
    "adopt_chunks",
    "StoreBusyError",
    "StoreError",
    "atomic_write_bytes",
    "cache_dir",
    "default_work_dir",
    "read_manifest",
    "sibling_work_dirs",
    "store_lock",
    "write_manifest",
]

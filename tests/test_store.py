"""The chunk store, manifest and lock: round trips, atomicity, corruption, full disks, busy dirs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ttsbatch.errors import TtsbatchError
from ttsbatch.store import (
    ChunkStore,
    StoreBusyError,
    StoreError,
    adopt_chunks,
    atomic_write_bytes,
    cache_dir,
    default_work_dir,
    read_manifest,
    sibling_work_dirs,
    store_lock,
    write_manifest,
)

SR = 24000
ID1 = "ab" + "0" * 30
ID2 = "cd" + "1" * 30
ID3 = "ab" + "2" * 30
REPO = Path(__file__).resolve().parent.parent


def noise(n=SR // 2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.9, 0.9, n).astype(np.float32)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def py(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, text=True, **kw)


# -- round trip and queries ----------------------------------------------------------------------


def test_put_get_round_trip_within_pcm24(tmp_path):
    store = ChunkStore(tmp_path)
    wav = noise()
    path = store.put(ID1, wav, SR, {"text": "Hello."})
    assert path == tmp_path / "chunks" / "ab" / f"{ID1}.flac"
    assert sf.info(path).format == "FLAC" and sf.info(path).subtype == "PCM_24"
    out, sr = store.get(ID1)
    assert sr == SR and out.dtype == np.float32 and out.shape == wav.shape
    assert np.max(np.abs(out - wav)) <= 2**-22


def test_put_clips_and_cleans(tmp_path):
    store = ChunkStore(tmp_path)
    wav = np.array([0.5, 1.5, -2.0, np.nan, 1.0, -1.0], dtype=np.float32)
    store.put(ID1, wav, SR)
    out, _ = store.get(ID1)
    np.testing.assert_allclose(out, [0.5, 1.0, -1.0, 0.0, 1.0, -1.0], atol=2**-22)


def test_put_shapes(tmp_path):
    store = ChunkStore(tmp_path)
    store.put(ID1, noise(100)[:, None], SR)  # (n, 1) is mono too
    assert store.get(ID1)[0].shape == (100,)
    with pytest.raises(ValueError):
        store.put(ID2, np.zeros((2, 100), np.float32), SR)
    store.put(ID2, np.zeros(0, np.float32), SR)  # empty -> one sample of silence, still readable
    assert store.verify(ID2) and store.get(ID2)[0].tolist() == [0.0]


def test_has_ids_len_contains(tmp_path):
    store = ChunkStore(tmp_path / "work")  # root need not exist yet
    assert len(store) == 0 and store.ids() == set() and not store.has(ID1)
    store.put(ID1, noise(), SR)
    store.put(ID2, noise(), SR)
    store.put(ID3, noise(), SR)
    store.put(ID1, noise(seed=1), SR)  # replacing keeps one copy
    assert store.ids() == {ID1, ID2, ID3} and len(store) == 3
    assert store.has(ID2) and ID2 in store and not store.has("ef" + "0" * 30)
    assert ChunkStore(tmp_path / "work").ids() == {ID1, ID2, ID3}  # another instance sees them
    for bad in ["../etc/passwd", "AB" + "0" * 30, "", "abc"]:
        with pytest.raises(ValueError):
            store.has(bad)


def test_index_records_metadata(tmp_path):
    store = ChunkStore(tmp_path)
    store.put(ID1, noise(SR * 2), SR, {"text": "Zwei Sekunden, naïve café."})
    store.put(ID2, noise(SR), SR, {"text": "One."})
    meta = store.meta()
    assert meta[ID1]["text"] == "Zwei Sekunden, naïve café."
    assert meta[ID1]["seconds"] == 2.0 and meta[ID1]["sample_rate"] == SR
    assert meta[ID1]["id"] == ID1 and meta[ID1]["created"] > 1.6e9
    assert len((tmp_path / "index.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_index_survives_a_torn_line(tmp_path):
    store = ChunkStore(tmp_path)
    store.put(ID1, noise(), SR, {"text": "a"})
    with open(tmp_path / "index.jsonl", "a") as f:
        f.write('{"id": "cd11111')  # a kill in mid-append
    store.put(ID2, noise(), SR, {"text": "b"})
    assert set(store.meta()) == {ID1, ID2}


def test_get_missing_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="not in the store"):
        ChunkStore(tmp_path).get(ID1)


# -- atomicity and failures ----------------------------------------------------------------------


def test_failed_replace_leaves_nothing(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path)

    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="Input/output error"):
        store.put(ID1, noise(), SR)
    assert not store.has(ID1) and temp_files(tmp_path) == [] and len(store) == 0


def test_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("encoder died")

    monkeypatch.setattr(sf, "write", boom)
    with pytest.raises(RuntimeError):
        store.put(ID1, noise(), SR)
    assert not store.has(ID1) and temp_files(tmp_path) == []


def test_kill_9_mid_write_leaves_no_chunk(tmp_path):
    # A real SIGKILL after the temporary file has its bytes but before the rename.
    code = """
        import os, signal, sys
        import numpy as np
        from ttsbatch.store import ChunkStore
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        ChunkStore(sys.argv[1]).put(sys.argv[2], np.zeros(24000, np.float32), 24000)
    """
    proc = py(code, str(tmp_path), ID1)
    assert proc.wait(timeout=30) == -9
    store = ChunkStore(tmp_path)
    assert not store.has(ID1) and store.ids() == set()
    assert len(temp_files(tmp_path)) == 1  # the orphan is there but invisible ...
    assert store.remove_temp_files() == 1 and temp_files(tmp_path) == []  # ... and can be swept
    parts = tmp_path / ".track-1.parts.tmp"  # a killed run's MP3 parts (audio.segments)
    parts.mkdir()
    (parts / "00000.f32").write_bytes(b"pcm")
    assert store.remove_temp_files() == 1 and not parts.exists()


def test_disk_full_gives_one_line_store_error(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path)
    store.put(ID1, noise(), SR, {"text": "kept"})
    before = all_files(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError) as e:
        store.put(ID2, noise(), SR, {"text": "lost"})
    msg = str(e.value)
    assert msg.startswith("cannot write chunk to ") and msg.endswith(": No space left on device")
    assert "\n" not in msg and isinstance(e.value, TtsbatchError)
    monkeypatch.undo()
    # consistent: the old chunk is intact, the new one absent, no temp file, index unchanged
    assert all_files(tmp_path) == before
    assert store.ids() == {ID1} and store.verify(ID1) and set(store.meta()) == {ID1}


def test_index_write_failure_undoes_the_chunk(tmp_path, monkeypatch):
    store = ChunkStore(tmp_path)

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ChunkStore, "_append_index", full)
    with pytest.raises(StoreError, match="No space left on device"):
        store.put(ID1, noise(), SR)
    assert not store.has(ID1) and temp_files(tmp_path) == []


def test_unwritable_root_gives_store_error(tmp_path):
    root = tmp_path / "not-a-dir"
    root.write_text("a file where the work dir should be")
    with pytest.raises(StoreError, match="cannot write chunk to"):
        ChunkStore(root).put(ID1, noise(), SR)


def test_truncated_chunk_is_detected_and_removed(tmp_path):
    store = ChunkStore(tmp_path)
    path = store.put(ID1, noise(SR * 2), SR)
    store.put(ID2, noise(), SR)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert store.has(ID1)  # has() is only an existence check ...
    with pytest.raises(StoreError, match="unreadable"):
        store.get(ID1)  # ... get() refuses the damaged file and removes it, so it is rendered again
    assert not store.has(ID1) and not path.exists()
    path.write_bytes(data[: len(data) // 2])
    assert store.verify(ID1) is False  # verify() reads it all and removes it likewise
    assert not store.has(ID1) and not path.exists()
    assert store.verify(ID2) is True and store.has(ID2)
    assert store.verify(ID3) is False  # missing


def test_garbage_chunk_is_detected(tmp_path):
    store = ChunkStore(tmp_path)
    path = store.put(ID1, noise(), SR)
    path.write_bytes(b"\0" * 100)
    assert store.verify(ID1) is False and not store.has(ID1)


# -- manifest ------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    root = tmp_path / "work"
    assert read_manifest(root) is None
    data = {
        "input": str(tmp_path / "book.txt"),
        "voice": "v1",
        "model": "ResembleAI/chatterbox",
        "options": {"generation": {"temperature": 0.8}},
        "chunks": [{"id": ID1, "boundary": "sentence", "chapter": 0}, {"id": ID2, "boundary": "end", "chapter": 1}],
        "title": "Café – ü",
    }
    write_manifest(root, data)
    assert read_manifest(root) == data
    write_manifest(root, {"input": tmp_path / "other.txt"})  # Paths are written as strings
    assert read_manifest(root) == {"input": str(tmp_path / "other.txt")}
    assert temp_files(root) == []


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    write_manifest(tmp_path, {"version": 1})

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="cannot write manifest to .*: No space left on device"):
        write_manifest(tmp_path, {"version": 2})
    monkeypatch.undo()
    assert read_manifest(tmp_path) == {"version": 1} and temp_files(tmp_path) == []


def test_corrupt_manifest_reads_as_none(tmp_path):
    (tmp_path / "manifest.json").write_text('{"input": "bo')
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert read_manifest(tmp_path) is None


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two" * 1000)
    assert target.read_bytes() == b"two" * 1000 and all_files(tmp_path) == ["out.bin"]
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"x")


# -- lock ----------------------------------------------------------------------------------------

HOLDER = """
    import sys
    from ttsbatch.store import store_lock
    with store_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
"""


def test_lock_held_by_another_process(tmp_path):
    root = tmp_path / "work"
    proc = py(HOLDER, str(root), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusyError) as e:
            with store_lock(root):
                pass
        assert str(e.value) == f"another ttsbatch is working in {root}; wait for it or use another --work-dir"
        assert isinstance(e.value, TtsbatchError)
        with pytest.raises(StoreBusyError):
            with store_lock(root, timeout=0.2):
                pass
    finally:
        proc.stdin.close()  # let it finish
        proc.wait(timeout=30)
        proc.stdout.close()
    with store_lock(root):  # free now
        pass


def test_lock_waits_for_release(tmp_path):
    proc = py(HOLDER, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.stdin.close()  # the holder exits shortly; a patient caller gets the lock
        with store_lock(tmp_path, timeout=20):
            pass
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()


def test_lock_reacquire_in_same_process(tmp_path):
    for _ in range(3):
        with store_lock(tmp_path):
            store = ChunkStore(tmp_path)
            store.put(ID1, noise(10), SR)
    assert ChunkStore(tmp_path).ids() == {ID1}


def test_lock_on_unwritable_root(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError):
        with store_lock(tmp_path / "f"):
            pass


# -- places --------------------------------------------------------------------------------------


def test_default_work_dir():
    assert default_work_dir(Path("/books/out/book.mp3")) == Path("/books/out/.book.mp3.ttsbatch")
    assert default_work_dir(Path("book.m4b")) == Path(".book.m4b.ttsbatch")


def test_sibling_work_dirs_are_the_same_output_in_other_formats(tmp_path):
    for name in [".book.mp3.ttsbatch", ".book.m4b.ttsbatch", ".book.wav.ttsbatch", ".book.2.mp3.ttsbatch",
                 ".booklet.mp3.ttsbatch", ".other.mp3.ttsbatch", "book.mp3.ttsbatch"]:
        (tmp_path / name).mkdir()
    (tmp_path / ".book.ogg.ttsbatch").write_text("a file, not a work dir")
    assert [p.name for p in sibling_work_dirs(tmp_path / ".book.mp3.ttsbatch")] == [".book.m4b.ttsbatch", ".book.wav.ttsbatch"]
    assert sibling_work_dirs(tmp_path / "mywork") == []  # a --work-dir of the user's own: none
    assert sibling_work_dirs(tmp_path / "missing" / ".book.mp3.ttsbatch") == []


def test_adopt_chunks_links_what_is_missing_and_leaves_the_donor_alone(tmp_path):
    donor, other, mine = ChunkStore(tmp_path / "d"), ChunkStore(tmp_path / "o"), ChunkStore(tmp_path / "m")
    donor.put(ID1, noise(seed=1), SR, {"text": "one"})
    donor.put(ID2, noise(seed=2), SR)
    other.put(ID3, noise(seed=3), SR)
    mine.put(ID2, noise(seed=9), SR)  # already here: kept as it is
    donated = {p: p.read_bytes() for p in donor.chunks_dir.rglob("*.flac")}
    assert adopt_chunks(mine, [ID1, ID2, ID3, "ee" + "3" * 30], [donor.root, other.root, tmp_path / "nope"]) == 2
    assert mine.ids() == {ID1, ID2, ID3}
    assert np.array_equal(mine.get(ID1)[0], donor.get(ID1)[0]) and np.array_equal(mine.get(ID3)[0], other.get(ID3)[0])
    assert np.array_equal(mine.get(ID2)[0], ChunkStore(tmp_path / "m").get(ID2)[0])
    assert not np.array_equal(mine.get(ID2)[0], donor.get(ID2)[0])
    assert mine.meta()[ID1]["text"] == "one" and mine.meta()[ID1]["adopted_from"] == str(donor.root)
    assert {p: p.read_bytes() for p in donor.chunks_dir.rglob("*.flac")} == donated
    assert not list(mine.chunks_dir.rglob("*.tmp"))
    # a chunk later replaced in one store is not changed in the other (linked files are only renamed over)
    mine.put(ID1, noise(seed=5), SR)
    assert np.array_equal(donor.get(ID1)[0], ChunkStore(tmp_path / "d").get(ID1)[0])
    assert not np.array_equal(donor.get(ID1)[0], mine.get(ID1)[0])
    assert adopt_chunks(mine, [ID1, ID2, ID3], [donor.root]) == 0  # nothing missing


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TTSBATCH_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TTSBATCH_CACHE_DIR")
    assert "ttsbatch" in cache_dir().parts


def test_index_lines_are_json(tmp_path):
    store = ChunkStore(tmp_path)
    store.put(ID1, noise(), SR, {"text": 'quote " and \n newline'})
    (line,) = (tmp_path / "index.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["text"] == 'quote " and \n newline'


def test_resume_with_a_real_store(tmp_path):
    from ttsbatch.config import GenerationOptions
    from ttsbatch.plan import make_plan, pending
    from ttsbatch.text.document import Chunk

    texts = [f"Sentence {i} of ten." for i in range(10)]
    chunks = [Chunk(index=i, text=t, source=t, chapter=0, paragraph=0, boundary="sentence") for i, t in enumerate(texts)]
    plan = make_plan(chunks, "v", GenerationOptions(), "m")
    store = ChunkStore(tmp_path)
    for p in plan[:4]:
        store.put(p.id, noise(100, seed=p.seed), SR, {"text": p.chunk.text})
    assert sorted(p.chunk.index for p in pending(plan, store)) == list(range(4, 10))
    assert store.verify(plan[0].id)
    (store.path(plan[1].id)).write_bytes(b"junk")
    assert store.verify(plan[1].id) is False  # a damaged chunk becomes pending again
    assert sorted(p.chunk.index for p in pending(plan, store)) == [1, *range(4, 10)]

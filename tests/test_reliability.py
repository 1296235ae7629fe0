"""Reliability: kill -9 and resume, SIGTERM, a busy work dir, full disks, OOM, failed chunks,
pipes (stdin/stdout), JSON progress and hostile input. CPU, tiny random checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ttsbatch.cli import app

runner = CliRunner()
FAST = ["--device", "cpu", "--tokens-per-char", "0.15", "--ignore-eos"]
TEXT = "One short line.\n\nA second paragraph here.\n\nThird paragraph, a bit longer than that.\n\nThe fourth.\n\nAnd the fifth, the end.\n"


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def ids_in_index(work) -> list[str]:
    path = work / "index.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


def cli_process(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "ttsbatch", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(TEXT)
    return p


def test_kill_9_at_every_stage_then_resume_gives_the_uninterrupted_audio(tiny_checkpoint, tmp_path, book):
    # The reference: one uninterrupted run elsewhere.
    ref = tmp_path / "ref" / "out.wav"
    ref.parent.mkdir()
    assert run(book, "-o", ref, "--model-dir", tiny_checkpoint, *FAST, "-q").exit_code == 0

    out = tmp_path / "out.wav"
    work = tmp_path / ".out.wav.ttsbatch"
    args = [book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "-q"]
    seen: list[str] = []
    # 1: killed while the 2nd chunk's file is written but not yet renamed into place
    #    (the 1st rename is the manifest); 2: killed right after one more chunk is stored;
    # 3: killed with the output encoded under its temporary name.
    for fault in ("before-rename:3", "chunk-stored:1", "encoded"):
        p = cli_process(args, {"TTSBATCH_FAULT": fault})
        p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, fault
        assert not out.exists(), fault  # never a partial output
        now = ids_in_index(work)
        assert now[: len(seen)] == seen and len(set(now)) == len(now), "a stored chunk was generated again"
        seen = now
    assert len(seen) == 5  # the last kill came after every chunk was stored

    p = cli_process(args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert "0 chunks rendered, 5 reused" in err.decode()
    assert ids_in_index(work) == seen
    assert not [f for f in tmp_path.iterdir() if ".partial" in f.name]
    a, sr_a = sf.read(out)
    b, sr_b = sf.read(ref)
    assert sr_a == sr_b and np.array_equal(a, b)


def test_sigterm_stores_what_is_done_and_exits_143(tiny_checkpoint, tmp_path, book):
    out = tmp_path / "out.wav"
    work = tmp_path / ".out.wav.ttsbatch"
    p = cli_process([book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "-q"])
    deadline = time.time() + 240
    while not ids_in_index(work) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert p.returncode == 143, err.decode()
    assert "run the same command again to resume" in err.decode()
    assert "Traceback" not in err.decode()
    assert not out.exists()
    assert ids_in_index(work)  # what was done is kept


def test_a_second_run_on_a_busy_work_dir_exits_clearly(tiny_checkpoint, tmp_path, book):
    from ttsbatch.store import store_lock

    out = tmp_path / "out.wav"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from ttsbatch.store import store_lock\n"
         "with store_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(tmp_path / ".out.wav.ttsbatch")],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
        assert r.exit_code == 1
        assert "another ttsbatch is working in" in r.stderr and "--work-dir" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    with store_lock(tmp_path / ".out.wav.ttsbatch"):  # released and usable
        pass


def test_disk_full_is_clear_and_the_next_run_continues(tiny_checkpoint, tmp_path, book, monkeypatch):
    import ttsbatch.store as store

    real_write, real_put = os.write, store.ChunkStore.put
    stored = {"n": 0}

    def fills_up(fd, data):
        if stored["n"] >= 2:  # two chunks fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def counting_put(self, *a, **k):
        path = real_put(self, *a, **k)
        stored["n"] += 1
        return path

    monkeypatch.setattr(store.os, "write", fills_up)
    monkeypatch.setattr(store.ChunkStore, "put", counting_put)
    out = tmp_path / "out.wav"
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "-q")
    assert r.exit_code == 1
    assert "No space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    work = tmp_path / ".out.wav.ttsbatch"
    assert len(ids_in_index(work)) == 2
    assert not [f for f in work.rglob("*") if f.name.endswith(store.TEMP_SUFFIX)]

    monkeypatch.setattr(store.os, "write", real_write)
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert "3 chunks rendered, 2 reused" in r.stderr


def test_out_of_memory_halves_the_batch_and_completes(tiny_checkpoint, tmp_path, book, monkeypatch, caplog):
    import torch

    from ttsbatch.engine.stock import StockEngine

    real = StockEngine.synthesize
    sizes = []

    def small_gpu(self, requests, *a, **k):
        sizes.append(len(requests))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, requests, *a, **k)

    monkeypatch.setattr(StockEngine, "synthesize", small_gpu)
    out = tmp_path / "out.wav"
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert "out of GPU memory with 4 chunks in a batch; retrying with 2" in r.stderr
    assert "retrying with 1" in r.stderr
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}  # later batches keep the smaller size
    assert "5 chunks rendered" in r.stderr and out.is_file()


def test_a_failing_chunk_fails_alone_exit_1_and_rerun_retries_it(tiny_checkpoint, tmp_path, book, monkeypatch):
    from ttsbatch.engine.stock import StockEngine

    real = StockEngine.synthesize

    def dislikes_the_fourth(self, requests, *a, **k):
        if any("fourth" in r.text for r in requests):
            raise RuntimeError("synthesis produced NaN")
        return real(self, requests, *a, **k)

    monkeypatch.setattr(StockEngine, "synthesize", dislikes_the_fourth)
    out = tmp_path / "out.wav"
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "--batch-size", "5", "-q")
    assert r.exit_code == 1
    assert "1 chunk(s) failed" in r.stderr and "NaN" in r.stderr
    assert not out.exists()
    assert len(ids_in_index(tmp_path / ".out.wav.ttsbatch")) == 4

    monkeypatch.setattr(StockEngine, "synthesize", real)
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0 and "1 chunks rendered, 4 reused" in r.stderr


def test_stdin_to_stdout_with_json_progress(tiny_checkpoint, tmp_path, monkeypatch):
    import io

    r = run("-", "-o", "-", "--format", "wav", "--model-dir", tiny_checkpoint, *FAST, "--progress", "json", input=TEXT)
    assert r.exit_code == 0, r.stderr
    wav, sr = sf.read(io.BytesIO(r.stdout_bytes))
    assert sr == 24000 and len(wav) > sr
    events = [json.loads(line) for line in r.stderr.splitlines()]  # every stderr line is JSON
    kinds = [e["event"] for e in events]
    assert kinds.count("chunk") == 5 and kinds[-1] == "done"
    last = [e for e in events if e["event"] == "chunk"][-1]
    assert last["done"] == last["total"] == 5 and last["eta_s"] == 0
    assert events[-1]["output"] == "-" and events[-1]["rendered"] == 5


def test_json_progress_reports_errors_as_json(tmp_path):
    r = run(tmp_path / "missing.txt", "--progress", "json")
    assert r.exit_code == 2
    event = json.loads(r.stderr.strip())
    assert event["event"] == "error" and event["exit_code"] == 2 and "no such file" in event["message"]


def test_stdout_needs_a_format(tmp_path, book):
    r = run(book, "-o", "-")
    assert r.exit_code == 2 and "--format" in r.stderr


@pytest.mark.parametrize(
    "content",
    [
        "word " * 200_000,  # a 1-MB line with no punctuation
        "Hello \u202eworld\u202c. \x07Bell\x00? \u05e9\u05dc\u05d5\u05dd \U0001f600 fine.",  # controls, RTL, emoji
    ],
)
def test_hostile_text_plans_or_fails_clearly(tmp_path, content):
    p = tmp_path / "x.txt"
    p.write_text(content, encoding="utf-8", errors="surrogatepass")
    r = run(p, "--dry-run", "--max-chars", "300")
    if r.exit_code == 0:
        chunks = [line for line in r.stdout.splitlines() if line[:5].strip().isdigit()]
        assert chunks and all(len(line[6:]) <= 300 for line in chunks)
    else:
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_invalid_utf8_is_read_with_the_8bit_fallback(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"Caf\xe9 au lait. Na\xefve text.\n")
    r = run(p, "--dry-run")
    assert r.exit_code == 0 and "Cafe au lait." in r.stdout


def test_huge_text_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    import ttsbatch.text.readers as readers

    monkeypatch.setattr(readers, "MAX_INPUT_BYTES", 1000)
    p = tmp_path / "big.txt"
    p.write_text("A sentence. " * 200)
    r = run(p, "--dry-run")
    assert r.exit_code == 2 and "split it into parts" in r.stderr


def test_voice_that_is_not_audio_or_huge(tmp_path):
    from ttsbatch.engine.voice import MAX_VOICE_READ_S, read_voice

    big = tmp_path / "long.wav"
    t = np.arange(24000 * 90) / 24000
    sf.write(big, (0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 24000)
    v = read_voice(big)
    assert len(v.wav) == int(MAX_VOICE_READ_S * 24000)  # only the first minute is read


def test_a_streaming_engine_failing_midway_keeps_what_it_finished(tiny_checkpoint, tmp_path, book, monkeypatch):
    """The fast engine streams chunks as they finish. If it fails midway (here: out of GPU
    memory after two chunks), the two it finished are stored and never rendered again; only
    the unfinished ones are retried, in a smaller batch."""
    import torch

    from ttsbatch.engine.fast import FastEngine

    real = FastEngine.synthesize_stream
    calls = []
    finished_first = []  # texts the failing call handed over before it failed

    def runs_out_after_two(self, requests, *a, **k):
        calls.append([r.text for r in requests])
        for n, (i, result) in enumerate(real(self, requests, *a, **k)):
            if len(calls) == 1 and n == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if len(calls) == 1:
                finished_first.append(requests[i].text)
            yield i, result

    monkeypatch.setattr(FastEngine, "synthesize_stream", runs_out_after_two)
    out = tmp_path / "out.wav"
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST, "--engine", "fast", "--cfm-steps", "2")
    assert r.exit_code == 0, r.output
    assert "out of GPU memory with 5 chunks in a batch; retrying with 1" in r.stderr
    assert len(calls[0]) == 5
    retried = [t for c in calls[1:] for t in c]
    assert len(finished_first) == 2 and len(retried) == 3
    assert sorted(finished_first + retried) == sorted(calls[0])  # each chunk rendered once
    assert "5 chunks rendered" in r.stderr and out.is_file()
    assert len(ids_in_index(tmp_path / ".out.wav.ttsbatch")) == 5


def _sink_plan(n):
    from ttsbatch.config import GenerationOptions
    from ttsbatch.plan import make_plan
    from ttsbatch.text.document import Chunk

    chunks = [Chunk(index=i, text=f"s{i}", source=f"s{i}", chapter=0, paragraph=i, boundary="sentence") for i in range(n)]
    return make_plan(chunks, "v", GenerationOptions(), "m")


class _GroupMark:
    """A watermarker that halves the signal and records who marked how many at once."""

    def __init__(self, delay=0.0):
        import random

        self.rnd, self.delay, self.threads, self.groups = random.Random(0), delay, set(), []

    def apply_batch(self, wavs, sr):
        import threading

        self.threads.add(threading.current_thread().name)
        self.groups.append(len(wavs))
        time.sleep(self.rnd.uniform(0, self.delay))  # workers finish out of order
        return [w * 0.5 for w in wavs]


def test_background_sink_stores_every_chunk_and_reports_in_hand_over_order(tmp_path):
    """The GPU-side sink: several workers mark groups of chunks and store them at once;
    ChunkDone keeps the order the chunks were handed over in."""
    from ttsbatch.pipeline import _ChunkSink
    from ttsbatch.store import ChunkStore

    plan = _sink_plan(24)
    store = ChunkStore(tmp_path)
    mark = _GroupMark(delay=0.02)
    sink = _ChunkSink(mark, store, "fast", 24000, depth=8, background=True, workers=3, group=3)
    done = []
    for i, p in enumerate(plan):
        done += sink.put(p, np.full(2400, 0.2 + i / 100, np.float32), 10)
    done += sink.drain()
    sink.close()
    assert [d.planned.id for d in done] == [p.id for p in plan]
    assert mark.groups == [3] * 8  # marked three at a time
    assert len(mark.threads) > 1
    assert sink.waited_s > 0  # 24 chunks through a queue of 8: put() waited, and counted it
    for i, p in enumerate(plan):
        wav, _ = store.get(p.id)
        np.testing.assert_allclose(wav, (0.2 + i / 100) * 0.5, atol=1e-6)  # marked, stored as its own
    assert all(d.seconds == 0.1 and d.tokens == 10 for d in done)


def test_background_sink_hands_over_a_short_group_when_the_engine_call_ends(tmp_path):
    """A group is handed over when full, or by ready() (the engine's call is over) with what
    it has; close() stores a group that was never handed over (an interrupted run keeps
    every rendered chunk)."""
    from ttsbatch.pipeline import _ChunkSink
    from ttsbatch.store import ChunkStore

    plan = _sink_plan(7)
    store = ChunkStore(tmp_path)
    mark = _GroupMark()
    sink = _ChunkSink(mark, store, "fast", 24000, background=True, workers=1, group=4)
    done = []
    for p in plan[:5]:
        done += sink.put(p, np.full(240, 0.1, np.float32), 1)
    assert mark.groups in ([], [4])  # the fifth chunk waits for its group
    done += sink.ready()
    done += sink.drain()
    assert [d.planned.id for d in done] == [p.id for p in plan[:5]]
    assert mark.groups == [4, 1]
    for p in plan[5:]:
        sink.put(p, np.full(240, 0.1, np.float32), 1)
    sink.close()  # as an interrupt leaves it: two chunks in an open group
    assert mark.groups == [4, 1, 2]
    assert all(store.has(p.id) for p in plan)


def test_background_sink_stores_the_last_groups_with_more_threads_once_the_engine_is_done(tmp_path):
    """Beside the engine ``workers`` threads mark and store; once its call has ended
    (ready), the groups still queued (its last collection, handed over at once) get
    ``end_workers``."""
    import threading

    from ttsbatch.pipeline import _ChunkSink
    from ttsbatch.store import ChunkStore

    running, most, phase = [0], {"engine": 0, "end": 0}, ["engine"]
    lock = threading.Lock()

    class Counted(_GroupMark):
        def apply_batch(self, wavs, sr):
            with lock:
                running[0] += 1
                most[phase[0]] = max(most[phase[0]], running[0])
            time.sleep(0.1)  # long enough for another queued group to start if it may
            with lock:
                running[0] -= 1
            return super().apply_batch(wavs, sr)

    plan = _sink_plan(16)
    store = ChunkStore(tmp_path)
    mark = Counted()
    sink = _ChunkSink(mark, store, "fast", 24000, background=True, workers=1, group=2, end_workers=3)
    done = []
    for p in plan[:8]:  # four groups queued beside the engine
        done += sink.put(p, np.full(240, 0.1, np.float32), 1)
    time.sleep(0.25)
    assert {n.split("_")[0] for n in mark.threads} == {"ttsbatch-store"}  # one thread beside the engine
    phase[0] = "end"
    for p in plan[8:]:  # the last collection, at once
        done += sink.put(p, np.full(240, 0.1, np.float32), 1)
    done += sink.ready()
    done += sink.drain()
    sink.close()
    assert [d.planned.id for d in done] == [p.id for p in plan]
    assert most["engine"] == 1 and most["end"] >= 2
    assert any(n.startswith("ttsbatch-store-end") for n in mark.threads)  # the two made at the end
    assert all(store.has(p.id) for p in plan)


def test_background_sink_marks_groups_with_perth_as_chunk_by_chunk(tmp_path):
    """With the real (CPU) Perth: what the store threads keep, marked a group at a time, is
    what marking each chunk alone keeps (1e-6: float rounding, under FLAC's 24-bit step
    of 1.2e-7 plus the batched convolutions'), and it carries the mark."""
    from ttsbatch.audio.watermark import load_watermarker
    from ttsbatch.pipeline import _ChunkSink
    from ttsbatch.store import ChunkStore

    wm = load_watermarker("cpu")
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(int(24000 * s))).astype(np.float32) for s in (2.5, 0.7, 4.0)]
    plan = _sink_plan(3)
    batched, alone = ChunkStore(tmp_path / "b"), ChunkStore(tmp_path / "a")
    sink = _ChunkSink(wm, batched, "fast", 24000, background=True, workers=1, group=2)
    for p, w in zip(plan, wavs):
        sink.put(p, w, 1)
    assert len(sink.drain()) == 3
    sink.close()
    inline = _ChunkSink(wm, alone, "fast", 24000, background=False)
    for p, w in zip(plan, wavs):
        inline.put(p, w, 1)
    for p in plan:
        b, _ = batched.get(p.id)
        a, _ = alone.get(p.id)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        assert wm.is_marked(b, 24000)

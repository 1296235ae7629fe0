"""The book's track stitched and encoded while chunks arrive (ttsbatch.track, StreamEncoder)."""

import random
import time

import numpy as np
import pytest
import soundfile as sf

from ttsbatch.audio.export import FFmpegError, StreamEncoder, decode_audio, encode, finish_stream
from ttsbatch.audio.stitch import TrackWriter
from ttsbatch.config import ExportOptions, GenerationOptions, Options
from ttsbatch.plan import make_plan
from ttsbatch.store import ChunkStore, StoreError
from ttsbatch.text.document import Chapter, Chunk, Document
from ttsbatch.track import BookTrack
from ttsbatch.track_process import TrackProcess

SR = 24000


def book(n=12):
    """A document of two chapters and n chunks, each with distinct audio in a store."""
    doc = Document("book", (Chapter("One", ("p",)), Chapter("Two", ("q",))))
    chunks = [
        Chunk(index=i, text=f"sentence {i}", source=f"sentence {i}", chapter=0 if i < n // 2 else 1, paragraph=i,
              boundary="chapter" if i == n // 2 - 1 else ("end" if i == n - 1 else "sentence"))
        for i in range(n)
    ]
    return doc, make_plan(chunks, "voice", GenerationOptions(), "model")


def chunk_audio(i):
    rng = np.random.default_rng(i)
    t = np.arange(round((0.3 + 0.05 * i) * SR)) / SR
    body = (0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    return np.concatenate([np.zeros(2400, np.float32), body, np.zeros(1200, np.float32)])


def offline_track(plan, doc, store, path):
    """What stitching after the run gives (the old way): a WAV track of the whole plan."""
    chapter = None
    with TrackWriter(path, SR) as w:
        for p in plan:
            if p.chunk.chapter != chapter:
                chapter = p.chunk.chapter
                w.start_chapter(doc.chapters[chapter].title)
            w.add(store.get(p.id)[0], p.chunk.boundary)
        return list(w.chapters), w.duration_s


@pytest.mark.parametrize("background", [False, True])
def test_track_streams_in_document_order_and_equals_the_offline_stitch(tmp_path, background):
    doc, plan = book()
    store = ChunkStore(tmp_path / "work")
    order = list(range(len(plan)))
    random.Random(3).shuffle(order)  # the engine finishes chunks out of order
    out = tmp_path / "out.wav"
    encoded = tmp_path / "enc.tmp"
    progress = []
    with BookTrack(plan, doc, store, Options(), encoded, ".wav", background=background) as track:
        for i in order:
            store.put(plan[i].id, chunk_audio(i), SR)
            track.stored(plan[i])
            if not background:
                # inline: everything up to the first missing chunk is already appended
                stored = {plan[j].id for j in order[: order.index(i) + 1]}
                expect = next((k for k, p in enumerate(plan) if p.id not in stored), len(plan))
                assert track.stitched == expect
            progress.append(track.stitched)
        if background:  # the thread stitches everything beside the run, before finish is called
            deadline = time.monotonic() + 20
            while track.stitched < len(plan) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert track.stitched == len(plan)
        chapters, seconds = track.finish()
    if not background:
        assert progress[-1] == len(plan) and 0 < progress[len(plan) // 2] < len(plan)  # stitched during the run
    finish_stream(encoded, out, chapters=chapters, title="book", total_s=seconds)

    ref_chapters, ref_seconds = offline_track(plan, doc, store, tmp_path / "ref.wav")
    encode(tmp_path / "ref.wav", tmp_path / "ref-out.wav", ExportOptions())
    assert chapters == ref_chapters and seconds == pytest.approx(ref_seconds)
    got, _ = sf.read(out, dtype="float32")
    ref, _ = sf.read(tmp_path / "ref-out.wav", dtype="float32")
    np.testing.assert_array_equal(got, ref)  # the same 16-bit samples


@pytest.mark.parametrize("cores", ["few", "many"])
def test_track_mp3_has_chapters_and_the_whole_length(tmp_path, monkeypatch, cores):
    """A short book is one segment even with many cores: gapless, as one streaming encoder."""
    from ttsbatch.audio.export import probe_duration
    from ttsbatch.audio.ffmpeg import ffmpeg_exe
    import subprocess

    from ttsbatch.audio import segments

    monkeypatch.setattr(segments, "default_workers", lambda: 1 if cores == "few" else 2)
    doc, plan = book(8)
    store = ChunkStore(tmp_path / "work")
    for i, p in enumerate(plan):
        store.put(p.id, chunk_audio(i), SR)
    with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".mp3", background=True) as track:
        chapters, seconds = track.finish()  # everything was stored before: finish stitches it all
    assert type(track._encoder).__name__ == ("StreamEncoder" if cores == "few" else "SegmentedEncoder")
    assert not track.frames_only  # one segment: encoded with its header, as a streaming encoder does
    out = tmp_path / "book.mp3"
    finish_stream(tmp_path / "enc.tmp", out, chapters=chapters, title="My Book", total_s=seconds)
    # bare frames are what the remux copies unchanged (the watermark is read from them
    # beside it); a streaming encoder's own header is replaced
    assert out.read_bytes().endswith((tmp_path / "enc.tmp").read_bytes()) == track.frames_only
    assert probe_duration(out) == pytest.approx(seconds, abs=0.06)
    wav, _ = decode_audio(out, sr=SR)
    assert abs(len(wav) - round(seconds * SR)) <= 2  # gapless: the encoder's delay is not added
    banner = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "Chapter #0:1" in banner and "title           : Two" in banner and "My Book" in banner
    assert [t for t, _ in chapters] == ["One", "Two"]


@pytest.fixture
def many_cores(monkeypatch):
    """BookTrack segments an MP3 only where several encoders can run at once."""
    from ttsbatch.audio import segments

    monkeypatch.setattr(segments, "default_workers", lambda: 2)


@pytest.mark.parametrize("ext", [".mp3", ".ogg"])
def test_track_left_without_finish_removes_the_partial_file(tmp_path, ext, many_cores):
    doc, plan = book(6)
    store = ChunkStore(tmp_path / "work")
    encoded = tmp_path / "enc.tmp"
    with pytest.raises(RuntimeError, match="engine failed"):
        with BookTrack(plan, doc, store, Options(), encoded, ext) as track:
            store.put(plan[0].id, chunk_audio(0), SR)
            track.stored(plan[0])
            assert track.stitched == 1
            enc = track._encoder
            if ext == ".mp3":  # spooled into its parts directory, encoded in segments
                assert list(enc.dir.iterdir())
            else:
                assert enc._proc.poll() is None  # ffmpeg is encoding
            raise RuntimeError("engine failed")
    if ext == ".mp3":
        assert not enc.dir.exists()
    else:
        assert enc._proc.returncode is not None
    assert not encoded.exists()


def test_segmented_mp3_is_cut_at_pauses_and_keeps_time(tmp_path, monkeypatch, many_cores):
    """An MP3 track of several segments (cut after paragraph and chapter pauses, encoded by
    separate ffmpeg processes, joined frame by frame): every segment's audio sits where
    ``output_time`` says (within 1 sample, found by cross-correlation against the offline
    stitch), the length is what ``finish`` reports, and the chapter mark is a segment start."""
    from ttsbatch.audio import segments
    from ttsbatch.audio.ffmpeg import ffmpeg_exe
    import subprocess

    monkeypatch.setattr(segments, "SEGMENT_S", 0.5)  # a cut at every paragraph end past 0.5 s
    doc = Document("book", (Chapter("One", ("p",)), Chapter("Two", ("q",))))
    n = 10
    chunks = [
        Chunk(index=i, text=f"s {i}", source=f"s {i}", chapter=0 if i < 5 else 1, paragraph=i // 2,
              boundary="chapter" if i == 4 else ("end" if i == n - 1 else ("paragraph" if i % 2 else "sentence")))
        for i in range(n)
    ]
    plan = make_plan(chunks, "voice", GenerationOptions(), "model")
    store = ChunkStore(tmp_path / "work")
    for i, p in enumerate(plan):
        store.put(p.id, chunk_audio(i), SR)
    with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".mp3") as track:
        chapters, seconds = track.finish()
    enc = track._encoder
    assert len(enc.segments) >= 4 and not enc.dir.exists()
    out = tmp_path / "book.mp3"
    finish_stream(tmp_path / "enc.tmp", out, chapters=chapters, title="book", total_s=seconds)
    # bare frames, copied unchanged by the remux (the watermark is read from them beside it)
    assert track.frames_only and out.read_bytes().endswith((tmp_path / "enc.tmp").read_bytes())
    got, _ = decode_audio(out, sr=SR)
    assert abs(len(got) - round(seconds * SR)) <= 2
    offline_track(plan, doc, store, tmp_path / "ref.wav")
    ref, _ = sf.read(tmp_path / "ref.wav", dtype="float32")
    for seg in enc.segments:
        want = ref[seg.written_start : seg.written_start + seg.samples]
        at = round(seg.out_start_s * SR)  # = output_time(its start), but for the first (its mark stays at 0)
        lags = range(-40, 41)
        window = got[at - 40 : at + len(want) + 40]
        corr = [float(np.dot(window[40 + d : 40 + d + len(want)], want)) for d in lags]
        best = lags[int(np.argmax(corr))]
        assert abs(best) <= 1, f"segment at {seg.written_start}: off by {best} samples"
        assert max(corr) > 0.9 * float(np.dot(want, want))  # the same audio, through MP3
    two = next(s for s in enc.segments if s.written_start == track._writer.chunk_starts[5])  # chapter Two's first chunk
    assert chapters == [("One", 0.0), ("Two", two.out_start_s)]
    banner = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert f"start {two.out_start_s:.3f}" in banner


def test_segments_cut_only_when_long_enough_and_a_cut_at_the_end_is_harmless(tmp_path):
    from ttsbatch.audio.segments import SegmentedEncoder

    enc = SegmentedEncoder(tmp_path / "enc.tmp", SR, ExportOptions(), segment_s=1.0)
    a = chunk_audio(2)  # 0.5 s
    for _ in range(5):
        enc.write(a)
        enc.cut()  # cuts after 1.0 s: after the 2nd and the 4th block, and once more at the end
    enc.close()
    assert [s.samples for s in enc.segments] == [2 * len(a), 2 * len(a), len(a)]
    finish_stream(tmp_path / "enc.tmp", tmp_path / "out.mp3", total_s=enc.duration_s)
    got, _ = decode_audio(tmp_path / "out.mp3", sr=SR)
    assert abs(len(got) - round(enc.duration_s * SR)) <= 1
    assert enc.duration_s > 5 * len(a) / SR  # each segment brings LAME's delay and padding


def test_segments_are_joined_in_order_while_the_track_is_written(tmp_path):
    """Each encoded segment is appended to the joined file as soon as those before it are,
    before ``close``: the frames on disk then are exactly the segments' own, in order."""
    from ttsbatch.audio.segments import SegmentedEncoder

    path = tmp_path / "enc.tmp"
    enc = SegmentedEncoder(path, SR, ExportOptions(), workers=2, segment_s=1.0)
    a = chunk_audio(2)  # 0.5 s
    sizes = []
    for k in range(6):
        enc.write(a)
        enc.cut()
        if k % 2:  # a segment was just submitted: wait for it, note its frames
            seg = enc.segments[-2]
            seg.job.result()
            sizes.append(path.stat().st_size)
            assert not seg.mp3.exists()  # joined, then deleted: the disk holds it once
    assert 0 < sizes[0] < sizes[1] < sizes[2]  # grew segment by segment before close
    enc.write(a)
    enc.close()
    assert path.stat().st_size > sizes[-1] and not enc.dir.exists()
    starts = [s.out_start_s for s in enc.segments]
    assert starts == sorted(starts) and starts[0] > 0  # LAME's delay before the first sample
    finish_stream(path, tmp_path / "out.mp3", total_s=enc.duration_s)
    got, _ = decode_audio(tmp_path / "out.mp3", sr=SR)
    assert abs(len(got) - round(enc.duration_s * SR)) <= 1
    # the fourth block of the track plays where output_time says (the mapping is exact)
    at = round(enc.output_time(3 * len(a) / SR) * SR)
    i = np.argmax(np.abs(a) > 0.05)  # the block's first loud sample
    j = at + i
    assert np.corrcoef(got[j : j + 2000], a[i : i + 2000])[0, 1] > 0.95


def test_segment_encode_failure_is_one_line_and_leaves_nothing(tmp_path):
    from ttsbatch.audio.segments import SegmentedEncoder

    path = tmp_path / "enc.tmp"
    enc = SegmentedEncoder(path, SR, ExportOptions(mp3_bitrate="no-such-rate"), segment_s=0.1)
    for _ in range(3):
        enc.write(chunk_audio(1))
        enc.cut()
    with pytest.raises(FFmpegError) as e:
        enc.close()
    assert "encoding part" in str(e.value) and "\n" not in str(e.value)
    assert not path.exists() and not enc.dir.exists()


def test_track_finish_with_a_chunk_missing_names_it(tmp_path):
    from ttsbatch.store import StoreError

    doc, plan = book(4)
    store = ChunkStore(tmp_path / "work")
    for i in (0, 1, 3):
        store.put(plan[i].id, chunk_audio(i), SR)
    with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".wav", background=True) as track:
        with pytest.raises(StoreError, match="chunk 3 "):
            track.finish()
    assert not (tmp_path / "enc.tmp").exists()


def test_stream_encoder_reports_ffmpeg_failure_in_one_line(tmp_path):
    enc = StreamEncoder(tmp_path / "x.mp3", ".mp3", SR, ExportOptions(mp3_bitrate="nonsense"))
    with pytest.raises(FFmpegError) as e:
        for _ in range(50):  # ffmpeg refuses the bitrate and exits; writing or closing says so
            enc.write(np.zeros(SR, np.float32))
        enc.close()
    assert "encoding x.mp3 failed" in str(e.value) and "\n" not in str(e.value)
    enc.abort()
    assert not (tmp_path / "x.mp3").exists()


def test_segment_spool_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from ttsbatch.audio.segments import SegmentedEncoder
    from ttsbatch.store import StoreError

    enc = SegmentedEncoder(tmp_path / "enc.tmp", SR, ExportOptions(), segment_s=0.1)

    class Full:
        def write(self, b):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    enc._file = Full()
    with pytest.raises(StoreError, match="No space left on device"):
        enc.write(chunk_audio(0))
    enc.abort()
    assert not enc.dir.exists()


def test_hurried_segments_are_shorter_and_encoded_by_more_processes(tmp_path, monkeypatch):
    """Beside the engine at most ``workers`` segments encode at once; once the engine is
    done (``hurry``) the rest is cut into quarter-length segments that up to every core but
    one encode at once, and the joined file is as long as the segments say."""
    import threading

    from ttsbatch.audio import segments
    from ttsbatch.audio.segments import SegmentedEncoder

    monkeypatch.setattr(segments, "final_workers", lambda: 3)  # "every core but one" on a 4-core machine
    running, most = [0], {"before": 0, "after": 0}
    lock = threading.Lock()
    phase = ["before"]
    real = SegmentedEncoder._encode_now

    def counted(self, seg, gapless):
        with lock:
            running[0] += 1
            most[phase[0]] = max(most[phase[0]], running[0])
        time.sleep(0.2)  # long enough for the other submitted segments to start if they may
        with lock:
            running[0] -= 1
        real(self, seg, gapless)

    monkeypatch.setattr(SegmentedEncoder, "_encode_now", counted)
    enc = SegmentedEncoder(tmp_path / "enc.tmp", SR, ExportOptions(), workers=1, segment_s=1.0)
    a = chunk_audio(2)  # 0.5 s
    for _ in range(6):  # three segments of 1.0 s, one encoder at a time
        enc.write(a)
        enc.cut()
    time.sleep(0.7)
    phase[0] = "after"
    enc.hurry()
    for _ in range(4):  # now a segment at every cut (0.25 s is enough)
        enc.write(a)
        enc.cut()
    enc.close()
    assert [s.samples for s in enc.segments] == [2 * len(a)] * 3 + [len(a)] * 4
    assert most["before"] == 1 and most["after"] >= 2
    finish_stream(tmp_path / "enc.tmp", tmp_path / "out.mp3", total_s=enc.duration_s)
    got, _ = decode_audio(tmp_path / "out.mp3", sr=SR)
    assert abs(len(got) - round(enc.duration_s * SR)) <= 1


def test_track_finish_hurries_its_segment_encoder(tmp_path, monkeypatch, many_cores):
    from ttsbatch.audio.segments import SegmentedEncoder

    hurried = []
    monkeypatch.setattr(SegmentedEncoder, "hurry", lambda self, *a, **k: hurried.append(self))
    doc, plan = book()
    store = ChunkStore(tmp_path / "work")
    for i, p in enumerate(plan):
        store.put(p.id, chunk_audio(i), SR)
    with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".mp3", background=True) as track:
        track.finish()
    assert hurried == [track._encoder]


def _tag_and_audio(path):
    """(the ID3v2 tag's frames without their padding, everything after the tag) of an MP3."""
    from mutagen.id3 import ID3

    data, size = path.read_bytes(), ID3(str(path)).size
    return data[10:size].rstrip(b"\0"), data[size:]


def _segmented_track(tmp_path, monkeypatch, remux_to, n=10):
    """A two-chapter book in several MP3 segments (a cut at every paragraph end)."""
    from ttsbatch.audio import segments

    monkeypatch.setattr(segments, "SEGMENT_S", 0.5)
    doc = Document("My Book", (Chapter("One", ("p",)), Chapter("Twö", ("q",))))
    chunks = [
        Chunk(index=i, text=f"s {i}", source=f"s {i}", chapter=0 if i < n // 2 else 1, paragraph=i // 2,
              boundary="chapter" if i == n // 2 - 1 else ("end" if i == n - 1 else ("paragraph" if i % 2 else "sentence")))
        for i in range(n)
    ]
    plan = make_plan(chunks, "voice", GenerationOptions(), "model")
    store = ChunkStore(tmp_path / "work")
    for i, p in enumerate(plan):
        store.put(p.id, chunk_audio(i), SR)
    with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".mp3", remux_to=remux_to) as track:
        chapters, seconds = track.finish()
    return doc, track, chapters, seconds


def test_live_remux_is_the_remux_at_the_end_with_the_chapters_written_in_place(tmp_path, monkeypatch, many_cores):
    """The frames copied under their header while the book is joined, plus the chapters
    written into the tag's padding afterwards, are byte for byte what remuxing the finished
    frames gives (``finish_stream``): the same Xing header and frames, the same tag frames
    (ffmpeg writes both), only the padding differs; and the file's size does not change."""
    from ttsbatch.audio.export import add_chapters
    from ttsbatch.audio.ffmpeg import ffmpeg_exe
    import subprocess

    live = tmp_path / "live.mp3"
    doc, track, chapters, seconds = _segmented_track(tmp_path, monkeypatch, live)
    assert track.frames_only and track.remuxed == live
    size = live.stat().st_size
    assert add_chapters(live, chapters, doc.name, seconds)
    assert live.stat().st_size == size  # written in place: the audio was not moved
    ref = tmp_path / "ref.mp3"
    finish_stream(tmp_path / "enc.tmp", ref, chapters=chapters, title=doc.name, total_s=seconds)
    assert _tag_and_audio(live) == _tag_and_audio(ref)
    assert live.read_bytes() != ref.read_bytes()  # (the padding)
    banner = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(live)], capture_output=True, text=True).stderr
    assert "Chapter #0:1" in banner and "title           : Twö" in banner and "My Book" in banner


def test_chapters_fit_the_padding_reserved_for_their_titles_and_else_leave_the_file_alone(tmp_path, monkeypatch, many_cores):
    from ttsbatch.audio.export import FramesRemux, add_chapters, chapter_tag_bytes

    live = tmp_path / "live.mp3"
    doc, track, chapters, seconds = _segmented_track(tmp_path, monkeypatch, live)
    titles = [f"Chapter {k}: {'ü' * (k % 7)} the long way home, part {k}" for k in range(60)]
    many = [(t, k * seconds / 60) for k, t in enumerate(titles)]
    before = live.read_bytes()
    assert not add_chapters(live, many, doc.name, seconds)  # reserved for two short titles
    assert live.read_bytes() == before
    roomy = FramesRemux(tmp_path / "roomy.mp3", doc.name, padding=chapter_tag_bytes(titles))
    roomy.write((tmp_path / "enc.tmp").read_bytes())
    roomy.close()
    size = (tmp_path / "roomy.mp3").stat().st_size
    assert add_chapters(tmp_path / "roomy.mp3", many, doc.name, seconds)
    assert (tmp_path / "roomy.mp3").stat().st_size == size


def test_a_failing_live_remux_leaves_the_frames_for_the_remux_at_the_end(tmp_path, monkeypatch, many_cores):
    from ttsbatch.audio.export import FramesRemux

    def broken(self, frames):
        raise FFmpegError("writing live.mp3 failed: No space left on device")

    monkeypatch.setattr(FramesRemux, "write", broken)
    live = tmp_path / "live.mp3"
    doc, track, chapters, seconds = _segmented_track(tmp_path, monkeypatch, live)
    assert track.remuxed is None and not live.exists()
    out = tmp_path / "out.mp3"
    finish_stream(tmp_path / "enc.tmp", out, chapters=chapters, title=doc.name, total_s=seconds)
    got, _ = decode_audio(out, sr=SR)
    assert abs(len(got) - round(seconds * SR)) <= 2


def test_a_track_left_without_finish_removes_its_live_remux(tmp_path, many_cores, monkeypatch):
    from ttsbatch.audio import segments

    monkeypatch.setattr(segments, "SEGMENT_S", 0.3)
    doc, plan = book(8)
    store = ChunkStore(tmp_path / "work")
    live = tmp_path / "live.mp3"
    with pytest.raises(RuntimeError, match="engine failed"):
        with BookTrack(plan, doc, store, Options(), tmp_path / "enc.tmp", ".mp3", remux_to=live) as track:
            for i, p in enumerate(plan[:6]):
                store.put(p.id, chunk_audio(i), SR)
                track.stored(p)
            enc = track._encoder
            deadline = time.monotonic() + 30
            # a segment joined: ffmpeg remuxes (and opens its output once it has read the input's
            # header: under load that came after the remux had started, so wait for both)
            while (enc._remux is None or not live.exists()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert live.exists()
            raise RuntimeError("engine failed")
    assert not live.exists() and not (tmp_path / "enc.tmp").exists()


# -- the track in a process of its own (ttsbatch.track_process) ------------------------------


def _stored_book(tmp_path, n=10):
    doc, plan = book(n)
    store = ChunkStore(tmp_path / "work")
    for i, p in enumerate(plan):
        store.put(p.id, chunk_audio(i), SR)
    return doc, plan, store


@pytest.mark.parametrize("ext", [".mp3", ".flac"])
def test_the_process_makes_the_threads_track_byte_for_byte(tmp_path, ext):
    doc, plan, store = _stored_book(tmp_path)
    results = {}
    for kind, make in {"thread": lambda enc: BookTrack(plan, doc, store, Options(), enc, ext, background=True),
                       "process": lambda enc: TrackProcess(plan, doc, store, Options(), enc, ext)}.items():
        enc = tmp_path / f"{kind}.tmp"
        with make(enc) as track:
            for p in reversed(plan):  # out of order, as an engine hands them over
                track.stored(p)
            chapters, seconds = track.finish()
        results[kind] = (chapters, seconds, track.frames_only, enc.read_bytes())
    assert results["process"] == results["thread"]
    assert [t for t, _ in results["process"][0]] == ["One", "Two"] and results["process"][1] > 0


@pytest.mark.parametrize("ext", [".mp3", ".wav"])
def test_chunks_prepared_ahead_of_the_cursor_make_the_same_track(tmp_path, monkeypatch, ext):
    """Chunks rendered in reverse (the cursor waits for the first till the end): those stored
    ahead of it are read, trimmed and faded ahead (up to ``prepare_ahead`` at once; the
    rest as before), on threads or in the track's process; the track is the same."""
    import os

    doc, plan, staged = _stored_book(tmp_path, 10)
    prepared = []
    real = BookTrack._prepare
    monkeypatch.setattr(BookTrack, "_prepare", lambda self, id: prepared.append(id) or real(self, id))
    kinds = {
        "plain": lambda store, enc: BookTrack(plan, doc, store, Options(), enc, ext, background=True),
        "ahead": lambda store, enc: BookTrack(plan, doc, store, Options(), enc, ext, background=True, prepare_ahead=4),
        "process": lambda store, enc: TrackProcess(plan, doc, store, Options(), enc, ext),
    }
    results = {}
    for kind, make in kinds.items():
        store = ChunkStore(tmp_path / kind)
        enc = tmp_path / f"{kind}.tmp"
        with make(store, enc) as track:
            for p in reversed(plan):
                store.path(p.id).parent.mkdir(parents=True, exist_ok=True)
                os.link(staged.path(p.id), store.path(p.id))  # "rendered" now
                track.stored(p)
            chapters, seconds = track.finish()
        results[kind] = (chapters, seconds, enc.read_bytes())
        if kind == "ahead":
            assert len(prepared) == 4  # the cap: the others were read at their turn
    assert results["ahead"] == results["plain"] and results["process"] == results["plain"]


def test_a_missing_chunk_is_the_threads_error_from_the_process(tmp_path):
    doc, plan, store = _stored_book(tmp_path, 6)
    store.path(plan[3].id).unlink()
    enc = tmp_path / "enc.tmp"
    with pytest.raises(StoreError, match="chunk 4 .* is not in the store"):
        with TrackProcess(plan, doc, store, Options(), enc, ".flac") as track:
            for p in plan[:3] + plan[4:]:
                track.stored(p)
            track.finish()
    assert not enc.exists()


def test_a_track_process_left_without_finish_removes_its_files_and_ends(tmp_path):
    doc, plan, store = _stored_book(tmp_path, 6)
    enc = tmp_path / "enc.tmp"
    with pytest.raises(RuntimeError, match="engine failed"):
        with TrackProcess(plan, doc, store, Options(), enc, ".ogg") as track:
            for p in plan[:3]:
                track.stored(p)
            raise RuntimeError("engine failed")
    assert not track._proc.is_alive() and not enc.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_a_track_process_that_dies_is_one_clear_error(tmp_path):
    doc, plan, store = _stored_book(tmp_path, 4)
    with TrackProcess(plan, doc, store, Options(), tmp_path / "enc.tmp", ".flac") as track:
        track._proc.kill()
        track._proc.join()
        with pytest.raises(StoreError, match="track's process ended unexpectedly"):
            for p in plan:
                track.stored(p)
            track.finish()


def test_ctrl_c_leaves_the_track_process_to_the_run(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the track's process carries on
    until the run (which unwinds on its own KeyboardInterrupt) tells it to stop."""
    import os
    import re
    import signal

    doc, plan, store = _stored_book(tmp_path, 4)
    with TrackProcess(plan, doc, store, Options(), tmp_path / "enc.tmp", ".flac") as track:
        def ignores_sigint():  # Linux: the process's SigIgn mask
            status = open(f"/proc/{track._proc.pid}/status").read()
            return bool(int(re.search(r"SigIgn:\s*([0-9a-f]+)", status).group(1), 16) & (1 << (signal.SIGINT - 1)))

        deadline = time.monotonic() + 20
        while not ignores_sigint() and time.monotonic() < deadline:  # the child starting up
            time.sleep(0.02)
        assert ignores_sigint()
        os.kill(track._proc.pid, signal.SIGINT)
        for p in plan:
            track.stored(p)
        chapters, seconds = track.finish()
    assert seconds > 0 and (tmp_path / "enc.tmp").exists()

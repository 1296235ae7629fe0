import os
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf

from ttsbatch.audio import export
from ttsbatch.audio.export import (
    SUPPORTED_FORMATS,
    FFmpegError,
    check_writable_output,
    decode_audio,
    encode,
    ffmpeg_exe,
    probe_duration,
    run_ffmpeg,
)
from ttsbatch.audio.stitch import TrackWriter
from ttsbatch.config import ExportOptions, StitchOptions
from ttsbatch.errors import InputError, TtsbatchError

SR = 24000


def tone(seconds, f=220.0):
    return (0.3 * np.sin(2 * np.pi * f * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    """A 7-ish second stitched track with two chapters, as the pipeline would write it."""
    path = tmp_path_factory.mktemp("track") / "track.wav"
    with TrackWriter(path, SR, StitchOptions(trim_silence=False)) as tw:
        tw.add(tone(2.0), "chapter", chapter_title="Opening; part = 1")
        tw.add(tone(1.5, 330), "sentence", chapter_title="Second chapter")
        tw.add(tone(1.2, 440), "end")
    return path, tw.duration_s, tw.chapters


def read_chapters(path):
    meta = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    chapters = []
    for section in meta.split("[CHAPTER]")[1:]:
        fields = dict(re.findall(r"^(\w+)=(.*)$", section, re.M))
        num, den = map(int, fields["TIMEBASE"].split("/"))
        chapters.append((fields["title"].replace("\\", ""), int(fields["START"]) * num / den))
    return meta, chapters


@pytest.mark.parametrize("ext", sorted(SUPPORTED_FORMATS))
def test_encode_each_format_decodes_back(track, tmp_path, ext):
    src, duration, _ = track
    out = tmp_path / f"book{ext}"
    encode(src, out, ExportOptions())
    wav, sr = decode_audio(out)
    assert sr == SR and wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) / sr - duration) < 0.05
    assert abs(probe_duration(out) - duration) < 0.05
    ref, _ = sf.read(str(src), dtype="float32")
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(np.sqrt(np.mean(ref**2)), rel=0.05)  # the audio
    assert os.listdir(tmp_path) == [out.name]  # no temp or metadata file left behind


def test_encode_resamples(track, tmp_path):
    src, duration, _ = track
    out = tmp_path / "book.mp3"
    encode(src, out, ExportOptions(sample_rate=16000))
    wav, sr = decode_audio(out)
    assert sr == 16000 and abs(len(wav) / sr - duration) < 0.05


@pytest.mark.parametrize("ext", [".m4b", ".m4a"])
def test_chapter_marks_read_back(track, tmp_path, ext):
    src, _, chapters = track
    out = tmp_path / f"book{ext}"
    encode(src, out, ExportOptions(), chapters=chapters, title="A Book", artist="An Author")
    meta, got = read_chapters(out)
    assert "title=A Book" in meta
    assert "artist=An Author" in meta
    assert [t for t, _ in got] == ["Opening; part = 1", "Second chapter"]
    assert got[0][1] == 0.0
    assert got[1][1] == pytest.approx(chapters[1][1], abs=0.01) and chapters[1][1] == pytest.approx(4.0)


def test_failed_encode_leaves_nothing(track, tmp_path):
    src, _, chapters = track
    out = tmp_path / "book.mp3"
    with pytest.raises(FFmpegError, match="encoding book.mp3 failed: .*abc"):
        encode(src, out, ExportOptions(mp3_bitrate="abc"), chapters=chapters)
    assert os.listdir(tmp_path) == []
    # an existing output survives a failed re-encode untouched
    out.write_bytes(b"old")
    with pytest.raises(InputError):
        encode(src, out, ExportOptions(mp3_bitrate="abc"))
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["book.mp3"]


def test_unsupported_extension(track, tmp_path):
    with pytest.raises(InputError, match=r"unsupported output format \.xyz.*\.m4b"):
        encode(track[0], tmp_path / "book.xyz", ExportOptions())
    assert os.listdir(tmp_path) == []


def test_check_writable_output(tmp_path, monkeypatch):
    check_writable_output(tmp_path / "ok.m4b")  # fine
    with pytest.raises(InputError, match="unsupported"):
        check_writable_output(tmp_path / "book.aiff")
    with pytest.raises(InputError, match="does not exist"):
        check_writable_output(tmp_path / "missing" / "book.mp3")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_writable_output(tmp_path / "file" / "book.mp3")
    (tmp_path / "dir.mp3").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_writable_output(tmp_path / "dir.mp3")
    # permission bits do not stop root, so simulate what os.access reports for other users
    monkeypatch.setattr(export.os, "access", lambda *a, **k: False)
    with pytest.raises(InputError, match="not writable"):
        check_writable_output(tmp_path / "book.mp3")


def test_decode_window_and_downmix(tmp_path):
    stereo = np.stack([tone(3.0), tone(3.0, 330)], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(str(path), stereo, 44100)  # stored as 44.1 kHz: the native rate is kept
    wav, sr = decode_audio(path)
    assert sr == 44100 and wav.ndim == 1 and len(wav) == len(stereo)
    mean = stereo.mean(axis=1)
    gain = float(wav @ mean / (mean @ mean))  # ffmpeg's downmix gain is (L+R)/sqrt(2)
    assert 0.9 < gain < 1.5
    np.testing.assert_allclose(wav, gain * mean, atol=1e-3)  # both channels, not just one
    win, sr = decode_audio(path, sr=16000, start_s=0.5, duration_s=0.25)
    assert sr == 16000 and abs(len(win) - 4000) <= 2


@pytest.mark.parametrize("content", [b"", b"hello, this is not audio\n" * 50, bytes(range(256)) * 40])
def test_decode_rejects_non_audio(tmp_path, content):
    path = tmp_path / "voice.wav"
    path.write_bytes(content)
    with pytest.raises(InputError, match="voice.wav"):
        decode_audio(path)
    with pytest.raises(InputError):
        probe_duration(path)


def test_decode_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such audio file"):
        decode_audio(tmp_path / "nope.mp3")


def test_run_ffmpeg_error_carries_stderr_tail():
    with pytest.raises(FFmpegError) as e:
        run_ffmpeg(["-i", "/nonexistent/x.wav", "-f", "null", "-"], what="probing x")
    assert isinstance(e.value, TtsbatchError) and e.value.exit_code == 2
    msg = str(e.value)
    assert msg.startswith("probing x failed: ") and "No such file" in msg and "\n" not in msg


def test_names_that_look_like_protocols(track, tmp_path):
    out = tmp_path / "http:book.mp3"  # ffmpeg would read "http:" as a protocol without "file:"
    encode(track[0], out, ExportOptions())
    assert abs(decode_audio(out)[0].size / SR - track[1]) < 0.05


def _toc_entries(path):
    """The chapter ids an ID3 reader finds by walking the tables of contents from the top."""
    from mutagen.id3 import ID3, CTOCFlags

    tag = ID3(str(path))
    tocs = {f.element_id: f for f in tag.getall("CTOC")}
    assert all(len(t.child_element_ids) <= 255 for t in tocs.values())
    (top,) = [t for t in tocs.values() if t.flags & CTOCFlags.TOP_LEVEL]

    def walk(toc):
        for child in toc.child_element_ids:
            yield from walk(tocs[child]) if child in tocs else [child]

    return list(walk(top)), [f.element_id for f in sorted(tag.getall("CHAP"), key=lambda f: f.start_time)]


@pytest.mark.parametrize("n", [3, 300, 600])
def test_an_mp3_with_more_chapters_than_one_id3_table_holds_lists_them_all(tmp_path, n):
    # ffmpeg wrote its chapter count into the table's one-byte count: 300 chapters read as 44
    src = tmp_path / "t.wav"
    sf.write(src, tone(n * 0.05 + 1), SR)
    chapters = [(f"Chapter {i + 1}", i * 0.05) for i in range(n)]
    out = tmp_path / "book.mp3"
    encode(src, out, ExportOptions(), chapters=chapters, title="A Book")
    listed, chaps = _toc_entries(out)
    assert len(chaps) == n and listed == chaps
    _, got = read_chapters(out)
    assert [t for t, _ in got] == [t for t, _ in chapters]


def test_chapters_added_in_place_to_an_mp3_are_all_in_its_tables(tmp_path):
    from mutagen.id3 import ID3

    src, mp3 = tmp_path / "t.wav", tmp_path / "book.mp3"
    sf.write(src, tone(16), SR)
    run_ffmpeg(["-v", "error", "-y", "-i", str(src), "-c:a", "libmp3lame", "-id3v2_version", "4",
                "-metadata", "title=x", "-metadata_header_padding", "60000", str(mp3)])
    size = ID3(str(mp3)).size
    audio = mp3.read_bytes()[size:]
    chapters = [(f"Chapter {i + 1}", i * 0.05) for i in range(300)]
    assert export.add_chapters(mp3, chapters, "A Book", 16.0, artist="An Author")
    assert ID3(str(mp3)).size == size and mp3.read_bytes()[size:] == audio  # the audio did not move
    assert str(ID3(str(mp3))["TPE1"]) == "An Author" and str(ID3(str(mp3))["TIT2"]) == "A Book"
    listed, chaps = _toc_entries(mp3)
    assert len(chaps) == 300 and listed == chaps

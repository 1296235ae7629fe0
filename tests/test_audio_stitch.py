import numpy as np
import pytest
import soundfile as sf

from ttsbatch.audio.stitch import TrackWriter, apply_fades, trim_silence
from ttsbatch.config import StitchOptions

SR = 24000


def tone(seconds, amp=0.3, f=220.0):
    return (amp * np.sin(2 * np.pi * f * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


def padded(lead_s, body, tail_s, floor=0.0):
    rng = np.random.default_rng(0)
    lead = (floor * rng.standard_normal(round(lead_s * SR))).astype(np.float32)
    tail = (floor * rng.standard_normal(round(tail_s * SR))).astype(np.float32)
    return np.concatenate([lead, body, tail])


@pytest.mark.parametrize("floor", [0.0, 1e-4])  # digital silence, and a -80 dB noise floor
def test_trim_silence_keeps_body_and_keep_ms(floor):
    body = tone(1.0)
    wav = padded(0.3, body, 0.5, floor)
    out = trim_silence(wav, SR, StitchOptions(keep_ms=20))
    # body spans samples 7200..31200, on 10 ms (240-sample) frame edges; 20 ms = 480 kept
    assert len(out) == (31200 + 480) - (7200 - 480)
    np.testing.assert_array_equal(out[480:-480], body)


def test_trim_silence_threshold_and_edge_cases():
    quiet = tone(0.5, amp=0.02)  # rms 0.014 = -37 dBFS: speech, above -45 dB
    assert len(trim_silence(padded(0.2, quiet, 0.2), SR, StitchOptions(keep_ms=0))) == len(quiet)
    # all silent: returned unchanged rather than trimmed to nothing
    silent = np.zeros(SR // 2, np.float32)
    assert len(trim_silence(silent, SR, StitchOptions())) == len(silent)
    assert len(trim_silence(np.zeros(0, np.float32), SR, StitchOptions())) == 0
    # a louder threshold makes the quiet tone "silence"
    assert len(trim_silence(quiet, SR, StitchOptions(silence_threshold_db=-20))) == len(quiet)


def test_fades_zero_the_edges_only():
    wav = np.ones(SR, np.float32)
    out = apply_fades(wav, SR, fade_ms=10)
    n = 240
    assert out[0] == 0 and out[-1] == 0
    assert np.all(np.diff(out[:n]) > 0) and np.all(np.diff(out[-n:]) < 0)  # smooth ramps
    np.testing.assert_array_equal(out[n:-n], 1.0)
    assert wav[0] == 1.0  # input untouched
    assert apply_fades(np.ones(3, np.float32), SR, 10).tolist() == [0.0, 1.0, 0.0]  # short chunk


def test_track_writer_exact_lengths_pauses_and_chapters(tmp_path):
    opts = StitchOptions(sentence_pause_ms=250, paragraph_pause_ms=700, chapter_pause_ms=2000,
                         fade_ms=10, keep_ms=20)
    chunks = [padded(0.3, tone(1.0), 0.5), padded(0.1, tone(0.7, f=300), 0.0), padded(0.0, tone(0.4), 0.2),
              padded(0.2, tone(1.3), 0.3)]
    boundaries = ["sentence", "chapter", "paragraph", "end"]
    trimmed = [apply_fades(trim_silence(c, SR, opts), SR, opts.fade_ms) for c in chunks]
    pauses = [6000, 48000, 16800, 0]  # 250 ms, 2 s, 700 ms, none at 24 kHz

    path = tmp_path / "track.wav"
    with TrackWriter(path, SR, opts) as track:
        track.start_chapter("One")
        track.add(chunks[0], boundaries[0])
        track.add(chunks[1], boundaries[1])
        track.add(chunks[2], boundaries[2], chapter_title="Two")
        track.add(chunks[3], boundaries[3])

    expected = sum(len(t) for t in trimmed) + sum(pauses)
    assert track.samples == expected == sf.info(str(path)).frames
    assert track.duration_s == pytest.approx(expected / SR)

    starts = np.cumsum([0] + [len(t) + p for t, p in zip(trimmed, pauses)])[:-1].tolist()
    assert track.chunk_starts == starts
    assert track.chunk_ends == [s + len(t) for s, t in zip(starts, trimmed)]
    assert track.chapters == [("One", 0.0), ("Two", starts[2] / SR)]

    data, sr = sf.read(str(path), dtype="float32")
    assert sr == SR
    for s, t in zip(starts, trimmed):
        np.testing.assert_array_equal(data[s : s + len(t)], t)  # float32 file: bit exact
        assert abs(data[s]) < 1e-6 and abs(data[s + len(t) - 1]) < 1e-6  # faded: no click
    np.testing.assert_array_equal(data[starts[1] + len(trimmed[1]) : starts[2]], 0.0)  # the pause


def test_track_writer_without_trim_and_pad_to(tmp_path):
    opts = StitchOptions(trim_silence=False, sentence_pause_ms=100)
    chunk = padded(0.3, tone(0.5), 0.3)
    with TrackWriter(tmp_path / "t.wav", SR, opts) as track:
        track.add(chunk, "sentence")
        assert track.samples == len(chunk) + 2400
        assert track.pad_to(2.0) == 0 and track.samples == 2 * SR
        track.add(chunk, "end")
        assert track.pad_to(1.0) == track.samples - SR  # already past: reports the overshoot
        track.start_chapter(None)
    assert track.chunk_starts == [0, 2 * SR]
    assert track.chapters == [("Chapter 1", track.duration_s)]
    assert sf.info(str(tmp_path / "t.wav")).frames == 2 * SR + len(chunk)

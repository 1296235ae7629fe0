import sys

import numpy as np
import pytest
import soundfile as sf

from ttsbatch.audio.export import decode_audio, encode
from ttsbatch.audio.watermark import THRESHOLD, Watermarker, load_watermarker, verify_file
from ttsbatch.config import ExportOptions
from ttsbatch.errors import ModelError, WatermarkError

SR = 24000


@pytest.fixture(scope="module")
def wm():
    return load_watermarker("cpu")


def noise(seconds, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


def harmonic(seconds, f0=100.0, seed=0):
    """Speech-like: 29 harmonics with vibrato, a 3 Hz syllable envelope and a noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))) / SR
    x = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 30))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2) + 0.01 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def signals(wm):
    sigs = {"noise": noise(6), "harmonic": harmonic(6)}
    return {k: (x, wm.apply(x, SR)) for k, x in sigs.items()}


@pytest.mark.parametrize("kind", ["noise", "harmonic"])
def test_apply_marks_and_unmarked_is_not(wm, signals, kind):
    plain, marked = signals[kind]
    assert marked.dtype == np.float32 and marked.shape == plain.shape and np.isfinite(marked).all()
    assert not np.array_equal(marked, plain)
    assert wm.is_marked(marked, SR) and wm.score(marked, SR) > 0.9
    assert not wm.is_marked(plain, SR) and wm.score(plain, SR) < 0.2


@pytest.mark.parametrize("kind", ["noise", "harmonic"])
def test_mark_survives_mp3_round_trip(wm, signals, tmp_path, kind):
    plain, marked = signals[kind]
    for name, wav in (("plain", plain), ("marked", marked)):
        sf.write(str(tmp_path / f"{name}.wav"), wav, SR, subtype="FLOAT")
        encode(tmp_path / f"{name}.wav", tmp_path / f"{name}.mp3", ExportOptions(mp3_bitrate="128k"))
    back, sr = decode_audio(tmp_path / "marked.mp3")
    assert sr == SR and wm.is_marked(back, SR)
    report = verify_file(tmp_path / "marked.mp3", wm)
    assert report.marked and report.windows == 1 and report.sample_rate == SR
    assert abs(report.duration_s - 6.0) < 0.05
    assert not verify_file(tmp_path / "plain.mp3", wm).marked


def test_verify_long_file_uses_spread_windows(wm, signals, tmp_path):
    # 21 s: marked, except one unmarked and one silent 3 s stretch; windows at 0, 3, ..., 18 s
    plain, marked = (x[: 3 * SR] for x in signals["noise"])
    parts = [marked, marked, plain, np.zeros(3 * SR, np.float32), marked, marked, marked]
    sf.write(str(tmp_path / "long.flac"), np.concatenate(parts), SR)
    report = verify_file(tmp_path / "long.flac", wm, max_windows=7, window_s=3.0)
    assert report.windows == 6  # the silent window is not scored
    assert report.marked and min(report.window_scores) < THRESHOLD  # the odd window was seen
    assert report.duration_s == pytest.approx(21.0)
    # fewer windows than the file has room for: spread, capped at max_windows
    assert verify_file(tmp_path / "long.flac", wm, max_windows=2, window_s=3.0).windows == 2


def test_lengths_preserved_and_silence(wm):
    for n in (50, 1000, 24001, 3 * SR + 7):  # Perth alone drops the tail past a whole hop
        assert len(wm.apply(noise(n / SR), SR)) == n
    silence = np.zeros(SR, np.float32)
    assert wm.score(silence, SR) == 0.0  # Perth gives NaN here; we report "no mark"
    assert np.isfinite(wm.apply(silence, SR)).all()


def test_broken_perth_output_raises(wm, monkeypatch):
    monkeypatch.setattr(wm._perth, "apply_watermark", lambda x, sample_rate: np.full_like(x, np.nan))
    with pytest.raises(WatermarkError, match="refusing to write unmarked audio"):
        wm.apply(noise(1), SR)
    monkeypatch.setattr(wm._perth, "apply_watermark", lambda x, sample_rate: x[: len(x) // 2])
    with pytest.raises(WatermarkError):
        wm.apply(noise(1), SR)


def test_missing_perth_raises_one_clear_line(monkeypatch):
    for name in [m for m in sys.modules if m == "perth" or m.startswith("perth.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "perth", None)
    with pytest.raises(WatermarkError) as e:
        Watermarker("cpu")
    msg = str(e.value)
    assert msg.startswith("cannot load the Perth watermarker (ModuleNotFoundError")
    assert "refusing to write unmarked audio" in msg and "uv sync" in msg and "\n" not in msg
    assert isinstance(e.value, ModelError)


def test_missing_weights_raise(monkeypatch):
    import perth.perth_net.perth_net_implicit.perth_watermarker as pw

    def no_weights(*a, **k):
        raise FileNotFoundError("perth_net_250000.pth.tar not found")

    monkeypatch.setattr(pw, "PerthImplicitWatermarker", no_weights)
    with pytest.raises(WatermarkError, match=r"FileNotFoundError: perth_net_250000"):
        Watermarker("cpu")


def test_warm_in_background_runs_perth_once_off_the_caller(wm, monkeypatch):
    """The warm-up marks a short signal on its own thread (Perth's first call imports and
    JIT-compiles its resampler), and a failure there is left to the real calls."""
    import threading

    seen = []
    real = wm._perth.apply_watermark

    def spy(x, sample_rate):
        seen.append((threading.current_thread().name, len(x), sample_rate))
        return real(x, sample_rate=sample_rate)

    monkeypatch.setattr(wm._perth, "apply_watermark", spy)
    wm.warm_in_background(24000).join(timeout=60)
    assert seen == [("perth-warm", 12000, 24000)]
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)  # an uncaught error in a thread lands here
    monkeypatch.setattr(wm._perth, "apply_watermark", lambda x, sample_rate: 1 / 0)
    t = wm.warm_in_background(24000)
    t.join(timeout=60)
    assert not t.is_alive() and escaped == []


def _frames(tmp_path, wav, name):
    """``wav`` as a book's track is encoded: headerless MP3 frames from the segment encoders."""
    from ttsbatch.audio.segments import SegmentedEncoder

    path = tmp_path / f"{name}.frames.mp3"
    enc = SegmentedEncoder(path, SR, workers=2, segment_s=3.0)
    for part in np.array_split(wav, 3):
        enc.write(part)
        enc.cut()
    enc.close()
    return path


@pytest.fixture
def verified_paths(wm, monkeypatch):
    """The paths ``verify_file`` is asked to read, in order."""
    from ttsbatch.audio import watermark

    seen = []
    real = watermark.verify_file

    def recording(path, w, *a, **kw):
        seen.append(path)
        return real(path, w, *a, **kw)

    monkeypatch.setattr(watermark, "verify_file", recording)
    return seen


def test_publish_reads_the_mark_from_the_frames_while_the_remux_runs(wm, tmp_path, verified_paths):
    """An MP3 book: the mark is read from the track's frames beside the remux, and the output
    is published because it ends with exactly those frames; the output itself is not decoded."""
    from ttsbatch.audio.export import finish_stream
    from ttsbatch.pipeline import publish_verified

    frames = _frames(tmp_path, wm.apply(noise(9, seed=3), SR), "marked")
    out = tmp_path / "book.mp3"
    check = publish_verified(lambda staged: finish_stream(frames, staged, chapters=[("One", 0.0), ("Two", 4.0)], title="B"),
                             out, wm, frames=frames)
    assert check.marked and out.is_file() and out.read_bytes().endswith(frames.read_bytes())
    assert verified_paths == [frames]
    assert verify_file(out, wm).marked  # and the output does read as marked
    assert not list(tmp_path.glob(".book.partial*"))


def test_publish_checks_the_output_itself_when_it_does_not_end_with_the_frames(wm, tmp_path, verified_paths):
    from ttsbatch.pipeline import publish_verified

    marked = wm.apply(noise(9, seed=4), SR)
    frames = _frames(tmp_path, marked, "marked")
    sf.write(str(tmp_path / "track.wav"), marked, SR, subtype="FLOAT")
    out = tmp_path / "book.mp3"
    check = publish_verified(lambda staged: encode(tmp_path / "track.wav", staged), out, wm, frames=frames)  # re-encoded
    assert check.marked and out.is_file()
    assert [p.name for p in verified_paths] == [frames.name, ".book.partial.mp3"]


def test_publish_refuses_unmarked_frames_and_writes_nothing(wm, tmp_path, verified_paths):
    from ttsbatch.audio.export import finish_stream
    from ttsbatch.pipeline import publish_verified

    frames = _frames(tmp_path, noise(9, seed=5), "plain")
    out = tmp_path / "book.mp3"
    with pytest.raises(WatermarkError, match=r"watermark was not found .*; 9\.\d\d s of audio\); nothing written"):
        publish_verified(lambda staged: finish_stream(frames, staged), out, wm, frames=frames)
    assert not out.exists() and not list(tmp_path.glob(".book.partial*"))
    assert verified_paths == [frames]


def test_publish_says_when_the_output_is_too_short_to_hold_the_mark(wm, tmp_path):
    # 40 ms (a chunk of two speech tokens, e.g. --tokens-per-char 0.2 on "Some text."): Perth
    # marks it but cannot read it back, and "not found (score 0.31)" alone reads like a bug
    from ttsbatch.pipeline import publish_verified

    marked = wm.apply(noise(0.04, seed=6), SR)
    sf.write(str(tmp_path / "track.wav"), marked, SR, subtype="FLOAT")
    out = tmp_path / "short.wav"
    with pytest.raises(WatermarkError, match=r"0\.04 s of audio, too short to hold Perth's watermark"):
        publish_verified(lambda staged: encode(tmp_path / "track.wav", staged), out, wm)
    assert not out.exists()


def test_ends_with(tmp_path):
    from ttsbatch.pipeline import ends_with

    a, b = tmp_path / "a", tmp_path / "b"
    data = np.random.default_rng(0).bytes(100_000)
    a.write_bytes(b"HEADER" + data)
    b.write_bytes(data)
    assert ends_with(a, b, block=4096) and ends_with(b, b, block=333)
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last byte differs
    assert not ends_with(a, b, block=4096)
    b.write_bytes(b"X" + data[1:])  # the first byte differs
    assert not ends_with(a, b, block=4096)
    b.write_bytes(b"")
    assert not ends_with(a, b)
    b.write_bytes(b"HEADER" + data + b"!")  # longer than the file
    assert not ends_with(a, b)


def test_apply_batch_is_apply_signal_by_signal(wm):
    """Perth over padded groups (the GPU run's store threads) makes what Perth makes of each
    signal alone: its edges, its own frames for the mask and the convolutions. Tolerance 1e-6
    (float rounding of the batched convolutions; the mark itself moves samples by ~5e-2).
    Lengths from empty and shorter than Perth's STFT to 9 s, several groups, any order."""
    rng = np.random.default_rng(3)
    wavs = [harmonic(s, f0=90 + 20 * i, seed=i) for i, s in enumerate(rng.uniform(0.2, 9.0, 9))]
    wavs += [noise(0.004), np.zeros(0, np.float32), noise(1.5, seed=5)]
    alone = [wm.apply(x, SR) if len(x) else x for x in wavs]
    batched = wm.apply_batch(wavs, SR, group_samples=1 << 20)  # ~33 s a group: several groups
    for x, a, b in zip(wavs, alone, batched):
        assert b.dtype == np.float32 and len(b) == len(x)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert np.abs(batched[0] - wavs[0]).max() > 1e-2  # it did mark
    assert wm.is_marked(batched[0], SR) and not wm.is_marked(wavs[0], SR)


def test_apply_batch_refuses_unusable_output(wm, monkeypatch):
    """As apply: Perth's output non-finite or short for a signal stops the whole group;
    unmarked audio is never returned."""
    import torch

    inverse = wm._perth.perth_net.ap.inv_spectrogram
    monkeypatch.setattr(inverse, "forward", lambda spec, length=None: torch.full(spec.shape[:1] + (200_000,), float("nan")))
    with pytest.raises(WatermarkError, match="Perth failed to watermark a chunk"):
        wm.apply_batch([noise(1.0), noise(2.0)], SR)
    monkeypatch.setattr(inverse, "forward", lambda spec, length=None: torch.zeros(spec.shape[:1] + (3_000,)))
    with pytest.raises(WatermarkError, match="unusable audio"):
        wm.apply_batch([noise(1.0), noise(2.0)], SR)

"""Fitting speech into cue windows (pure timing), and the atempo time stretch (ffmpeg, Perth)."""

from __future__ import annotations

import numpy as np
import pytest

from ttsbatch.audio.timing import FitOptions, Slot, fit_timeline, time_stretch

SR = 24000


def fit(slots, track_end=None, **opts):
    return fit_timeline([Slot(*s) for s in slots], FitOptions(**opts), track_end)


def no_overlap(placements):
    return all(b.start >= a.end - 1e-9 for a, b in zip(placements, placements[1:]))


def test_short_speech_starts_at_cue_start_unstretched():
    p = fit([(1.0, 3.0, 0.5), (4.0, 5.0, 0.2)])
    assert [(x.start, x.length, x.stretch, x.overrun, x.delay) for x in p] == [
        (1.0, 0.5, 1.0, 0.0, 0.0),
        (4.0, 0.2, 1.0, 0.0, 0.0),
    ]


def test_silence_up_to_the_next_cue_is_used_before_stretching():
    # 2.5 s of speech in a 2 s cue: the 1 s of silence before the next cue is enough.
    p = fit([(1.0, 3.0, 2.5), (4.0, 5.0, 0.5)])
    assert p[0].stretch == 1.0 and p[0].end == 3.5 and p[0].window == 3.0
    assert p[1].start == 4.0 and p[1].delay == 0.0


def test_stretch_just_enough_to_fit():
    p = fit([(0.0, 1.0, 1.2), (1.0, 2.0, 0.5)])
    assert p[0].stretch == pytest.approx(1.2)
    assert p[0].end == pytest.approx(1.0) and p[0].overrun == 0.0
    assert p[1].start == pytest.approx(1.0)


@pytest.mark.parametrize("max_stretch", [1.0, 1.1, 1.3, 2.0])
def test_stretch_never_above_max_and_the_rest_runs_over(max_stretch):
    p = fit([(0.0, 1.0, 3.0), (1.0, 2.0, 0.4), (5.0, 6.0, 0.4)], max_stretch=max_stretch)
    assert p[0].stretch == pytest.approx(max_stretch) and p[0].stretch <= max_stretch
    assert p[0].length == pytest.approx(3.0 / max_stretch)
    assert p[0].overrun == pytest.approx(3.0 / max_stretch - 1.0)
    # The next cue waits for the voice (delayed, reported); the one after is on time again.
    assert p[1].start == pytest.approx(p[0].end) and p[1].delay == pytest.approx(p[0].overrun)
    assert p[2].start == 5.0 and p[2].delay == 0.0
    assert no_overlap(p)


def test_delays_cascade_until_there_is_silence_to_absorb_them():
    p = fit([(0.0, 1.0, 2.6), (1.0, 2.0, 1.0), (2.0, 3.0, 1.0), (10.0, 11.0, 1.0)], max_stretch=1.3)
    assert p[0].end == pytest.approx(2.0)
    assert p[1].start == pytest.approx(2.0) and p[1].delay == pytest.approx(1.0)
    # Cue 2 started late: its window to the next cue is 0, so it is sped up fully and runs over.
    assert p[1].window == 0.0 and p[1].stretch == pytest.approx(1.3)
    assert p[2].delay > 0 and p[3].delay == 0.0
    assert no_overlap(p)


def test_shift_moves_every_later_cue_by_the_overrun():
    slots = [(0.0, 1.0, 2.6), (1.0, 2.0, 0.5), (5.0, 6.0, 0.5)]
    p = fit(slots, shift=True, max_stretch=1.3)
    over = p[0].overrun
    assert over == pytest.approx(1.0)
    assert p[1].start == pytest.approx(1.0 + over)
    assert p[2].start == pytest.approx(5.0 + over)  # moved although it would have had room
    assert no_overlap(p)
    # Without --shift the last cue keeps its time.
    assert fit(slots, max_stretch=1.3)[2].start == 5.0


def test_overlapping_cues_never_overlap_in_the_output():
    # Two speakers shown at once: the second waits for the first.
    p = fit([(1.0, 4.0, 1.5), (1.5, 4.0, 1.0), (1.5, 3.0, 0.5)])
    assert no_overlap(p)
    assert p[0].stretch == pytest.approx(1.3)  # only 0.5 s until the next cue: sped up, runs over
    assert p[1].start == pytest.approx(p[0].end) and p[1].delay > 0
    assert p[2].start == pytest.approx(p[1].end)


def test_last_cue_may_use_silence_up_to_the_track_end():
    assert fit([(1.0, 2.0, 3.0)], track_end=5.0)[0].stretch == 1.0
    p = fit([(1.0, 2.0, 3.0)])  # no track end given: the cue's own end bounds it
    assert p[0].stretch == pytest.approx(1.3) and p[0].overrun > 0


def test_zero_length_speech_and_bad_options():
    assert fit([(1.0, 2.0, 0.0)])[0].length == 0.0
    with pytest.raises(ValueError):
        fit([(0.0, 1.0, 1.0)], max_stretch=0.9)
    with pytest.raises(ValueError):
        fit([(2.0, 3.0, 1.0), (1.0, 2.0, 1.0)])


# ---------------------------------------------------------------------------- the stretch itself


def _tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * SR / len(x))


@pytest.mark.parametrize("factor", [1.07, 1.3, 2.0])
def test_time_stretch_exact_length_and_pitch_kept(factor):
    x = _tone(1.0, 220.0)
    y = time_stretch(x, SR, factor)
    assert len(y) == round(len(x) / factor) and y.dtype == np.float32
    assert _peak_hz(y) == pytest.approx(220.0, abs=3.0)  # pitch preserved (a resample would give 220 * factor)
    # The content fills the result: sound until near the end (atempo's dropped tail is padded for).
    assert np.sqrt(np.mean(y[-len(y) // 10 :] ** 2)) > 0.1


def test_time_stretch_of_one_is_a_copy():
    x = _tone(0.2, 300.0)
    y = time_stretch(x, SR, 1.0)
    assert np.array_equal(x, y) and y is not x


def test_watermark_survives_the_stretch_and_remarking():
    """The measurement behind re-marking stretched cues (see ttsbatch.dub)."""
    from ttsbatch.audio.watermark import load_watermarker

    wm = load_watermarker("cpu")
    noise = (0.1 * np.random.default_rng(0).standard_normal(3 * SR)).astype(np.float32)
    marked = wm.apply(noise, SR)
    assert wm.score(noise, SR) < 0.5
    stretched = time_stretch(marked, SR, 1.3)
    assert wm.score(stretched, SR) >= 0.9
    assert wm.score(wm.apply(stretched, SR), SR) >= 0.9
    assert wm.score(time_stretch(noise, SR, 1.3), SR) < 0.5  # stretching alone does not fake a mark

"""`ttsbatch srt`: end to end on the CPU with the tiny random checkpoint.

One interrupted-then-resumed run (module fixture) renders the three spoken cues; the other
end-to-end tests reuse its chunk store (--work-dir), so they synthesize nothing.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import srt as srtlib
from typer.testing import CliRunner

from ttsbatch import cli, cli_srt

if "srt" not in [c.name for c in cli.app.registered_commands]:
    cli.app.command("srt")(cli_srt.srt)

runner = CliRunner()
app = cli.app

# Random weights never say "stop": a budget of speech tokens per character keeps runs short.
FAST = ["--device", "cpu", "--tokens-per-char", "0.2", "--ignore-eos", "--quiet"]

TEXTS = ["One dollar and eighty-seven cents.", "That was all.", "And the next day would be Christmas."]
SUBS = f"""1
00:00:00,500 --> 00:00:02,500
{TEXTS[0]}

2
00:00:03,000 --> 00:00:05,000
<i>{TEXTS[1]}</i>

3
00:00:04,000 --> 00:00:04,500
[laughs]

4
00:00:06,000 --> 00:00:08,000
- MAN: {TEXTS[2]}
"""
STARTS = [0.5, 3.0, 6.0]


def run(*args):
    return runner.invoke(app, ["srt", *[str(a) for a in args]])


def summary(result) -> dict:
    m = re.search(r"(\d+) chunks rendered, (\d+) reused", result.stderr)
    assert m, result.output
    return {"rendered": int(m.group(1)), "reused": int(m.group(2))}


@pytest.fixture(scope="module")
def dubbed(tiny_checkpoint, tmp_path_factory):
    """Interrupt the first run after one chunk, then resume it; keep what each run did."""
    from ttsbatch.engine.stock import StockEngine

    tmp = tmp_path_factory.mktemp("srt")
    subs = tmp / "subs.srt"
    subs.write_text(SUBS)
    out = tmp / "subs.wav"
    real = StockEngine.synthesize
    calls = {"n": 0}

    def dies_after_one(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # as Ctrl-C during the second chunk
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTSBATCH_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(StockEngine, "synthesize", dies_after_one)
        first = run(subs, "--model-dir", tiny_checkpoint, *FAST)
        after_first = sorted(p.name for p in tmp.iterdir())
        mp.setattr(StockEngine, "synthesize", real)
        second = run(subs, "--model-dir", tiny_checkpoint, *FAST)
    report = json.loads((tmp / "subs.timing.json").read_text())
    return {"tmp": tmp, "subs": subs, "out": out, "first": first, "after_first": after_first,
            "second": second, "report": report, "work": tmp / ".subs.wav.ttsbatch"}


def test_interrupted_run_writes_nothing_and_resumes_with_only_the_rest(dubbed):
    first, second = dubbed["first"], dubbed["second"]
    assert first.exit_code == 130, first.output
    assert "resume" in first.stderr
    assert [n for n in dubbed["after_first"] if n != "cache"] == [".subs.wav.ttsbatch", "subs.srt"]  # no output, no partial file
    assert second.exit_code == 0, second.output
    assert summary(second) == {"rendered": 2, "reused": 1}
    assert dubbed["out"].is_file()
    assert not list(dubbed["tmp"].glob(".subs.partial*"))


def test_report_and_outputs_beside_the_audio(dubbed):
    tmp, report = dubbed["tmp"], dubbed["report"]
    assert dubbed["subs"].read_text() == SUBS  # the input .srt is never overwritten ...
    assert (tmp / "subs.adjusted.srt").is_file()  # ... the adjusted one gets another name
    assert report["totals"]["cues"] == 4 and report["totals"]["spoken"] == 3
    assert report["totals"]["skipped_by_reason"] == {"sound": 1}
    cues = report["cues"]
    assert [c["text"] for c in cues] == [TEXTS[0], TEXTS[1], "", TEXTS[2]]
    assert cues[2]["skipped"] == "sound" and cues[2]["speech_start"] is None
    spoken = [c for c in cues if c["skipped"] is None]
    assert [c["speech_start"] for c in spoken] == STARTS
    for c in spoken:
        assert c["stretch"] == 1.0 and c["overrun"] == 0.0 and c["delay"] == 0.0
        assert c["speech_end"] == pytest.approx(c["speech_start"] + c["speech_length"], abs=0.0011)
        assert 0 < c["speech_length"] < 2 and len(c["chunks"]) == 1


def test_cue_starts_land_on_their_samples(dubbed):
    wav, sr = sf.read(dubbed["out"], dtype="float32")
    assert sr == 24000 and len(wav) == 8 * sr  # as long as the last cue's end
    for c in [c for c in dubbed["report"]["cues"] if c["skipped"] is None]:
        start = round(c["planned_start"] * sr)
        assert not np.any(wav[start - sr // 10 : start]), "sound before the cue start"
        first = start + int(np.flatnonzero(wav[start : start + sr // 10])[0])
        assert first - start <= 0.005 * sr, f"speech starts {(first - start) / sr * 1000:.1f} ms late"
        n = round(c["speech_length"] * sr)
        # sound, not silence (the random model's noise: a one-token cue of 40 ms had an RMS
        # of 0.0077, so the level itself is not asserted)
        assert np.abs(wav[start : start + n]).max() > 0.01 and np.sqrt(np.mean(wav[start : start + n] ** 2)) > 0.001
        assert not np.any(wav[start + n + 1 : start + n + sr // 20])  # silence after it
    assert not np.any(wav[round(3.2 * sr) : round(5.9 * sr)])  # the skipped [laughs] cue is silent


def test_adjusted_srt_round_trips_and_matches_the_report(dubbed):
    subs = list(srtlib.parse((dubbed["tmp"] / "subs.adjusted.srt").read_text()))
    spoken = [c for c in dubbed["report"]["cues"] if c["skipped"] is None]
    assert [s.index for s in subs] == [1, 2, 3]
    assert [s.content for s in subs] == [TEXTS[0], f"<i>{TEXTS[1]}</i>", f"- MAN: {TEXTS[2]}"]
    for s, c in zip(subs, spoken):
        assert s.start.total_seconds() == pytest.approx(c["speech_start"], abs=0.0005)
        assert s.end.total_seconds() == pytest.approx(c["speech_end"], abs=0.0005)


def test_another_format_of_the_same_subtitles_takes_the_chunks_already_rendered(dubbed, tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    shutil.copy(dubbed["subs"], tmp_path / "subs.srt")
    shutil.copytree(dubbed["work"], tmp_path / ".subs.wav.ttsbatch")
    monkeypatch.setenv("TTSBATCH_CACHE_DIR", str(dubbed["tmp"] / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run(tmp_path / "subs.srt", "-o", tmp_path / "subs.flac", "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 0, "reused": 3}
    wav, flac = sf.read(dubbed["out"])[0], sf.read(tmp_path / "subs.flac")[0]
    assert len(wav) == len(flac) and np.abs(wav - flac).max() < 1e-4


def test_output_carries_the_watermark(dubbed):
    v = runner.invoke(app, ["verify", str(dubbed["out"])])
    assert v.exit_code == 0, v.output
    assert "watermarked" in v.stdout and "NOT" not in v.stdout
    assert dubbed["report"]["totals"]["watermark_score"] >= 0.5


def test_tight_vtt_cues_are_sped_up_then_delayed_from_the_store(dubbed, tiny_checkpoint, tmp_path):
    """Same lines as a .vtt with less room: nothing is synthesized, only the fit changes."""
    natural = [c["natural_length"] for c in dubbed["report"]["cues"] if c["skipped"] is None]
    a = 0.5
    b = a + round(natural[0] / 1.2, 3)  # cue 1 needs a 1.2x speed-up
    c = b + round(natural[1] / 2.0, 3)  # cue 2 would need 2x: gets 1.3x and runs over
    stamp = lambda s: f"00:00:{s:06.3f}"  # noqa: E731
    vtt = tmp_path / "tight.vtt"
    vtt.write_text(
        f"WEBVTT\n\n{stamp(a)} --> {stamp(b)}\n{TEXTS[0]}\n\n{stamp(b)} --> {stamp(c)}\n{TEXTS[1]}\n\n"
        f"{stamp(c)} --> {stamp(c + 0.5)}\n{TEXTS[2]}\n"
    )
    out = tmp_path / "tight.wav"
    r = run(vtt, "-o", out, "--work-dir", dubbed["work"], "--duration", "5", "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 0, "reused": 3}
    report = json.loads((tmp_path / "tight.timing.json").read_text())
    one, two, three = report["cues"]
    assert one["stretch"] == pytest.approx(1.2, abs=0.03) and one["overrun"] == 0.0
    assert two["stretch"] == 1.3 and two["overrun"] > 0  # never above --max-stretch
    assert three["delay"] == pytest.approx(two["speech_end"] - c, abs=0.002)
    assert three["speech_start"] >= two["speech_end"] >= two["speech_start"] >= one["speech_end"]
    assert report["totals"]["stretched"] == 2 and report["totals"]["overrun_cues"] == 1
    assert report["totals"]["delayed_cues"] == 1
    wav, sr = sf.read(out, dtype="float32")
    assert len(wav) == 5 * sr
    assert not np.any(wav[: round(a * sr)])
    for cue in report["cues"]:  # each cue's voice starts where the report says
        start = round(cue["speech_start"] * sr)
        assert np.any(wav[start : start + round(0.005 * sr)])
    assert not np.any(wav[round(three["speech_end"] * sr) + 1 :])
    # A .vtt input: the adjusted SRT takes the plain name.
    assert len(list(srtlib.parse((tmp_path / "tight.srt").read_text()))) == 3

    # --shift reaches the fitter (its rules are unit-tested in test_timing.py).
    r = run(vtt, "-o", tmp_path / "shifted.wav", "--work-dir", dubbed["work"], "--shift", "--max-stretch", "1.0",
            "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    shifted = json.loads((tmp_path / "shifted.timing.json").read_text())
    assert shifted["shift"] is True and shifted["totals"]["stretched"] == 0
    assert shifted["cues"][2]["delay"] == pytest.approx(shifted["cues"][0]["overrun"] + shifted["cues"][1]["overrun"], abs=0.002)


def test_mp3_at_another_rate_from_the_store(dubbed, tiny_checkpoint, tmp_path):
    out = tmp_path / "dub.mp3"
    r = run(dubbed["subs"], "-o", out, "--work-dir", dubbed["work"], "--sample-rate", "16000", "--duration", "9",
            "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 0, "reused": 3}
    info = sf.info(str(out))
    assert info.samplerate == 16000 and abs(info.duration - 9.0) < 0.1
    assert (tmp_path / "dub.srt").is_file() and (tmp_path / "dub.timing.json").is_file()


def test_help_and_dry_run(tmp_path):
    r = run("--help")
    assert r.exit_code == 0 and "--max-stretch" in r.output and "--keep-sounds" in r.output
    subs = tmp_path / "s.srt"
    subs.write_text(SUBS)
    r = run(subs, "--dry-run")  # no model anywhere: success proves none was loaded
    assert r.exit_code == 0, r.output
    assert "4 cue(s): 3 spoken, 1 skipped" in r.stdout
    assert "[skipped: sound] [laughs]" in r.stdout and TEXTS[2] in r.stdout
    r = run(subs, "--dry-run", "--keep-sounds")
    assert "4 cue(s): 4 spoken" in r.stdout


BAD = {
    "broken timing": ("b.srt", SUBS.replace("00:00:03,000 -->", "00:00:0x,000 -->"), [], "line 6:"),
    "stray text": ("b.srt", "Hello.\n\n" + SUBS, [], "line 1:"),
    "not webvtt": ("b.vtt", SUBS, [], "not a webvtt file"),
    "nothing speakable": ("b.srt", "1\n00:00:01,000 --> 00:00:02,000\n[music]\n\n2\n00:00:03,000 --> 00:00:04,000\n♪ la ♪\n", [], "no cue has anything speakable"),
    "only other scripts": ("b.srt", "1\n00:00:01,000 --> 00:00:02,000\nПривет\n", [], "6 letters in other scripts (cyrillic 6)"),
    "output is the voice": ("b.srt", SUBS, ["--voice", "v.wav", "-o", "v.wav"], "would overwrite the voice file"),
    "empty": ("b.srt", "", [], "empty"),
    "unsupported type": ("b.txt", SUBS, [], "unsupported subtitle type"),
    "missing": ("b.srt", None, [], "no such file"),
    "max stretch": ("b.srt", SUBS, ["--max-stretch", "3"], "--max-stretch"),
    "duration": ("b.srt", SUBS, ["--duration", "0"], "--duration"),
    "output format": ("b.srt", SUBS, ["-o", "x.xyz"], "unsupported"),
    "output dir missing": ("b.srt", SUBS, ["-o", "no/dir/x.wav"], "does not exist"),
    "missing voice": ("b.srt", SUBS, ["--voice", "none.wav"], "not found"),
    "work dir is a file": ("b.srt", SUBS, ["--work-dir", "b.srt"], "is a file, not a directory"),
    "sample rate": ("b.srt", SUBS, ["--sample-rate", "100"], "--sample-rate"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, case, dry_run, monkeypatch):
    # --dry-run fails on the same input (but lists a file whose cues are all skipped: it says why)
    name, text, extra, expect = BAD[case]
    if dry_run:
        extra = [*extra, "--dry-run"]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    before = set(tmp_path.rglob("*"))
    r = run(path, *extra, "--device", "cpu")
    if dry_run and case == "nothing speakable":
        assert r.exit_code == 0 and "2 cue(s): 0 spoken, 2 skipped" in r.stdout, r.output
        return
    if dry_run and case == "only other scripts":
        assert r.exit_code == 0 and "1 cue(s): 0 spoken, 1 skipped" in r.stdout, r.output
        assert "not spoken: 6 letters in other scripts (Cyrillic 6)" in r.stdout
        return
    assert r.exit_code == 2, (case, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ttsbatch: error:") and expect in lines[0].lower(), lines[0]
    assert "Traceback" not in r.output
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even a work dir


def test_the_overrun_line_names_the_delayed_cues_or_the_longer_track():
    from ttsbatch.cli_srt import overrun_line

    delayed = {"overrun_cues": 2, "overrun_seconds": 1.5, "delayed_cues": 3, "max_delay": 0.75}
    assert overrun_line(delayed, "t.json") == "2 cue(s) ran over their window by 1.50 s in all; 3 cue(s) start late, by up to 0.75 s; see t.json"
    last_only = {"overrun_cues": 1, "overrun_seconds": 23.25, "delayed_cues": 0, "max_delay": 0.0}
    line = overrun_line(last_only, "t.json")
    assert "no cue starts late: the track runs past its planned end" in line and "0.00" not in line


def test_a_duration_that_ends_before_cues_start_is_said(tmp_path):
    # the track ran on past --duration to hold them, without a word
    subs = tmp_path / "s.srt"
    subs.write_text(SUBS)
    want = "--duration 4 s ends before 1 cue(s) start (the last at 6.000 s); the track runs on to hold them"
    r = run(subs, "--dry-run", "--duration", "4")
    assert r.exit_code == 0 and want in r.stdout.splitlines(), r.output
    assert "--duration" not in run(subs, "--dry-run", "--duration", "6.5").stdout  # every cue starts inside it
    r = run(subs, "-o", tmp_path / "s.wav", "--duration", "4", "--device", "cpu")  # no weights: after the warning
    assert r.exit_code == 3 and want in r.stderr

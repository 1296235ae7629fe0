"""`ttsbatch BOOK`: end to end on the CPU with the tiny random checkpoint, resume, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ttsbatch.cli import app

from .conftest import SAMPLES

runner = CliRunner()

# Random weights never say "stop": a budget of speech tokens per character keeps runs short.
FAST = ["--device", "cpu", "--tokens-per-char", "0.2", "--ignore-eos", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def summary(result) -> dict:
    m = re.search(r"(\d+) chunks rendered, (\d+) reused", result.stderr)
    assert m, result.stderr
    return {"rendered": int(m.group(1)), "reused": int(m.group(2))}


def stored_ids(work_dir) -> list[str]:
    lines = (work_dir / "index.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.strip()]


def test_help_on_every_command():
    for args in ([], ["book"], ["verify"], ["checkpoint"], ["checkpoint", "random"]):
        r = run(*args, "--help")
        assert r.exit_code == 0, r.output
        assert "Usage" in r.output


def test_dry_run_prints_the_plan_without_loading_a_model(tmp_path):
    # No --model-dir and no hub: a model load would fail, so success proves none happened.
    r = run(SAMPLES / "story.txt", "--dry-run")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "chapter 2: CHAPTER I." in out and "chapter 3: CHAPTER II." in out
    assert "Mr. James Dillingham Young" in out
    assert re.search(r"estimated audio: \d+:\d\d:\d\d", out)
    listed = [line for line in out.splitlines() if re.match(r"\s+\d+ ", line)]
    assert len(listed) >= 8


def test_story_to_mp3_end_to_end(tiny_checkpoint, tmp_path):
    from ttsbatch.audio.stitch import trim_silence
    from ttsbatch.config import StitchOptions
    from ttsbatch.store import ChunkStore, read_manifest

    out = tmp_path / "story.mp3"
    r = run(SAMPLES / "story.txt", "--voice", SAMPLES / "voice.wav", "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert not list(tmp_path.glob(".story.partial*"))

    # Duration: every stored chunk (trimmed) plus the pauses its boundary asks for.
    work = tmp_path / ".story.mp3.ttsbatch"
    manifest = read_manifest(work)
    store = ChunkStore(work)
    opts = StitchOptions()
    pause = {"sentence": opts.sentence_pause_ms, "paragraph": opts.paragraph_pause_ms, "chapter": opts.chapter_pause_ms, "end": 0}
    expected = 0.0
    for c in manifest["chunks"]:
        wav, sr = store.get(c["id"])
        expected += len(trim_silence(wav, sr, opts)) / sr + pause[c["boundary"]] / 1000
    info = sf.info(str(out))
    assert info.samplerate == 24000
    assert abs(info.duration - expected) < 0.1, (info.duration, expected)

    # Perth finds the mark in the encoded file.
    v = run("verify", out)
    assert v.exit_code == 0, v.output
    assert "watermarked" in v.stdout and "NOT" not in v.stdout


def test_verify_checks_every_file_named_before_reporting_any(tmp_path):
    r = run("verify", tmp_path)
    assert r.exit_code == 2 and r.stderr.strip() == f"ttsbatch: error: {tmp_path} is a directory, not an audio file"
    # a missing last file stops the command before the first is reported (it was found last)
    r = run("verify", _tone(tmp_path / "a.wav", 1.0), tmp_path / "nope.wav")
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.strip() == f"ttsbatch: error: no such file: {tmp_path / 'nope.wav'}"


def test_segmented_mp3_book_is_checked_in_its_frames_beside_the_remux(tiny_checkpoint, tmp_path, monkeypatch):
    """A book in several MP3 segments: copied under its header while it is joined (no
    remux at the end), its mark read from the joined frames (while the chapters are added)
    and not again from the output, which ends with those very frames and is watermarked."""
    import subprocess

    from ttsbatch.audio import export, segments, watermark
    from ttsbatch.audio.ffmpeg import ffmpeg_exe

    monkeypatch.setattr(export, "finish_stream", lambda *a, **k: pytest.fail("remuxed at the end"))

    monkeypatch.setattr(segments, "default_workers", lambda: 2)  # segment encoders, as on a GPU host
    monkeypatch.setattr(segments, "SEGMENT_S", 0.2)  # a cut at every paragraph end
    read = []
    real = watermark.verify_file
    monkeypatch.setattr(watermark, "verify_file", lambda path, wm, *a, **kw: read.append(path.name) or real(path, wm, *a, **kw))
    out = tmp_path / "story.mp3"
    r = run(SAMPLES / "story.txt", "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert len(read) == 1 and read[0].startswith(".track-")  # the frames, not the staged output
    banner = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "Chapter #0:1" in banner and "CHAPTER II." in banner  # written into the live remux's tag
    assert [p.name for p in tmp_path.iterdir() if p.is_file() and p.name.startswith(".")] == []  # nothing staged left
    v = run("verify", out)
    assert v.exit_code == 0 and "NOT" not in v.stdout, v.output


SHORT = "First paragraph is here.\n\nSecond paragraph, a little longer than the first.\n\nThird one.\n\nThe fourth and last paragraph.\n"


def test_interrupted_run_resumes_with_only_the_rest(tiny_checkpoint, tmp_path, monkeypatch):
    from ttsbatch.engine.stock import StockEngine

    book = tmp_path / "short.txt"
    book.write_text(SHORT)
    out = tmp_path / "short.wav"
    real = StockEngine.synthesize
    calls = {"n": 0}

    def dies_after_two(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the third chunk
        return real(self, *a, **k)

    monkeypatch.setattr(StockEngine, "synthesize", dies_after_two)
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 130
    assert "resume" in r.stderr
    assert not out.exists()
    work = tmp_path / ".short.wav.ttsbatch"
    first = stored_ids(work)
    assert len(first) == 2

    monkeypatch.setattr(StockEngine, "synthesize", real)
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    s = summary(r)
    assert s == {"rendered": 2, "reused": 2}
    second = stored_ids(work)[2:]
    assert not set(first) & set(second) and len(second) == 2
    assert out.is_file()

    # Same command again: nothing to render, same audio.
    before = sf.read(out)[0]
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert summary(r) == {"rendered": 0, "reused": 4}
    assert np.array_equal(sf.read(out)[0], before)

    # A stored chunk damaged behind our back: that run stops with one line and removes it;
    # the next renders it again, to the same audio (its seed comes from its id).
    damaged = next((work / "chunks").rglob(f"{second[0]}.flac"))
    damaged.write_bytes(damaged.read_bytes()[:200])
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "is removed; run again" in lines[0], r.stderr
    assert not damaged.exists()
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 1, "reused": 3}
    assert np.array_equal(sf.read(out)[0], before)


def test_editing_one_paragraph_rerenders_only_its_chunks(tiny_checkpoint, tmp_path):
    book = tmp_path / "short.txt"
    book.write_text(SHORT)
    out = tmp_path / "short.flac"
    assert run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST).exit_code == 0
    book.write_text(SHORT.replace("Third one.", "Third one, now edited."))
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 1, "reused": 3}


def test_another_format_of_the_same_book_takes_the_chunks_already_rendered(tiny_checkpoint, tmp_path):
    # book.flac, then book.wav: the chunks do not depend on the format, and a 10-hour book
    # is not synthesized again for it
    book = tmp_path / "short.txt"
    book.write_text(SHORT)
    assert run(book, "-o", tmp_path / "short.flac", "--model-dir", tiny_checkpoint, *FAST).exit_code == 0
    donor = tmp_path / ".short.flac.ttsbatch"
    before = {p: p.read_bytes() for p in (donor / "chunks").rglob("*.flac")}
    r = run(book, "-o", tmp_path / "short.wav", "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 0, "reused": 4}
    flac, wav = sf.read(tmp_path / "short.flac")[0], sf.read(tmp_path / "short.wav")[0]
    assert len(flac) == len(wav) and np.abs(flac - wav).max() < 1e-4  # the same audio (wav at 16 bits)
    assert {p: p.read_bytes() for p in (donor / "chunks").rglob("*.flac")} == before  # only read
    # an edited paragraph renders only its chunk, in a third format, taking the rest
    book.write_text(SHORT.replace("Third one.", "Third one, now edited."))
    r = run(book, "-o", tmp_path / "short.ogg", "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert summary(r) == {"rendered": 1, "reused": 3}


def test_a_gpu_runs_track_process_stitches_what_the_inline_track_did(tiny_checkpoint, tmp_path, monkeypatch):
    """A GPU run's track in a process of its own (``TRACK_PROCESS``), here from a finished
    run's store: the same output, byte for byte, and nothing of the process left behind."""
    from ttsbatch import pipeline, track_process

    book = tmp_path / "short.txt"
    book.write_text(SHORT)
    out = tmp_path / "short.flac"
    assert run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST).exit_code == 0
    before = out.read_bytes()
    out.unlink()
    made = []
    monkeypatch.setattr(pipeline, "_on_gpu", lambda engine: True)
    monkeypatch.setattr(pipeline, "TRACK_PROCESS", True)
    monkeypatch.setattr(pipeline, "TrackProcess", lambda *a, **k: made.append(1) or track_process.TrackProcess(*a, **k))
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    assert made and summary(r) == {"rendered": 0, "reused": 4}
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".short.flac.ttsbatch", "short.flac", "short.txt"]


def test_output_is_not_written_when_perth_cannot_load(tiny_checkpoint, tmp_path, monkeypatch):
    import sys

    from ttsbatch.engine.stock import StockEngine

    # As on an install whose setuptools lost pkg_resources: importing Perth fails.
    for name in [m for m in sys.modules if m == "perth" or m.startswith("perth.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    monkeypatch.setattr(StockEngine, "synthesize", lambda *a, **k: pytest.fail("generated without a watermarker"))
    out = tmp_path / "x.wav"
    r = run(SAMPLES / "story.txt", "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 3
    assert "watermark" in r.stderr.lower() and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("broken", ["missing", "not executable", "cannot run"])
def test_no_ffmpeg_is_one_line_and_exit_3_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch, broken):
    from ttsbatch.audio import ffmpeg
    from ttsbatch.engine import model

    exe = tmp_path / "ffmpeg"
    if broken != "missing":
        exe.write_bytes(b"\x7fELF")  # a file, but not a program this machine runs
    if broken == "cannot run":
        exe.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))  # imageio-ffmpeg hands this path back unchecked
    ffmpeg.ffmpeg_exe.cache_clear()
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("loaded the model without ffmpeg"))
    try:
        for out in ("x.mp3", "x.wav"):
            r = run(SAMPLES / "story.txt", "-o", tmp_path / out, "--model-dir", tiny_checkpoint, *FAST)
            assert r.exit_code == 3, r.output
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ttsbatch: error: cannot run ffmpeg"), lines
            assert str(exe) in lines[0] and "$IMAGEIO_FFMPEG_EXE" in lines[0], lines
            assert not (tmp_path / out).exists()
    finally:
        ffmpeg.ffmpeg_exe.cache_clear()  # the next test finds the real binary again


@pytest.mark.parametrize("broken", ["s3gen.safetensors", "t3_cfg.safetensors", "conds.pt"])
def test_a_corrupt_checkpoint_file_is_one_line_and_exit_3(tiny_checkpoint, tmp_path, broken):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    with open(ck / broken, "r+b") as f:  # cut short, as by an interrupted download or copy
        f.truncate(1000)
    r = run(SAMPLES / "story.txt", "-o", tmp_path / "x.wav", "--model-dir", ck, *FAST)
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ttsbatch: error: cannot load the checkpoint in {ck}"), lines


def test_an_unusable_cache_dir_is_one_line_and_exit_3(tiny_checkpoint, tmp_path, monkeypatch):
    from ttsbatch.engine import model

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TTSBATCH_CACHE_DIR", str(blocker / "cache"))  # below a file: cannot be made
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("loaded the model without a cache dir"))
    r = run(SAMPLES / "story.txt", "-o", tmp_path / "x.wav", "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ttsbatch: error: the cache dir {blocker / 'cache'} cannot be used"), lines


def test_a_random_checkpoint_never_overwrites_real_weights(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    real = tmp_path / "real"
    shutil.copytree(tiny_checkpoint, real)
    state = load_file(real / "t3_cfg.safetensors")
    save_file(state, str(real / "t3_cfg.safetensors"))  # the same tensors without our random mark: "real" weights
    before = {f.name: f.read_bytes() for f in real.iterdir()}
    r = run("checkpoint", "random", real)
    assert r.exit_code == 2, r.output
    assert "not overwriting it" in r.stderr and "Traceback" not in r.output
    assert {f.name: f.read_bytes() for f in real.iterdir()} == before
    # a random checkpoint of ours is rewritten without a question (tests and benchmarks remake them)
    again = tmp_path / "again"
    shutil.copytree(tiny_checkpoint, again)
    assert run("checkpoint", "random", again, "--seed", "1").exit_code == 0
    assert (again / "t3_cfg.safetensors").read_bytes() != (tiny_checkpoint / "t3_cfg.safetensors").read_bytes()


def test_an_epub_book_is_planned_by_its_chapters(tmp_path):
    from .test_text_epub import make_epub

    book = make_epub(tmp_path / "b.epub", [("a.xhtml", "<h1>Chapter One</h1><p>It was night.</p>"),
                                           ("b.xhtml", "<h1>Chapter Two</h1><p>It was day.</p>")])
    r = run(book, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "# b.epub (Test Book): 2 chapter(s), 4 chunk(s)" in r.stdout
    assert "chapter 2: Chapter Two [2 chunks]" in r.stdout and "    2 It was night." in r.stdout


def test_an_epub_to_m4b_end_to_end_carries_its_title_and_chapters(tiny_checkpoint, tmp_path):
    import subprocess

    from ttsbatch.audio.export import ffmpeg_exe

    from .test_text_epub import make_epub

    book = make_epub(tmp_path / "b.epub", [("a.xhtml", "<h1>Chapter One</h1><p>It was night.</p>"),
                                           ("b.xhtml", "<p>No heading.</p>")], toc=[("b.xhtml", "Second Part")],
                     authors=["L. Frank Baum"])
    out = tmp_path / "b.m4b"
    r = run(book, "-o", out, "--model-dir", tiny_checkpoint, *FAST)
    assert r.exit_code == 0, r.output
    meta = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(out), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^title=(.*)$", meta, re.M) == ["Test Book", "Chapter One", "Second Part"]  # was "b.epub"
    assert re.findall(r"^artist=(.*)$", meta, re.M) == ["L. Frank Baum"]
    v = run("verify", out)
    assert v.exit_code == 0 and "NOT" not in v.stdout, v.output


def test_letters_of_other_scripts_are_reported_not_lost_silently(tmp_path):
    # an English book with a Greek word: the word goes unsaid (folded away), and the plan and
    # the run say so before any work
    book = tmp_path / "b.txt"
    book.write_text("He said γεια to me. And été is fine.\n")
    want = "not spoken: 4 letters in other scripts (Greek 4), as Chatterbox's English model says only Latin letters and digits"
    r = run(book, "--dry-run")
    assert r.exit_code == 0, r.output
    assert want in r.stdout.splitlines()
    assert "He said to me. And ete is fine." in r.stdout
    r = run(book, "-o", tmp_path / "x.mp3", "--device", "cpu")  # no weights: fails at the load, after the warning
    assert r.exit_code == 3
    assert want in r.stderr and r.stderr.index(want) < r.stderr.index("--model-dir")
    # accented Latin letters fold and are spoken: nothing to report
    book.write_text("Café crème, naïve über. © 😀\n")
    r = run(book, "--dry-run")
    assert r.exit_code == 0 and "not spoken" not in r.output, r.output


def test_the_plan_and_the_run_say_what_of_a_gutenberg_book_is_left_out(tmp_path):
    book = tmp_path / "pg.txt"
    book.write_text("The Project Gutenberg eBook of X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
                    "The story.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nThe license.\n")
    r = run(book, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "left out: Project Gutenberg's header (3 lines)" in r.stdout.splitlines()
    assert "left out: Project Gutenberg's end notes and license (3 lines)" in r.stdout.splitlines()
    assert "license" not in r.stdout.replace("and license (", "")
    r = run(book, "-o", tmp_path / "x.mp3", "--device", "cpu")  # no weights: fails at the load, after the log
    assert r.exit_code == 3 and "left out: Project Gutenberg's header (3 lines)" in r.stderr


def test_no_weights_is_one_line_and_exit_3(tmp_path):
    r = run(SAMPLES / "story.txt", "-o", tmp_path / "x.mp3", "--device", "cpu")
    assert r.exit_code == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model-dir" in lines[0]


def _binary(p):
    p.write_bytes(bytes(range(256)) * 40)


BAD_INPUTS = {
    "missing file": (lambda t: [t / "nope.txt"], "no such file"),
    "empty file": (lambda t: [_w(t / "e.txt", "")], "empty"),
    "whitespace only": (lambda t: [_w(t / "e.txt", " \n\t\n ")], "only whitespace"),
    "binary": (lambda t: [_wb(t / "b.txt")], "binary"),
    "unsupported extension": (lambda t: [_w(t / "b.docx", "hello")], "unsupported"),
    "not an epub": (lambda t: [_w(t / "b.epub", "hello")], "b.epub: not a readable epub"),
    "corrupt voice": (lambda t: [SAMPLES / "story.txt", "--voice", _w(t / "v.wav", "RIFF nonsense")], "not readable audio"),
    "silent voice": (lambda t: [SAMPLES / "story.txt", "--voice", _sil(t / "v.wav", 3.0)], "silent"),
    "short voice": (lambda t: [SAMPLES / "story.txt", "--voice", _tone(t / "v.wav", 1.0)], "at least 2 s"),
    "missing voice": (lambda t: [SAMPLES / "story.txt", "--voice", t / "none.wav"], "not found"),
    "output dir missing": (lambda t: [SAMPLES / "story.txt", "-o", t / "no" / "dir" / "x.mp3"], "does not exist"),
    "output parent is a file": (lambda t: [SAMPLES / "story.txt", "-o", _w(t / "f", "x") / "x.mp3"], "not a directory"),
    "output format": (lambda t: [SAMPLES / "story.txt", "-o", t / "x.xyz"], "unsupported"),
    "output is input": (lambda t: [_w(t / "a.txt", "Hi there."), "-o", t / "a.txt"], "overwrite the input"),
    "ignore eos without budget": (lambda t: [SAMPLES / "story.txt", "--ignore-eos"], "conflicting options"),
    "unknown preset": (lambda t: [SAMPLES / "story.txt", "--preset", "nope"], "unknown preset"),
    # past T3's position tables a chunk failed mid-book with "IndexError: index out of range"
    "chunks over T3's text context": (lambda t: [SAMPLES / "story.txt", "--max-chars", "5000"], "--max-chars must be between 20 and 2000"),
    "work dir is a file": (lambda t: [SAMPLES / "story.txt", "--work-dir", _w(t / "w", "x")], "is a file, not a directory"),
    "budget over T3's speech context": (lambda t: [SAMPLES / "story.txt", "--max-new-tokens", "5000"], "--max-new-tokens must be between 1 and 4096, got 5000"),
    # each range names the flag and the value given (it was one list of every sampling range)
    "exaggeration past its range": (lambda t: [SAMPLES / "story.txt", "--exaggeration", "5"], "--exaggeration must be between 0 and 2, got 5"),
    "negative cfg weight": (lambda t: [SAMPLES / "story.txt", "--cfg-weight", "-1"], "--cfg-weight must be at least 0, got -1"),
    "zero temperature": (lambda t: [SAMPLES / "story.txt", "--temperature", "0"], "--temperature must be more than 0, got 0"),
    "top-p over 1": (lambda t: [SAMPLES / "story.txt", "--top-p", "1.5"], "--top-p must be more than 0 and at most 1, got 1.5"),
    "nan": (lambda t: [SAMPLES / "story.txt", "--min-p", "nan"], "--min-p must be a number"),
    "negative vram cap": (lambda t: [SAMPLES / "story.txt", "--max-vram", "-3"], "--max-vram must be more than 0 gb, got -3"),
    "voice is a directory": (lambda t: [SAMPLES / "story.txt", "--voice", t], "is a directory"),
    "voice is a device": (lambda t: [SAMPLES / "story.txt", "--voice", "/dev/null"], "is not a regular file"),
    # folding to ASCII drops other scripts: the line says which, not just "nothing speakable"
    "only other scripts": (lambda t: [_w(t / "ru.txt", "Привет, как дела? 你好。")], "nothing speakable in it: 15 letters in other scripts (cyrillic 13, cjk 2)"),
    # the run would have replaced the user's recording with the book
    "output is the voice": (lambda t: [SAMPLES / "story.txt", "--voice", _tone(t / "v.wav", 3.0), "-o", t / "v.wav"], "would overwrite the voice file"),
    "preset export out of range": (lambda t: [SAMPLES / "story.txt", "--preset", _w(t / "p.toml", '[export]\nmp3_bitrate = "lots"\n')],
                                   "mp3_bitrate must be a bitrate"),
}


def _w(p, text):
    p.write_text(text)
    return p


def _wb(p):
    _binary(p)
    return p


def _sil(p, s):
    sf.write(p, np.zeros(int(24000 * s), dtype=np.float32), 24000)
    return p


def _tone(p, s):
    t = np.arange(int(24000 * s)) / 24000
    sf.write(p, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    return p


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, case, dry_run):
    # --dry-run fails on the same input: a plan printed for a command that cannot run misleads
    make, expect = BAD_INPUTS[case]
    args = make(tmp_path)
    before = set(tmp_path.rglob("*"))
    r = run(*args, "--device", "cpu", *(["--dry-run"] if dry_run else []))
    assert r.exit_code == 2, (case, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ttsbatch: error:") and expect in lines[0].lower(), lines[0]
    assert "Traceback" not in r.output
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even a work dir

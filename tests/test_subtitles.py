"""Subtitle parsing and cleaning: every quirk of real .srt/.vtt files, read from files (no model)."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
import srt

from ttsbatch.config import TextOptions
from ttsbatch.errors import InputError
from ttsbatch.text.subtitles import clean_cue_text, cue_chunks, read_subtitles

CLEAN = """1
00:00:01,000 --> 00:00:02,500
Hello there.

2
00:00:03,000 --> 00:00:04,000
How are you?
"""


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def spoken(cues):
    return [(c.start, c.end, c.text) for c in cues if not c.skipped]


EXPECTED = [(1.0, 2.5, "Hello there."), (3.0, 4.0, "How are you?")]


# ---------------------------------------------------------------------------- file-level quirks


@pytest.mark.parametrize(
    "data",
    [
        CLEAN.encode(),
        codecs.BOM_UTF8 + CLEAN.encode(),
        codecs.BOM_UTF16_LE + CLEAN.encode("utf-16-le"),
        CLEAN.replace("\n", "\r\n").encode(),
        CLEAN.replace("\n", "\r").encode(),
        CLEAN.rstrip("\n").encode(),  # no final blank line, not even a final newline
        CLEAN.replace(",", ".").encode(),  # dot before the milliseconds
        CLEAN.replace("1\n00", "\n00").replace("2\n00", "\n00").encode(),  # no cue numbers
        CLEAN.replace("\n", "  \n").encode(),  # trailing spaces, blank lines with spaces
        ("\n\n" + CLEAN.replace("00:00:01,000", "00:01,0").replace("00:00:02,500", "00:00:02.5")).encode(),
    ],
    ids=["plain", "bom", "utf16", "crlf", "cr", "no-final-blank", "dot-times", "no-numbers", "spaces", "short-times"],
)
def test_tolerated_file_quirks(tmp_path, data):
    cues = read_subtitles(write(tmp_path, "s.srt", data))
    assert spoken(cues) == EXPECTED


def test_fraction_of_one_or_two_digits_is_tenths_and_hundredths(tmp_path):
    # The srt library alone would read ",5" as 5 ms.
    text = "1\n00:00:01,5 --> 00:00:02,25\nHi.\n"
    (cue,) = read_subtitles(write(tmp_path, "s.srt", text))
    assert (cue.start, cue.end) == (1.5, 2.25)


def test_cp1252_file(tmp_path):
    cues = read_subtitles(write(tmp_path, "s.srt", "1\n00:00:01,000 --> 00:00:02,000\nCafé, naïve.\n".encode("cp1252")))
    assert cues[0].text == "Café, naïve."


def test_numbers_out_of_order_and_overlaps_are_sorted_by_time(tmp_path):
    text = (
        "7\n00:00:05,000 --> 00:00:06,000\nThird.\n\n"
        "2\n00:00:01,000 --> 00:00:03,000\nFirst.\n\n"
        "2\n00:00:02,000 --> 00:00:04,000\nSecond, overlapping.\n"
    )
    cues = read_subtitles(write(tmp_path, "s.srt", text))
    assert [c.text for c in cues] == ["First.", "Second, overlapping.", "Third."]
    assert [c.number for c in cues] == ["2", "2", "7"]
    assert [c.index for c in cues] == [0, 1, 2]
    assert [c.line for c in cues] == [6, 10, 2]  # where each timing line is in the file


def test_multi_line_cue_is_one_text(tmp_path):
    text = "1\n00:00:01,000 --> 00:00:04,000\nThis line goes on\nacross two lines.\n\n2\n00:00:05,000 --> 00:00:06,000\nNext.\n"
    cues = read_subtitles(write(tmp_path, "s.srt", text))
    assert cues[0].text == "This line goes on across two lines."
    assert cues[0].raw == "This line goes on\nacross two lines."


def test_end_before_start_reads_as_zero_length(tmp_path):
    (cue,) = read_subtitles(write(tmp_path, "s.srt", "1\n00:00:05,000 --> 00:00:04,000\nOops.\n"))
    assert cue.start == cue.end == 5.0


def test_duplicate_cue_is_skipped(tmp_path):
    text = CLEAN + "\n3\n00:00:03,000 --> 00:00:04,000\nHow are you?\n"
    cues = read_subtitles(write(tmp_path, "s.srt", text))
    assert [c.skipped for c in cues] == [None, None, "duplicate"]


# ---------------------------------------------------------------------------- cue text


def srt_with(*contents: str) -> str:
    return "\n".join(f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i:02d},900\n{c}\n" for i, c in enumerate(contents))


def test_tags_labels_music_and_sounds(tmp_path):
    path = write(tmp_path, "s.srt", srt_with(
        "<i>In italics,</i> <b>bold</b> and <font color=\"#ffff00\">yellow</font>.",
        "{\\an8}On top of the screen.",
        "MAN: Who is it?",
        "- JOHN: Me.\n- MARY: And me.",
        "DR. SMITH: Sit down.",
        "♪ Jingle bells, jingle bells ♪",
        "[laughs]",
        "(door creaks)",
        "[laughs] Very funny.\n(door creaks)",
        "<i>[sighs]</i>",
        "♪ La la ♪\nShe sings.",
        "Note: this stays; so do 10:30 and Mr. Smith: fine.",
        "Tom &amp; Jerry",
        "...",
        "<i></i>",
    ))
    cues = read_subtitles(path)
    got = [(c.text, c.skipped) for c in cues]
    assert got == [
        ("In italics, bold and yellow.", None),
        ("On top of the screen.", None),
        ("Who is it?", None),
        ("Me. And me.", None),
        ("Sit down.", None),
        ("", "music"),
        ("", "sound"),
        ("", "sound"),
        ("Very funny.", None),
        ("", "sound"),
        ("She sings.", None),
        ("Note: this stays; so do 10:30 and Mr. Smith: fine.", None),
        ("Tom & Jerry", None),
        ("", "unspeakable"),
        ("", "empty"),
    ]
    # The display text keeps its formatting (it goes into the adjusted SRT).
    assert cues[0].raw.startswith("<i>In italics,</i>")


def test_keep_sounds_speaks_music_and_descriptions(tmp_path):
    path = write(tmp_path, "s.srt", srt_with("♪ Jingle bells ♪", "[laughs]", "(door creaks)\nWho's there?", "MAN: Hi."))
    got = [(c.text, c.skipped) for c in read_subtitles(path, keep_sounds=True)]
    assert got == [("Jingle bells", None), ("laughs", None), ("door creaks Who's there?", None), ("Hi.", None)]


def test_sound_description_over_two_lines():
    assert clean_cue_text("[door creaks\nopen] Hello.") == ("Hello.", None)


@pytest.mark.parametrize("line", ["Warning: hot", "I: me", "10:30: late", "Note that: x"])
def test_not_a_speaker_label(line):
    assert clean_cue_text(line)[0] == line


# ---------------------------------------------------------------------------- WebVTT


VTT = """WEBVTT - a title
Kind: captions

NOTE a comment
with --- dashes

STYLE
::cue { color: yellow }

intro
00:01.000 --> 00:02.500 align:start position:10%
<v Roger>Hello <c.yellow>there</c>.</v>

00:00:03,000 --> 00:00:04,000
- JOHN: How are you?
[laughs]

3
00:00:05.000 --> 00:00:06.000
<00:00:05.500>Fine ♪ la ♪
"""


def test_vtt(tmp_path):
    cues = read_subtitles(write(tmp_path, "s.vtt", codecs.BOM_UTF8 + VTT.replace("\n", "\r\n").encode()))
    assert [(c.start, c.end, c.text, c.number) for c in cues] == [
        (1.0, 2.5, "Hello there.", "intro"),
        (3.0, 4.0, "How are you?", ""),
        (5.0, 6.0, "", "3"),
    ]
    assert cues[2].skipped == "music"
    assert cues[0].raw == "Hello there."  # cue tags removed for display


# ---------------------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    "name,data,expect",
    [
        ("s.srt", CLEAN.replace("00:00:03,000 --> 00:00:04,000", "00:00:0x,000 --> 00:00:04,000"), "line 6: cannot read this srt timing line"),
        ("s.srt", CLEAN.replace("00:00:03,000 --> 00:00:04,000", "00:00:03,000 00:00:04,000"), "line 6: cannot read this srt timing line"),
        ("s.srt", CLEAN.replace("00:00:03,000 --> 00:00:04,000", "00:00:03,000 --> 00:61:04,000"), "line 6:"),
        ("s.srt", "Just some text.\nNo cues here.\n", "line 1: cannot read this srt cue"),
        ("s.srt", "1\nHello\n\n2\n00:00:01,000 --> 00:00:02,000\nHi\n", "line 2: cannot read this srt cue (expected a timing line"),
        ("s.srt", CLEAN + "\n3\nA cue without its timing line.\n", "line 10: cannot read this srt cue (expected a timing line"),
        ("s.srt", CLEAN.replace("Hello there.\n", "Hello there.\n\n7\nLost.\n"), "line 6: cannot read this srt cue (expected a timing line"),
        ("s.vtt", VTT.replace("00:00:05.000 --> 00:00:06.000", "00:00:05.000 --> 00:00:xx.000"), "line 19: cannot read this webvtt timing line"),
        ("s.vtt", VTT + "\n4\nLost words.\n", "line 23: cannot read this webvtt cue (expected a timing line"),
        ("s.vtt", VTT.replace("NOTE a comment", "A cue with no timing"), "line 5: cannot read this webvtt cue (expected a timing line"),
        ("s.vtt", CLEAN, "line 1: not a webvtt file"),
        ("s.srt", "", "is empty"),
        ("s.srt", "\n \r\n", "is empty"),
        ("s.srt", b"\x00\x01\x02" * 50, "binary"),
        ("s.txt", CLEAN, "unsupported subtitle type"),
        ("missing.srt", None, "no such file"),
    ],
)
def test_broken_files_are_one_clear_error(tmp_path, name, data, expect):
    path = tmp_path / name if data is None else write(tmp_path, name, data)
    with pytest.raises(InputError) as e:
        read_subtitles(path)
    message = str(e.value)
    assert message.startswith(str(path)) and expect in message.lower(), message
    assert "\n" not in message


# ---------------------------------------------------------------------------- chunks


def test_long_cue_becomes_several_chunks_of_one_cue(tmp_path):
    long = " ".join(f"Sentence number {i} is here and it is not short at all." for i in range(8))
    path = write(tmp_path, "s.srt", srt_with("Short one.", "[music]", long))
    cues = read_subtitles(path)
    per_cue = cue_chunks(cues, TextOptions(max_chars=120))
    assert [cue.index for cue, _ in per_cue] == [0, 2]
    assert len(per_cue[0][1]) == 1 and len(per_cue[1][1]) > 1
    chunks = [c for _, cs in per_cue for c in cs]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(len(c.text) <= 120 and c.paragraph == 2 for c in per_cue[1][1])
    assert chunks[-1].boundary == "end"


def test_srt_library_reads_what_we_read(tmp_path):
    # Sanity: after our clean-up the srt library sees the same cues (it is the parser underneath).
    cues = read_subtitles(write(tmp_path, "s.srt", CLEAN))
    subs = list(srt.parse(CLEAN))
    assert [(c.start, c.end) for c in cues] == [(s.start.total_seconds(), s.end.total_seconds()) for s in subs]

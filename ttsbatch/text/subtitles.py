"""Subtitles: an ``.srt`` or ``.vtt`` file becomes timed cues of speakable text. No torch here.

Reading is tolerant of what real files contain, and strict about what it cannot read:

* **Bytes.** Encodings as for books (``readers.decode_bytes``: a BOM decides, else UTF-8,
  Windows-1252, Latin-1; binary files are refused). CRLF and CR line endings become LF; a
  BOM anywhere is dropped; lines of only spaces count as blank.
* **SRT** (parsed with the ``srt`` library). Timing lines are rewritten to the canonical
  ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` first, so a dot (or colon) before the milliseconds,
  one- or two-digit fractions (``,5`` is 500 ms, not 5 ms), missing hours (``01:02,500``),
  ``->`` arrows and position junk after the end time are all read. Missing cue numbers,
  numbers out of order, a missing final blank line and blank lines inside a cue's text are
  accepted. Anything else (a broken timing line, stray text between cues) is an
  ``InputError`` naming the file and the line.
* **WebVTT** (parsed with ``webvtt-py``). The same timing clean-up (commas become dots);
  every line with ``-->`` must be a valid timing line, or the error names it (webvtt-py
  would silently drop such a cue). NOTE, STYLE and REGION blocks are ignored.
* **Order.** Cues are sorted by start time (ties keep file order); overlapping cues are
  kept (the timing stage never lets two voices overlap). A cue that ends before it starts
  is read as ending at its start. A cue identical to the previous one (same times, same
  text) is skipped as ``"duplicate"``.

What is spoken (``clean_cue_text``), in this order: HTML/WebVTT tags (``<i>``,
``<font color=..>``, ``<v Roger>``, ``<c.yellow>``, ``<00:01.000>``) and ASS override tags
(``{\\an8}``) are removed, ASS breaks ``\\N`` become line breaks, HTML entities are decoded;
lines with a music note (``♪ ... ♪``) are dropped; sound descriptions in brackets or
parentheses (``[laughs]``, ``(door creaks)``, also over several lines) are dropped; speaker
labels at the start of a line (``MAN:``, ``- JOHN:``, ``DR. SMITH:``: upper-case, at most 32
characters, at least two letters) and dialogue dashes are removed; the lines are joined
with spaces. With ``keep_sounds`` the music lines and sound descriptions are spoken (the
note characters and brackets go, their words stay). A cue with nothing speakable left (by
``normalize_text``) is kept in the list with ``text == ""`` and the reason in ``skipped``:
``"empty"``, ``"music"``, ``"sound"``, ``"unspeakable"`` or ``"duplicate"``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import TextOptions
from ..errors import InputError
from .document import Chunk
from .normalize import normalize_text
from .readers import MAX_INPUT_BYTES, decode_bytes

__all__ = [
    "SUBTITLE_EXTENSIONS",
    "SKIP_REASONS",
    "Cue",
    "clean_cue_text",
    "cue_chunks",
    "parse_subtitles",
    "read_subtitles",
]

SUBTITLE_EXTENSIONS = {".srt": "srt", ".vtt": "vtt"}
SKIP_REASONS = ("empty", "music", "sound", "unspeakable", "duplicate")


@dataclass(frozen=True)
class Cue:
    """One subtitle cue, in time order."""

    index: int  # 0-based position after sorting by start time
    number: str  # its number (SRT) or identifier (WebVTT) as written; "" if it has none
    start: float  # seconds
    end: float  # seconds, never before start
    raw: str  # the text as displayed (SRT: as written, tags included; WebVTT: cue tags removed)
    text: str  # what is spoken, cleaned (see the module doc); "" when skipped
    skipped: str | None  # why nothing is spoken (one of SKIP_REASONS), None if spoken
    line: int  # 1-based line of the file where its timing line is


# ---------------------------------------------------------------------------- reading


def read_subtitles(path: Path, *, keep_sounds: bool = False, text_options: TextOptions = TextOptions()) -> list[Cue]:
    """The cues of an ``.srt`` or ``.vtt`` file; every problem is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    fmt = SUBTITLE_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unsupported subtitle type {path.suffix or '(no extension)'!r}; supported: .srt, .vtt")
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:  # a 2-hour film's subtitles are ~100 kB
            raise InputError(f"{path}: {size / 2**20:.0f} MB is more than ttsbatch reads as subtitles ({MAX_INPUT_BYTES // 2**20} MB)")
        data = path.read_bytes()
    except PermissionError:
        raise InputError(f"{path}: cannot read it (permission denied)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_subtitles(data, fmt, str(path), keep_sounds=keep_sounds, text_options=text_options)


def parse_subtitles(
    data: bytes | str, fmt: str, label: str = "subtitles", *, keep_sounds: bool = False, text_options: TextOptions = TextOptions()
) -> list[Cue]:
    """Cues from raw bytes (or text) in ``fmt`` ("srt" or "vtt"); ``label`` names the input in errors."""
    text = decode_bytes(data, label) if isinstance(data, bytes) else data
    text = _LINE_BREAK_RE.sub("\n", text).replace("\ufeff", "")
    if not text.strip():
        raise InputError(f"{label}: is empty")
    lines = ["" if not line.strip() else line.rstrip() for line in text.split("\n")]
    if fmt == "srt":
        raw_cues = _parse_srt(lines, label)
    elif fmt == "vtt":
        raw_cues = _parse_vtt(lines, label)
    else:
        raise ValueError(f"unknown subtitle format {fmt!r}")
    if not raw_cues:
        raise InputError(f"{label}: no subtitle cues in it")
    raw_cues.sort(key=lambda c: (c[0], c[5]))  # start, then file order
    cues: list[Cue] = []
    previous = None
    for i, (start_ms, end_ms, number, raw, display, line) in enumerate(raw_cues):
        start, end = start_ms / 1000, max(end_ms, start_ms) / 1000
        spoken, skipped = clean_cue_text(raw, keep_sounds=keep_sounds, text_options=text_options)
        if previous is not None and (previous.start, previous.end, previous.raw) == (start, end, display):
            spoken, skipped = "", "duplicate"
        cue = Cue(index=i, number=number, start=start, end=end, raw=display, text=spoken, skipped=skipped, line=line)
        cues.append(cue)
        previous = cue
    return cues


_LINE_BREAK_RE = re.compile(r"\r\n?")

# One timestamp, loosely: [h:]m:s with an optional fraction after "," "." or ":".
_TS = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[,.:](\d+))?"
_TIMING_RE = re.compile(rf"^\s*{_TS}\s*(?:-->|->|- >|—>|–>)\s*{_TS}(\s.*)?$")
_LOOKS_TIMED_RE = re.compile(r"-->|^\s*\d+:\d{1,2}:\d{1,2}[,.:]\d")  # meant as a timing line
_SRT_NUMBER_RE = re.compile(r"^\s*-?\d+(?:\.\d*)?\s*$")


def _ms(h: str | None, m: str, s: str, frac: str | None) -> int:
    ms = int((frac or "0")[:3].ljust(3, "0"))  # ",5" is half a second; digits past ms are cut
    return ((int(h or 0) * 60 + int(m)) * 60 + int(s)) * 1000 + ms


def _timing(line: str) -> tuple[int, int] | None:
    """(start, end) in milliseconds of a timing line, or None if it is not one."""
    m = _TIMING_RE.match(line)
    if not m:
        return None
    g = m.groups()
    if int(g[1]) > 59 or int(g[2]) > 59 or int(g[5]) > 59 or int(g[6]) > 59:
        return None
    return _ms(*g[0:4]), _ms(*g[4:8])


def _stamp(ms: int, sep: str) -> str:
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _quote(line: str) -> str:
    line = line.strip()
    return repr(line if len(line) <= 60 else line[:57] + "...")


def _canonical_timings(lines: list[str], label: str, sep: str, kind: str, example: str, skip: int = 0) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Lines with every timing line rewritten canonically, and (0-based line, start ms, end ms)
    of each. A line that is meant as a timing line but cannot be read is an InputError: the
    parsers would otherwise drop that cue or read it as text of the cue before."""
    fixed, timings = [], []
    for i, line in enumerate(lines):
        if i >= skip and _LOOKS_TIMED_RE.search(line):
            t = _timing(line)
            if t is None:
                raise InputError(f"{label}: line {i + 1}: cannot read this {kind} timing line (expected '{example}'): {_quote(line)}")
            timings.append((i, *t))
            line = f"{_stamp(t[0], sep)} --> {_stamp(t[1], sep)}"
        fixed.append(line)
    return fixed, timings


def _parse_srt(lines: list[str], label: str) -> list[tuple]:
    import srt

    # Canonical timing lines; the line count stays the same, so srt's offsets map to our lines.
    fixed, timings = _canonical_timings(lines, label, ",", "SRT", "00:00:01,000 --> 00:00:02,500")
    text = "\n".join(fixed)
    try:
        subs = list(srt.parse(text))
    except srt.SRTParseError as e:
        unmatched = e.unmatched_content
        offset = e.expected_start + len(unmatched) - len(unmatched.lstrip())
        i = text.count("\n", 0, offset)
        if _SRT_NUMBER_RE.match(fixed[i]) and i + 1 < len(fixed) and fixed[i + 1]:
            i += 1  # the number is fine: the line after it should have been the timing line
            what = "expected a timing line like '00:00:01,000 --> 00:00:02,500'"
        else:
            what = "expected a cue number or a timing line"
        raise InputError(f"{label}: line {i + 1}: cannot read this SRT cue ({what}): {_quote(lines[i])}") from None
    if len(subs) != len(timings):  # pragma: no cover - every timing line starts a cue
        raise InputError(f"{label}: cannot read it as SRT ({len(timings)} timing lines but {len(subs)} cues)")
    # A block of a cue number and text with no timing line between them is a cue that lost
    # its timing line; the srt library reads it as more text of the cue before it (which
    # would then speak the number and the lost cue's words in the wrong place).
    ends = [i for i, _, _ in timings[1:]] + [len(fixed)]
    for (i, _, _), end in zip(timings, ends):
        for k in range(i + 2, end - 1):
            if not fixed[k - 1].strip() and _SRT_NUMBER_RE.match(fixed[k]) and fixed[k + 1].strip():
                raise InputError(
                    f"{label}: line {k + 2}: cannot read this SRT cue (expected a timing line like "
                    f"'00:00:01,000 --> 00:00:02,500'): {_quote(lines[k + 1])}"
                )
    out = []
    for sub, (i, start, end) in zip(subs, timings):
        content = sub.content.strip("\n")
        number = "" if sub.index is None else str(sub.index)
        out.append((start, end, number, content, content, i + 1))
    return out


def _parse_vtt(lines: list[str], label: str) -> list[tuple]:
    import webvtt
    from webvtt.errors import MalformedCaptionError, MalformedFileError

    first = next((i for i, line in enumerate(lines) if line), 0)
    if not lines[first].startswith("WEBVTT"):
        raise InputError(f"{label}: line {first + 1}: not a WebVTT file (it must start with 'WEBVTT'): {_quote(lines[first])}")
    fixed, timings = _canonical_timings(lines, label, ".", "WebVTT", "00:00:01.000 --> 00:00:02.500", skip=first + 1)
    # A block with no timing line that is not a comment, style or region is a cue that lost
    # its timing line: players (and webvtt-py) drop it, a dub would silently lose its words.
    timed = {i for i, _, _ in timings}
    k = next((j for j in range(first, len(lines)) if not lines[j].strip()), len(lines))  # the header ends
    while k < len(lines):
        if not lines[k].strip():
            k += 1
            continue
        end = next((j for j in range(k, len(lines)) if not lines[j].strip()), len(lines))
        if not timed.intersection(range(k, end)) and not lines[k].lstrip().startswith(("NOTE", "STYLE", "REGION")):
            bad = k + 1 if end - k > 1 else k  # an identifier, then text: the timing line belonged after it
            raise InputError(
                f"{label}: line {bad + 1}: cannot read this WebVTT cue (expected a timing line like "
                f"'00:00:01.000 --> 00:00:02.500'): {_quote(lines[bad])}"
            )
        k = end
    try:
        captions = webvtt.from_string("\n".join(fixed[first:]) + "\n").captions
    except (MalformedFileError, MalformedCaptionError, ValueError) as e:
        raise InputError(f"{label}: cannot read it as WebVTT ({e})") from None
    out = []
    for k, (i, start, end) in enumerate(timings):
        cap = captions[k] if k < len(captions) else None
        if cap is None or (cap.start_time.in_milliseconds(), cap.end_time.in_milliseconds()) != (start, end):
            raise InputError(f"{label}: line {i + 1}: cannot read this WebVTT cue: {_quote(lines[i])}")
        out.append((start, end, cap.identifier or "", "\n".join(cap.lines).strip("\n"), cap.text.strip("\n"), i + 1))
    return out


# ---------------------------------------------------------------------------- cleaning

_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>|<\d+:\d{2}(?::\d{2})?(?:[.,]\d+)?>")
_ASS_RE = re.compile(r"\{\\[^{}]*\}")
_ASS_BREAK_RE = re.compile(r"\\[Nn]")
_MUSIC = "♪♫♬♩🎵🎶"
_MUSIC_RE = re.compile(f"[{_MUSIC}]")
_SOUND_RE = re.compile(r"\[[^\[\]]*\]|\([^()]*\)")
_BRACKETS_RE = re.compile(r"[\[\]()]")
_SPEAKER_RE = re.compile(r"^\s*[-–—]*\s*([^\s:a-z][^:a-z]{0,31}?)\s*:(?=\s|$)")
_DASH_RE = re.compile(r"^\s*[-–—]+\s*")
_LEADING_PUNCT_RE = re.compile(r"^[\s:;,]+")
_SPEAKER_CHARS = frozenset(" .'’&-")


def _is_speaker(label: str) -> bool:
    letters = sum(c.isalpha() for c in label)
    return letters >= 2 and all(c.isalnum() or c in _SPEAKER_CHARS for c in label) and label == label.upper()


def clean_cue_text(raw: str, *, keep_sounds: bool = False, text_options: TextOptions = TextOptions()) -> tuple[str, str | None]:
    """``(spoken text, skip reason)`` of a cue's raw text; the reason is None when something is spoken."""
    text = _ASS_RE.sub("", raw)
    text = _ASS_BREAK_RE.sub("\n", text).replace("\\h", " ")
    text = html.unescape(_TAG_RE.sub("", text))
    if not text.strip():
        return "", "empty"
    removed: list[str] = []
    lines = text.split("\n")
    if keep_sounds:
        lines = [_MUSIC_RE.sub(" ", line) for line in lines]
    elif any(_MUSIC_RE.search(line) for line in lines):
        lines = [line for line in lines if not _MUSIC_RE.search(line)]
        removed.append("music")
    text = "\n".join(lines)
    if keep_sounds:
        text = _BRACKETS_RE.sub(" ", text)
    else:
        stripped = _SOUND_RE.sub(" ", text)
        if stripped != text:
            removed.append("sound")
        text = stripped
    out = []
    for line in text.split("\n"):
        m = _SPEAKER_RE.match(line)
        if m and _is_speaker(m.group(1)):
            line = line[m.end() :]
        line = _LEADING_PUNCT_RE.sub("", _DASH_RE.sub("", line)).strip()
        if line:
            out.append(line)
    spoken = " ".join(" ".join(out).split())
    if not normalize_text(spoken, text_options):
        return "", removed[0] if removed and not spoken else "unspeakable"
    return spoken, None


# ---------------------------------------------------------------------------- chunks


def cue_chunks(cues: list[Cue], opts: TextOptions) -> list[tuple[Cue, list[Chunk]]]:
    """The chunks of every spoken cue, in time order: ``(cue, [Chunk, ...])``.

    A cue whose normalized text fits ``opts.max_chars`` is one chunk; a longer one is split
    like a book paragraph (``chunk_paragraph``) and its audio is joined again for that cue.
    ``Chunk.paragraph`` is the cue's index; ``Chunk.index`` counts chunks across the file.
    """
    from .chunking import _check, chunk_paragraph
    from .sentences import train_punkt

    _check(opts)
    spoken = [c for c in cues if not c.skipped]
    tokenizer = train_punkt("\n\n".join(c.text for c in spoken), opts.language)
    out: list[tuple[Cue, list[Chunk]]] = []
    index = 0
    for k, cue in enumerate(spoken):
        pieces = [(s, e, t) for s, e, t, _ in chunk_paragraph(cue.text, tokenizer, opts) if t]
        chunks = []
        for j, (s, e, t) in enumerate(pieces):
            last_of_cue = j + 1 == len(pieces)
            boundary = ("end" if k + 1 == len(spoken) else "paragraph") if last_of_cue else "sentence"
            chunks.append(Chunk(index=index, text=t, source=cue.text[s:e], chapter=0, paragraph=cue.index, boundary=boundary))
            index += 1
        if chunks:
            out.append((cue, chunks))
    return out

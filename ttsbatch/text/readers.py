"""Readers: a file (or bytes from stdin) becomes a ``Document`` of chapters and paragraphs.

Formats: plain text (``.txt``, ``.text``), Markdown (``.md``, ``.markdown``) and EPUB
(``.epub``, read by ``epub.py`` into the same chapters and paragraphs).

Decoding, strictly in this order: a byte-order mark (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE)
decides; otherwise UTF-8, then Windows-1252, then Latin-1. Input with NUL bytes (and no
UTF-16/32 BOM) or with many control characters is refused as binary. CRLF and CR line
endings are read as LF; other control characters (form feeds, a DOS end-of-file mark) are
dropped or read as line breaks.

Paragraphs (plain text): blank lines separate paragraphs. A line that starts with
indentation (a tab or two or more spaces) right after a line without indentation also
starts a new paragraph (books that indent first lines instead of leaving blank lines);
consecutive indented lines stay together (poetry, block quotes). Inside a paragraph the
hard-wrapped lines are joined with one space, except that a line ending in
``letter-`` followed by a line starting with a lowercase letter is joined without one
(``some-\\nthing`` -> ``some-thing``): no character is lost, only whitespace.

Chapters: a line on its own (the first line of a paragraph) such as ``CHAPTER I.``,
``Chapter 12``, ``Chapter Two: The Storm``, ``Part III``, ``Book 2``, ``PROLOGUE``,
``Epilogue``, ``Preface``, ``Introduction`` starts a chapter, in both formats (see
``is_chapter_heading``); the rest of that paragraph, if any, becomes the chapter's next
paragraph. In Markdown every heading (``#`` .. ``######``, setext ``===``/``---``) starts
a chapter too. The heading is the chapter's title and also its first paragraph, so it is
spoken. A bare number (``Chapter I``) over one short line (``The Cyclone``) is titled
``Chapter I: The Cyclone``, both lines spoken. A table of contents (a block whose lines are
nearly all headings, or three or more headings in a row with nothing under them) is read
as text and starts no chapter. Text before the first heading forms a chapter whose title is
None.

Markdown is parsed with markdown-it-py (CommonMark, plus tables and strikethrough) and
only its text is kept: emphasis, inline code backticks, link targets (the link text
stays), images, list bullets and numbers, blockquote markers, HTML tags and comments,
horizontal rules and table pipes disappear; fenced code blocks are dropped; each table row
becomes one paragraph with its cells joined by ", ". Footnotes (``[^1]``, read with
mdit-py-plugins): the markers are not spoken, and the notes are spoken at the end of the
book, in a last chapter titled "Notes". Indented code blocks are not
recognised (indented lines are prose in books). A YAML front-matter block is skipped.

Project Gutenberg books (both formats): the header above ``*** START OF THE PROJECT
GUTENBERG EBOOK ... ***``, the producers' credit after it and the license from ``*** END OF
...`` on are left out, and ``Document.left_out`` says so (see ``strip_gutenberg``).
"""

from __future__ import annotations

import codecs
import html
import re
from pathlib import Path

from ..errors import InputError
from .document import Chapter, Document

__all__ = ["read_document", "read_text", "decode_bytes", "is_chapter_heading", "SUPPORTED_EXTENSIONS"]

SUPPORTED_EXTENSIONS: dict[str, str] = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".epub": "epub"}

_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_SAMPLE = 65536  # characters looked at by the binary check
_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # not \t \n \v \f \r
_LINE_BREAKS_RE = re.compile(r"\r\n?|[\v\f\x1c-\x1e\x85\u2028\u2029]")


# ---------------------------------------------------------------------------- decoding


def decode_bytes(data: bytes, label: str) -> str:
    """Text of ``data`` (see the module doc for the order); InputError naming ``label``."""
    for bom, codec, family in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(codec)
            except UnicodeDecodeError as e:
                raise InputError(f"{label}: starts with a {family} byte-order mark but is not valid {family} ({e.reason} at byte {e.start + len(bom)})") from None
    if b"\x00" in data:
        raise InputError(f"{label}: looks like a binary file (it contains NUL bytes), not text")
    for codec in ("utf-8", "cp1252", "latin-1"):
        try:
            text = data.decode(codec)
            break
        except UnicodeDecodeError:
            continue
    sample = text[:_SAMPLE]
    controls = len(_CONTROL_RE.findall(sample))
    if controls >= 8 and controls > 0.1 * len(sample):
        raise InputError(f"{label}: looks like a binary file (mostly control characters), not text")
    return text


def _clean(text: str) -> str:
    """LF line endings; page breaks become line breaks; other control characters go."""
    text = _LINE_BREAKS_RE.sub("\n", text)
    text = text.replace("\ufeff", "")  # a BOM in the middle (concatenated files)
    return _CONTROL_RE.sub("", text)


# ---------------------------------------------------------------------------- headings

_NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth thirtieth fortieth "
    "fiftieth last final"
).split()
_WORD = "(?:" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + ")"
_ROMAN = r"(?=[MDCLXVI])M{0,4}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})"
_NUMBER = rf"(?:\d{{1,4}}|{_ROMAN}|{_WORD}(?:[- ]{_WORD})*)"
_SEP_TITLE = r"(?:\s*[.:\-—–]\s*\S.*|\s+(?-i:[\"'“‘(\[A-Z0-9]).*)?"  # ": The Storm", ". The End", " The Storm"
_HEADING_RE = re.compile(
    rf"(?:(?:chapter|part|book|volume|act|canto)\s+{_NUMBER}\b\.?{_SEP_TITLE}"
    rf"|(?:prologue|epilogue|preface|foreword|introduction|afterword|interlude|appendix)\b\.?{_SEP_TITLE})",
    re.IGNORECASE,
)
_MAX_HEADING = 80
# "Chapter I" or "CHAPTER XII." and nothing more: its title may stand on the next line
_BARE_HEADING_RE = re.compile(rf"(?:chapter|part|book|volume|act|canto)\s+{_NUMBER}\b\.?", re.IGNORECASE)
_MAX_SUBTITLE = 60


def is_chapter_heading(line: str) -> bool:
    """Is this line, on its own, a chapter heading such as ``CHAPTER I.`` or ``Part Two: Ice``?"""
    line = line.strip().strip("*_#").strip()  # "**Chapter 1**"
    if not line or len(line) > _MAX_HEADING or not line[0].isupper():
        return False
    m = _HEADING_RE.fullmatch(line)
    if not m:
        return False
    # " The Storm" after the number must look like a title, not a sentence going on.
    return not line.endswith((",", ";"))


# ---------------------------------------------------------------------------- building


class _Builder:
    def __init__(self) -> None:
        self.chapters: list[tuple[str | None, list[str]]] = [(None, [])]
        # what the Document carries beside its chapters: set by the reader that finds them
        self.title: str | None = None
        self.author: str | None = None
        self.left_out: tuple[str, ...] = ()

    def heading(self, title: str) -> None:
        """Start a chapter called ``title``; the title is its first paragraph (spoken)."""
        title = " ".join(title.split())
        if title:
            self.chapters.append((title, [title]))

    def subtitle(self, text: str) -> None:
        """A line under the chapter's heading that belongs to its title: spoken, and in the title."""
        title, paras = self.chapters[-1]
        paras.append(text)
        self.chapters[-1] = (f"{title.rstrip('.')}: {text}" if title else text, paras)

    def paragraph(self, text: str) -> None:
        text = text.strip()
        if text:
            self.chapters[-1][1].append(text)

    def block(self, lines: list[str]) -> None:
        """A block of lines (one paragraph, or a heading line and a paragraph)."""
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            return
        if len(lines) >= 3 and sum(map(is_chapter_heading, lines)) >= 0.8 * len(lines):
            # a table of contents ("Introduction", "Chapter I. The Cyclone", ...): read, not chapters
            self.paragraph(join_lines(lines))
            return
        if is_chapter_heading(lines[0]):
            first = lines[0].strip()
            if len(lines) == 2 and _is_subtitle(lines[1]) and _BARE_HEADING_RE.fullmatch(first.strip("*_#").strip()):
                # "Chapter I" over "The Cyclone": one title for the chapter marks, both spoken
                self.heading(first)
                self.subtitle(" ".join(lines[1].split()))
                return
            self.heading(first)
            lines = lines[1:]
        self.paragraph(join_lines(lines))

    def build(self, name: str, label: str) -> Document:
        chapters = [(title, paras) for title, paras in self.chapters if paras]
        # a contents list set one entry to a paragraph makes chapters of nothing but their
        # heading, three or more in a row: they are read as paragraphs of the chapter before
        merged: list[tuple[str | None, list[str]]] = []
        i = 0
        while i < len(chapters):
            j = i
            while j < len(chapters) and chapters[j][0] is not None and chapters[j][1] == [chapters[j][0]]:
                j += 1
            if j - i >= 3 and j < len(chapters):
                if not merged:
                    merged.append((None, []))
                merged[-1][1].extend(title for title, _ in chapters[i:j])
                i = j
                continue
            merged.append(chapters[i])
            i += 1
        chapters = tuple(Chapter(title, tuple(paras)) for title, paras in merged)
        if not chapters:
            raise InputError(f"{label}: has no text to read")
        return Document(name=name, chapters=chapters, left_out=self.left_out, title=self.title, author=self.author)


def _is_subtitle(line: str) -> bool:
    """Could this line be a chapter's title under its number: short, and not a sentence going on?"""
    line = line.strip()
    if not 0 < len(line) <= _MAX_SUBTITLE or not line[0].isupper() or line.endswith((",", ";", ":", "-")):
        return False
    # "It was late." is the chapter's first sentence; "THE CYCLONE." and "Who Stole the Tarts?" are titles
    return not line.endswith(".") or line.isupper()


_HYPHEN_END_RE = re.compile(r"[^\W\d_]-$")


def join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines of one paragraph joined with single spaces (see the module doc)."""
    out = ""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not out:
            out = line
        elif _HYPHEN_END_RE.search(out) and line[0].islower():
            out += line
        else:
            out += " " + line
    return out


# ---------------------------------------------------------------------------- plain text

_INDENT_RE = re.compile(r"^(?:\t|  )\s*\S")


def _parse_txt(text: str, builder: _Builder) -> None:
    block: list[str] = []
    prev_indented = False
    for line in text.split("\n"):
        if not line.strip():
            builder.block(block)
            block = []
            continue
        indented = bool(_INDENT_RE.match(line))
        if block and indented and not prev_indented:
            builder.block(block)
            block = []
        block.append(line)
        prev_indented = indented
    builder.block(block)


# ---------------------------------------------------------------------------- markdown

_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\n[\w-]+[ \t]*:.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_TAG_RE = re.compile(r"<!--.*?-->|<[^>]*>", re.DOTALL)
_md_parser = None


def _markdown():
    global _md_parser
    if _md_parser is None:
        from markdown_it import MarkdownIt
        from mdit_py_plugins.footnote import footnote_plugin

        md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).use(footnote_plugin)
        md.disable("code")  # indented lines are prose, not code, in books
        _md_parser = md
    return _md_parser


def _inline_text(token) -> str:
    """Plain text of an inline token; soft and hard line breaks become ``\\n``."""
    parts = []
    for child in token.children or ():
        kind = child.type
        if kind in ("text", "code_inline"):
            parts.append(child.content)
        elif kind in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif kind == "html_inline":
            if re.match(r"<br\b", child.content, re.IGNORECASE):
                parts.append("\n")
        # images, link/emphasis/strikethrough open and close tags: nothing to say
    return "".join(parts)


def _html_text(block: str) -> str:
    return re.sub(r"[ \t]+", " ", html.unescape(_TAG_RE.sub(" ", block)))


def _front_matter_value(front: str, key: str) -> str | None:
    m = re.search(rf"^{key}[ \t]*:[ \t]*(.+?)[ \t]*$", front, re.MULTILINE)
    return (m.group(1).strip("\"'").strip() or None) if m else None


def _parse_md(text: str, builder: _Builder) -> None:
    """Feed the Markdown ``text`` to ``builder``, the front matter's ``title:`` and ``author:`` too."""
    front = _FRONT_MATTER_RE.match(text)
    if front:
        builder.title, builder.author = _front_matter_value(front.group(), "title"), _front_matter_value(front.group(), "author")
        text = text[front.end():]
    tokens = _markdown().parse(text)
    i = 0
    row: list[str] | None = None
    while i < len(tokens):
        tok = tokens[i]
        kind = tok.type
        if kind == "heading_open":
            builder.heading(" ".join(_inline_text(tokens[i + 1]).split()))
            i += 3
            continue
        if kind == "footnote_block_open":  # the plugin gathers every note here, at the end
            builder.heading("Notes")
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close":
            builder.paragraph(", ".join(cell for cell in row or () if cell))
            row = None
        elif kind == "inline":
            if row is not None:
                row.append(" ".join(_inline_text(tok).split()))
            else:
                builder.block(_inline_text(tok).split("\n"))
        elif kind == "html_block":
            for para in re.split(r"\n\s*\n", _html_text(tok.content)):
                builder.block(para.split("\n"))
        # fence, code_block, hr and every *_open/_close: nothing to say
        i += 1


# ---------------------------------------------------------------------------- Project Gutenberg

# the start line, or the end of the old (1990s) "small print" that stood in its place
_PG_START_RE = re.compile(r"^(?:\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b|\*END\*THE SMALL PRINT!).*$", re.I | re.M)
_PG_END_RE = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.I | re.M)
# the line some older books put just above the end marker
_PG_END_LINE_RE = re.compile(r"^\s*End of (?:the )?Project Gutenberg\b.*$", re.I | re.M)
# the producers' credit, the first paragraph after the start marker in many books
_PG_CREDIT_RE = re.compile(r"\A\s*(?:Produced by|E-?text prepared by|Transcribed from)\b.*?(?:\n[ \t]*\n|\Z)", re.I | re.S)


def strip_gutenberg(text: str) -> tuple[str, tuple[str, ...]]:
    """A Project Gutenberg book without the header, the producers' credit and the license.

    A book from gutenberg.org starts with some 30 lines about the file and ends with the
    Project Gutenberg License, some 350 lines (20 minutes of speech); both sit outside the
    ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` and ``*** END OF ... ***`` lines,
    which are dropped with them. Only a book with a start line is touched. Returns the text and
    what was left out, one line each (for the plan and the log).
    """
    start = _PG_START_RE.search(text)
    if start is None:
        return text, ()
    head, body = text[: start.end()], text[start.end():]
    end = _PG_END_RE.search(body)
    cut = end.start() if end is not None else len(body)
    line = None
    for line in _PG_END_LINE_RE.finditer(body, 0, cut):  # the last "End of ..." line above the cut
        pass
    # it goes with the end marker right under it; with no marker (old books), it is the end
    # itself if no more than a few lines follow it
    if line is not None and (not body[line.end(): cut].strip() if end is not None else body.count("\n", line.end()) < 40):
        cut = line.start()
    body, tail = body[:cut], body[cut:]
    credit = _PG_CREDIT_RE.match(body)
    if credit is not None:
        body = body[credit.end():]
    left_out = [f"Project Gutenberg's header ({_lines(head.count(chr(10)) + 1)})"]
    if credit is not None:
        left_out.append(f"the producers' credit ({' '.join(credit.group().split())[:60]})")
    if tail:
        left_out.append(f"Project Gutenberg's end notes and license ({_lines(tail.strip().count(chr(10)) + 1)})")
    return body, tuple(left_out)


def _lines(n: int) -> str:
    return f"{n} line{'s' if n != 1 else ''}"


# ---------------------------------------------------------------------------- public


def _read(data: bytes, name: str, fmt: str, label: str) -> Document:
    if fmt not in ("txt", "md", "epub"):
        raise InputError(f"{label}: unknown text format {fmt!r}; expected 'txt', 'md' or 'epub'")
    if not data:
        raise InputError(f"{label}: file is empty")
    if fmt == "epub":
        from .epub import parse_epub

        builder = _Builder()
        parse_epub(data, label, builder)
        return builder.build(name, label)
    text = _clean(decode_bytes(data, label))
    if not text.strip():
        raise InputError(f"{label}: file contains only whitespace")
    builder = _Builder()
    text, builder.left_out = strip_gutenberg(text)
    (_parse_md if fmt == "md" else _parse_txt)(text, builder)
    return builder.build(name, label)


# The longest novels are a few MB; 50 MB of text is some 800 hours of speech. Past this we
# refuse rather than hold hundreds of MB of text and millions of chunks in memory.
MAX_INPUT_BYTES = 50 * 1024 * 1024


# An EPUB carries its pictures and fonts with the text: an illustrated one is larger.
MAX_EPUB_BYTES = 200 * 1024 * 1024


def _too_large(label: str, size: int, limit: int = MAX_INPUT_BYTES) -> InputError:
    what = "an EPUB" if limit == MAX_EPUB_BYTES else "text"
    return InputError(
        f"{label}: {size / 2**20:.0f} MB of {what} is more than ttsbatch reads at once "
        f"({limit // 2**20} MB{', some 800 hours of speech' if limit == MAX_INPUT_BYTES else ''}); split it into parts"
    )


def read_text(data: bytes, name: str, fmt: str = "txt") -> Document:
    """A Document from raw bytes (e.g. stdin); ``fmt`` is ``"txt"`` or ``"md"``."""
    if len(data) > MAX_INPUT_BYTES:
        raise _too_large(name, len(data))
    return _read(data, name, fmt, name)


def read_document(path: Path) -> Document:
    """Read a .txt/.text/.md/.markdown/.epub file; every problem is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    fmt = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        kinds = ", ".join(SUPPORTED_EXTENSIONS)
        raise InputError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; supported: {kinds}")
    try:
        size = path.stat().st_size
        limit = MAX_EPUB_BYTES if fmt == "epub" else MAX_INPUT_BYTES
        if size > limit:
            raise _too_large(str(path), size, limit)
        data = path.read_bytes()
    except PermissionError:
        raise InputError(f"{path}: cannot read it (permission denied)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    return _read(data, path.name, fmt, str(path))

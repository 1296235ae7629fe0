"""Readers: encodings, line endings, paragraphs, chapters, Markdown stripping, bad input."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from ttsbatch.errors import InputError
from ttsbatch.text.readers import is_chapter_heading, read_document, read_text

TEXT = "Café “naïve” — déjà vu.\n\nSecond paragraph."


def paragraphs(doc):
    return [p for ch in doc.chapters for p in ch.paragraphs]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "data",
    [
        TEXT.encode("utf-8"),
        codecs.BOM_UTF8 + TEXT.encode("utf-8"),
        codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
        codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
        codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"),
        TEXT.encode("cp1252"),
    ],
    ids=["utf8", "utf8-bom", "utf16le-bom", "utf16be-bom", "utf32le-bom", "cp1252"],
)
def test_encodings(tmp_path, data):
    doc = read_document(write(tmp_path, "book.txt", data))
    assert doc.name == "book.txt"
    assert paragraphs(doc) == ["Café “naïve” — déjà vu.", "Second paragraph."]


def test_latin1_fallback_when_not_cp1252(tmp_path):
    # 0x8d is undefined in cp1252, so only Latin-1 decodes this; the C1 control it becomes is dropped.
    doc = read_document(write(tmp_path, "old.txt", b"Gr\xfc\xdfe aus K\xf6ln \x8d."))
    assert paragraphs(doc) == ["Grüße aus Köln ."]


def test_utf8_is_tried_before_cp1252(tmp_path):
    # "Ã©" in cp1252 is the UTF-8 encoding of "é": UTF-8 must win.
    assert paragraphs(read_document(write(tmp_path, "a.txt", "é".encode("utf-8")))) == ["é"]


def test_bom_with_invalid_content_is_an_error(tmp_path):
    path = write(tmp_path, "bad.txt", codecs.BOM_UTF16_LE + b"a\x00b")  # odd length
    with pytest.raises(InputError, match=r"bad\.txt.*UTF-16"):
        read_document(path)


@pytest.mark.parametrize("newline", ["\r\n", "\r", "\n"], ids=["crlf", "cr", "lf"])
def test_line_endings(newline):
    raw = newline.join(["First line", "wrapped here.", "", "Second", "para."])
    doc = read_text(raw.encode(), "x.txt")
    assert paragraphs(doc) == ["First line wrapped here.", "Second para."]


def test_control_characters_are_dropped_and_form_feed_breaks_lines():
    doc = read_text(b"One\x0cTwo\x07 three.\x1a", "x.txt")
    assert paragraphs(doc) == ["One Two three."]


# ---------------------------------------------------------------------------- paragraphs


def test_hard_wraps_are_joined_and_blank_lines_separate():
    raw = "It was a dark\n   and stormy\nnight.\n\n\n\nThe end\nof it.  \n"
    # "   and stormy" is indented after an unindented line: a new paragraph by the documented rule
    assert paragraphs(read_text(raw.encode(), "x.txt")) == ["It was a dark", "and stormy night.", "The end of it."]


def test_hyphenated_line_break_keeps_every_character():
    doc = read_text(b"some-\nthing and well-\nKnown and 1990-\n1995", "x.txt")
    (para,) = paragraphs(doc)
    assert para == "some-thing and well- Known and 1990- 1995"
    assert "".join(para.split()) == "some-thingandwell-Knownand1990-1995"


def test_indented_first_lines_start_paragraphs_but_indented_blocks_stay_together():
    raw = "    First paragraph starts\nand goes on.\n    Second one\nends here.\nPoem:\n    line one\n    line two\n"
    assert paragraphs(read_text(raw.encode(), "x.txt")) == [
        "First paragraph starts and goes on.",
        "Second one ends here. Poem:",
        "line one line two",
    ]


# ---------------------------------------------------------------------------- chapters


def test_txt_chapters():
    raw = (
        "A preface line.\n\n"
        "CHAPTER I.\nDown the Rabbit-Hole\n\nAlice was tired.\n\n"
        "Chapter Two: The Storm\n\nRain fell\nhard.\n\n"
        "PROLOGUE\n\nEarlier.\n\n"
        "Part III\n\nLater.\n\nEPILOGUE\n\nDone."
    )
    doc = read_text(raw.encode(), "b.txt")
    # a bare number's title on the next line is the chapter's title too (both are spoken)
    assert [c.title for c in doc.chapters] == [None, "CHAPTER I: Down the Rabbit-Hole", "Chapter Two: The Storm", "PROLOGUE", "Part III", "EPILOGUE"]
    assert doc.chapters[0].paragraphs == ("A preface line.",)
    assert doc.chapters[1].paragraphs == ("CHAPTER I.", "Down the Rabbit-Hole", "Alice was tired.")
    assert doc.chapters[2].paragraphs == ("Chapter Two: The Storm", "Rain fell hard.")
    assert doc.chapters[-1].paragraphs == ("EPILOGUE", "Done.")


def test_a_table_of_contents_is_read_but_makes_no_chapters():
    # Oz's contents list made a chapter "Introduction" (its first line) before the real one,
    # and its chapters were called "Chapter I" with the title "The Cyclone" left out
    raw = ("Contents\n\n Introduction\n Chapter I. The Cyclone\n Chapter II. The Council\n\n\n"
           "Introduction\n\nFolklore.\n\nChapter I\nThe Cyclone\n\nDorothy lived.\n\n"
           "Chapter II\nThe Council with the Munchkins\n\nShe was awakened.\n")
    doc = read_text(raw.encode(), "oz.txt")
    assert [c.title for c in doc.chapters] == [None, "Introduction", "Chapter I: The Cyclone", "Chapter II: The Council with the Munchkins"]
    assert doc.chapters[0].paragraphs == ("Contents", "Introduction Chapter I. The Cyclone Chapter II. The Council")
    assert doc.chapters[2].paragraphs == ("Chapter I", "The Cyclone", "Dorothy lived.")
    # a contents list with one entry a paragraph: headings with nothing under them, read as text
    raw = "CONTENTS\n\nCHAPTER I. Down\n\nCHAPTER II. Pool\n\nCHAPTER III. Race\n\nCHAPTER I. Down\n\nAlice.\n\nCHAPTER II. Pool\n\nTears.\n"
    doc = read_text(raw.encode(), "alice.txt")
    assert [c.title for c in doc.chapters] == [None, "CHAPTER I. Down", "CHAPTER II. Pool"]
    assert doc.chapters[0].paragraphs == ("CONTENTS", "CHAPTER I. Down", "CHAPTER II. Pool", "CHAPTER III. Race")
    # ...but a book that starts with them keeps them as chapters if nothing follows
    assert [c.title for c in read_text(b"Part 1\n\nPart 2\n\nPart 3\n", "p.txt").chapters] == ["Part 1", "Part 2", "Part 3"]
    # a heading over a sentence, or over more than one line, keeps its own title
    doc = read_text(b"Chapter 3\nIt was late, and cold.\n\nChapter 4\nThe Storm\nRain fell.\n\nCHAPTER V.\nTHE END.\n\n"
                    b"Chapter 6\nWho Stole the Tarts?\n\nText.\n", "c.txt")
    assert [c.title for c in doc.chapters] == ["Chapter 3", "Chapter 4", "CHAPTER V: THE END.", "Chapter 6: Who Stole the Tarts?"]
    assert doc.chapters[0].paragraphs == ("Chapter 3", "It was late, and cold.")


def test_no_empty_untitled_chapter_when_the_book_starts_with_a_heading():
    doc = read_text(b"\n\nChapter 12\n\nText.", "b.txt")
    assert [c.title for c in doc.chapters] == ["Chapter 12"]
    assert doc.chapters[0].paragraphs == ("Chapter 12", "Text.")


@pytest.mark.parametrize(
    "line",
    ["CHAPTER I.", "Chapter 12", "Chapter Two: The Storm", "PROLOGUE", "Epilogue", "Part III", "Chapter XIV. The End",
     "Chapter Twenty-One", "Book 2", "Chapter 7 The Storm", "**Chapter 3**", "Introduction"],
)
def test_is_chapter_heading(line):
    assert is_chapter_heading(line)


@pytest.mark.parametrize(
    "line",
    ["Chapter 3 was long and dull.", "part one", "The Chapter 1", "Part I want to keep", "Prologues are dull.",
     "Chapter " + "1: " + "x" * 100, "Chapter 3, in which,", ""],
)
def test_is_not_chapter_heading(line):
    assert not is_chapter_heading(line)


def test_heading_only_counts_as_the_first_line_of_a_paragraph():
    doc = read_text(b"He played the\nPart III\nof the suite.", "b.txt")
    assert [c.title for c in doc.chapters] == [None]
    assert paragraphs(doc) == ["He played the Part III of the suite."]


# ---------------------------------------------------------------------------- markdown

MD = """---
title: My Book
author: Me
---

Intro *before* any heading.

# The First

Some *emph*, _under_, **strong** and `code` with a [link](http://example.com/x) and
![an image](pic.png) wrapped over some-
thing.

> A quoted
> line.

- item one
* item two
1. numbered

```python
def hidden(): pass
```

| Name | Age |
|------|-----|
| Ann  | 30  |

<div>Some <b>html</b> here</div>
<!-- a comment -->

***

Setext Heading
==============

Text ~~struck~~ &amp; done.<br>Next.

Subtitle
--------

CHAPTER IV.

Fourth.
"""


def test_markdown_structure_and_stripping():
    doc = read_text(MD.encode(), "book.md", fmt="md")
    assert [c.title for c in doc.chapters] == [None, "The First", "Setext Heading", "Subtitle", "CHAPTER IV."]
    assert doc.chapters[0].paragraphs == ("Intro before any heading.",)
    assert doc.chapters[1].paragraphs == (
        "The First",
        "Some emph, under, strong and code with a link and wrapped over some-thing.",
        "A quoted line.",
        "item one",
        "item two",
        "numbered",
        "Name, Age",
        "Ann, 30",
        "Some html here",
    )
    assert doc.chapters[2].paragraphs == ("Setext Heading", "Text struck & done. Next.")
    assert doc.chapters[4].paragraphs == ("CHAPTER IV.", "Fourth.")
    text = " ".join(paragraphs(doc))
    for gone in ("*", "_", "`", "http", "pic.png", "image", "hidden", "|", "<", ">", "#", "title:", "comment", "==="):
        assert gone not in text, gone


def test_markdown_footnotes_are_read_at_the_end_without_their_markers():
    # they were read where they stood, markers and all: "Footnote( 1)." and "( 1), The note."
    raw = ("# One\n\nA claim[^1] and another[^long].\n\n[^1]: The first note.\n\n"
           "# Two\n\nMore text.\n\n[^long]: A second note,\n    over two lines.\n")
    doc = read_text(raw.encode(), "x.md", fmt="md")
    assert [c.title for c in doc.chapters] == ["One", "Two", "Notes"]
    assert doc.chapters[0].paragraphs == ("One", "A claim and another.")
    assert doc.chapters[1].paragraphs == ("Two", "More text.")
    assert doc.chapters[2].paragraphs == ("Notes", "The first note.", "A second note, over two lines.")
    # without notes there is no Notes chapter, and a bracket that is no footnote stays
    doc = read_text(b"# One\n\nA [bracket] and [^none].", "x.md", fmt="md")
    assert [c.title for c in doc.chapters] == ["One"] and doc.chapters[0].paragraphs[1] == "A [bracket] and [^none]."


PG_BOOK = """\ufeffThe Project Gutenberg eBook of Oz

This ebook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost.

Title: Oz

*** START OF THE PROJECT GUTENBERG EBOOK OZ ***

Produced by David Widger
and others.

CHAPTER I.

Dorothy lived in the midst of the great Kansas prairies (she read *** END OF it).

End of Project Gutenberg's Oz, by L. Frank Baum

*** END OF THE PROJECT GUTENBERG EBOOK OZ ***

Updated editions will replace the previous one.

START: FULL LICENSE
"""


@pytest.mark.parametrize("fmt", ["txt", "md"])
def test_project_gutenberg_header_credit_and_license_are_left_out_and_said(fmt):
    # they were read aloud: the license alone is some 20 minutes of speech
    doc = read_text(PG_BOOK.encode(), f"oz.{fmt}", fmt=fmt)
    assert paragraphs(doc) == ["CHAPTER I.", "Dorothy lived in the midst of the great Kansas prairies (she read *** END OF it)."]
    assert doc.left_out == (
        "Project Gutenberg's header (8 lines)",
        "the producers' credit (Produced by David Widger and others.)",
        "Project Gutenberg's end notes and license (7 lines)",
    )
    # the older markers ("THIS PROJECT GUTENBERG EBOOK"), no credit, no end marker
    old = "Header.\n*** START OF THIS PROJECT GUTENBERG EBOOK OZ ***\n\nThe text.\n"
    doc = read_text(old.encode(), "oz.txt")
    assert paragraphs(doc) == ["The text."] and doc.left_out == ("Project Gutenberg's header (2 lines)",)
    # a 1990s book: its small print ends the header, and a line alone ends the book
    old = ("The Project Gutenberg Etext of X\n\n**The Legal Small Print**\nTerms.\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nThe text.\n\n"
           "End of The Project Gutenberg Etext of X\n")
    doc = read_text(old.encode(), "x.txt")
    assert paragraphs(doc) == ["The text."]
    assert doc.left_out == ("Project Gutenberg's header (5 lines)", "Project Gutenberg's end notes and license (1 line)")
    # a book without the start line is not touched, whatever it says of Project Gutenberg
    plain = "About Project Gutenberg.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nMore.\n"
    doc = read_text(plain.encode(), "x.txt")
    assert len(paragraphs(doc)) == 3 and doc.left_out == ()


def test_the_books_own_title_from_markdown_front_matter():
    doc = read_text(b'---\ntitle: "The Book"\nauthor: Me\n---\n\n# One\n\nText.\n', "b.md", fmt="md")
    assert doc.title == "The Book" and doc.display_title == "The Book" and doc.author == "Me"
    assert [c.title for c in doc.chapters] == ["One"]
    for raw, fmt in [(b"# One\n\nText.\n", "md"), (b"---\ntitle: X\n---\nText.\n", "txt")]:
        doc = read_text(raw, "b." + fmt, fmt=fmt)
        assert doc.title is None and doc.author is None and doc.display_title == "b." + fmt


def test_markdown_file_extensions(tmp_path):
    for name in ("a.md", "b.markdown", "c.MD"):
        doc = read_document(write(tmp_path, name, b"# Head\n\n**Bold** text."))
        assert paragraphs(doc) == ["Head", "Bold text."], name
    doc = read_document(write(tmp_path, "d.text", b"# Not a heading in txt"))
    assert paragraphs(doc) == ["# Not a heading in txt"]


def test_markdown_indented_text_is_prose_not_code():
    doc = read_text(b"Para one.\n\n    Indented para two.", "x.md", fmt="md")
    assert paragraphs(doc) == ["Para one.", "Indented para two."]


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file") as e:
        read_document(tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value)


def test_directory(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(InputError, match="directory"):
        read_document(tmp_path / "dir.txt")


def test_unsupported_extension_lists_supported(tmp_path):
    with pytest.raises(InputError, match=r"book\.pdf.*unsupported.*\.txt.*\.md") as e:
        read_document(write(tmp_path, "book.pdf", b"%PDF"))
    assert "\n" not in str(e.value)


def test_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path, "secret.txt", b"text")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(InputError, match=r"secret\.txt.*permission denied"):
        read_document(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b" \n\r\n\t  \n", "only whitespace"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00text", "binary"),
        (bytes(range(1, 32)) * 50, "binary"),
        ("text \x00 with a NUL".encode(), "binary"),
    ],
    ids=["empty", "whitespace", "zip", "controls", "nul"],
)
def test_bad_content(tmp_path, data, message):
    with pytest.raises(InputError, match=message) as e:
        read_document(write(tmp_path, "in.txt", data))
    assert "in.txt" in str(e.value)


def test_markdown_with_nothing_to_say():
    with pytest.raises(InputError, match=r"x\.md.*no text"):
        read_text(b"```\ncode only\n```\n\n---\n", "x.md", fmt="md")


def test_read_text_from_stdin_bytes():
    doc = read_text(b"# Title\n\nBody.", "<stdin>", fmt="md")
    assert doc.name == "<stdin>"
    assert [c.title for c in doc.chapters] == ["Title"]
    with pytest.raises(InputError, match="format"):
        read_text(b"x", "<stdin>", fmt="pdf")

"""EPUB books (``.epub``): the spine's documents, in reading order, become chapters and paragraphs.

The container is read with EbookLib and each XHTML document with Beautiful Soup; only text is
kept, as for Markdown (readers.py):

* **Order.** The spine, in order; documents the spine marks ``linear="no"`` (pop-up notes,
  covers) are left out, and so is the navigation document.
* **Chapters.** ``<h1>`` and ``<h2>`` start a chapter (its title, also spoken, as in the other
  formats). A document with neither starts one under its title in the book's table of
  contents when it has one there, and otherwise goes on with the chapter before it (a
  chapter split over several files).
* **Paragraphs.** Each ``<p>``, list item, ``<h3>``-``<h6>``, table row, ``<blockquote>`` or
  ``<div>`` with text of its own is a paragraph; ``<br>`` is a line break inside it. Scripts,
  styles, images, ``<rt>`` (ruby readings) and note references (``epub:type="noteref"``, the
  superscript numbers that link to notes) are not spoken; nor are Project Gutenberg's header
  and license (``pg-boilerplate``), and ``Document.left_out`` says so.
* **Refused**, with one line each: a file that is not a readable EPUB, and one whose text is
  DRM-encrypted (``META-INF/encryption.xml`` naming more than fonts).
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from urllib.parse import unquote

from ..errors import InputError

__all__ = ["parse_epub"]

_HEADINGS = ("h1", "h2")
_BLOCKS = ("p", "li", "h3", "h4", "h5", "h6", "blockquote", "div", "dd", "dt", "figcaption", "pre", "section",
           "article", "main", "aside", "header", "footer", "figure", "body")
_STRUCTURE = [*_HEADINGS, *_BLOCKS, "table"]
_SILENT = ("script", "style", "head", "title", "img", "svg", "math", "rt", "rp", "nav")
# fonts may be obfuscated (IDPF and Adobe font mangling) in books without DRM; anything else
# in META-INF/encryption.xml (XML-Enc AES: Adobe ADEPT, Readium LCP) encrypts the text
_FONT_ALGORITHMS = ("http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC")


def _check_not_encrypted(data: bytes, label: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if "META-INF/encryption.xml" not in zf.namelist():
                return
            enc = zf.read("META-INF/encryption.xml").decode("utf-8", "replace")
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError):
        raise InputError(f"{label}: not a readable EPUB (not a zip archive)") from None
    if any(a not in _FONT_ALGORITHMS for a in re.findall(r'Algorithm="([^"]+)"', enc)):
        raise InputError(f"{label}: the book is DRM-protected (its text is encrypted); ttsbatch cannot read it")


def _toc_titles(toc, out: dict[str, str]) -> dict[str, str]:
    """File name (no fragment) -> the first table-of-contents title that points into it."""
    if not isinstance(toc, (list, tuple)):  # EbookLib gives a bare Link for a one-entry NCX
        toc = [toc]
    for entry in toc:
        if isinstance(entry, tuple):  # (Section, children)
            section, children = entry
            if getattr(section, "href", None):
                out.setdefault(unquote(section.href.split("#")[0]), section.title)
            _toc_titles(children, out)
        elif getattr(entry, "href", None):
            out.setdefault(unquote(entry.href.split("#")[0]), entry.title)
    return out


def _silent(tag) -> bool:
    kind = tag.get("epub:type") or tag.get("role") or ""
    return tag.name in _SILENT or "noteref" in kind or _is_boilerplate(tag)  # noteref: a note's superscript number


def _is_boilerplate(tag) -> bool:
    """Project Gutenberg's header and license, as its EPUBs mark them."""
    return "pg-boilerplate" in (tag.get("class") or ()) or tag.get("id") in ("pg-header", "pg-footer")


def _text(node) -> str:
    """The spoken text of ``node``: its strings (the source's line breaks are spaces in HTML),
    ``<br>`` as a line break, silent parts left out."""
    from bs4 import NavigableString, Tag

    parts: list[str] = []
    for child in node.children:
        if type(child) is NavigableString:  # not a comment, CDATA or declaration
            parts.append(str(child).replace("\n", " "))
        elif isinstance(child, Tag) and not _silent(child):
            parts.append("\n" if child.name == "br" else _text(child))
    return "".join(parts)


def _block(builder, text: str) -> None:
    """One paragraph (or a heading line and a paragraph), its HTML whitespace collapsed."""
    builder.block([" ".join(line.split()) for line in text.split("\n")])


def _walk(node, builder, state: dict) -> None:
    """Feed ``node``'s headings and paragraphs to ``builder`` in document order; text between
    blocks (``<div>Loose <p>Para</p></div>``) is a paragraph of its own, in its place.

    A heading right under another in the same document, nothing between them, is the first's
    subtitle (``<h2>Chapter 1</h2><h2>The Storm</h2>`` is "Chapter 1: The Storm"), not a
    chapter of nothing; ``state["after"]`` is the chapter's paragraphs as the last heading left them.
    """
    from bs4 import NavigableString, Tag

    inline: list[str] = []

    def flush() -> None:
        if inline:
            _block(builder, "".join(inline))
            inline.clear()

    for child in node.children:
        if type(child) is NavigableString:
            inline.append(str(child).replace("\n", " "))
        elif not isinstance(child, Tag) or _silent(child):
            continue
        elif child.name == "br":
            inline.append("\n")
        elif child.name in _HEADINGS:
            flush()
            text, paras = " ".join(_text(child).split()), builder.chapters[-1][1]
            after = state.get("after")
            if text and after is not None and after[0] is paras and after[1] == len(paras):
                builder.subtitle(text)
            else:
                builder.heading(text)
            state["after"] = (builder.chapters[-1][1], len(builder.chapters[-1][1]))
        elif child.name == "table":
            flush()
            for row in child.find_all("tr"):
                cells = [" ".join(_text(c).split()) for c in row.find_all(("td", "th"))]
                builder.paragraph(", ".join(c for c in cells if c))
        elif child.find(_STRUCTURE):
            flush()
            _walk(child, builder, state)
        elif child.name in _BLOCKS or child.name == "tr":
            flush()
            _block(builder, _text(child))
        else:  # span, a, em, ...
            inline.append(_text(child))
    flush()


def parse_epub(data: bytes, label: str, builder) -> None:
    """Feed the EPUB ``data``'s text to ``builder`` (readers.py's), in reading order, and the
    book's title (``dc:title``), authors (``dc:creator``, joined with " and ") and what was
    left out."""
    _check_not_encrypted(data, label)
    import ebooklib
    from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning
    from ebooklib import epub

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EbookLib's FutureWarnings about its own options
            book = epub.read_epub(io.BytesIO(data), {"ignore_ncx": False})
    except Exception as e:  # EbookLib raises KeyError, EpubException, lxml errors ... for a bad file
        raise InputError(f"{label}: not a readable EPUB ({type(e).__name__}: {e})") from None
    titles = _toc_titles(book.toc, {})
    boilerplate = 0
    for idref, linear in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or str(linear).lower() == "no":
            continue
        if isinstance(item, epub.EpubNav) or "nav" in (getattr(item, "properties", None) or []):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
            soup = BeautifulSoup(item.get_content(), "html.parser")
        body = soup.body or soup
        title = titles.get(item.get_name())
        boilerplate += len(body.find_all(_is_boilerplate))
        if title and not body.find(list(_HEADINGS)):
            builder.heading(title)
        _walk(body, builder, {})
    def meta(name: str) -> list[str]:
        values = [" ".join(str(v[0]).split()) for v in book.get_metadata("DC", name) if v and v[0]]
        return [v for v in values if v]

    titles, authors = meta("title"), meta("creator")
    builder.title = titles[0] if titles else None
    builder.author = " and ".join(dict.fromkeys(authors)) or None
    builder.left_out = ("Project Gutenberg's header and license",) if boilerplate else ()


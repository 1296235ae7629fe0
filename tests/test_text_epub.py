"""EPUB books: reading order, chapters, what is and is not spoken, and files that cannot be read.

The books are written by EbookLib itself (the real container format: a zip with its OPF
package, NCX and navigation document), so what is tested is what a reader meets.
"""

from __future__ import annotations

import zipfile

import pytest

from ttsbatch.errors import InputError
from ttsbatch.text.readers import read_document, read_text


def make_epub(path, docs, toc=(), spine=None, authors=()):
    """An EPUB at ``path`` with ``docs`` ((file name, body XHTML)), ``toc`` ((file, title)) and ``authors``."""
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("test-book")
    book.set_title("Test Book")
    book.set_language("en")
    for i, name in enumerate(authors):
        book.add_author(name, uid=f"a{i}")
    items = {}
    for name, body in docs:
        item = epub.EpubHtml(title=name, file_name=name, content=f"<html><body>{body}</body></html>")
        book.add_item(item)
        items[name] = item
    book.toc = [epub.Link(href, title, f"t{i}") for i, (href, title) in enumerate(toc)]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *(spine(items) if spine else items.values())]
    epub.write_epub(str(path), book)
    return path


def chapters(doc):
    return [(c.title, list(c.paragraphs)) for c in doc.chapters]


def test_chapters_and_paragraphs_in_reading_order(tmp_path):
    path = make_epub(tmp_path / "b.epub", [
        ("cover.xhtml", '<img src="cover.png"/>'),
        ("ch1.xhtml", """<h1>Chapter One</h1>
            <p>It was a dark<sup><a epub:type="noteref" href="#n1">1</a></sup> and stormy
            night.</p>
            <div>Loose text <p>Inner para.</p> tail</div>
            <table><tr><th>Name</th><th>Age</th></tr><tr><td>Ann</td><td>30</td></tr></table>
            <script>var x = 1;</script><style>p {}</style>
            <p>Ruby <ruby>漢<rt>kan</rt></ruby> and <!-- a comment --> more.</p>"""),
        ("ch2.xhtml", "<p>No heading here.</p><p>Still part two.</p>"),
        ("ch2b.xhtml", "<p>Continued.</p>"),
        ("ch3.xhtml", "<section><h2>Three</h2><ul><li>item one</li><li>item two</li></ul></section>"),
    ], toc=[("ch1.xhtml", "The First"), ("ch2.xhtml#top", "Second Part"), ("ch3.xhtml", "Third")])
    doc = read_document(path)
    assert chapters(doc) == [
        # the heading in the text, not the table of contents' title, names a chapter that has one
        ("Chapter One", ["Chapter One", "It was a dark and stormy night.", "Loose text", "Inner para.", "tail",
                         "Name, Age", "Ann, 30", "Ruby 漢 and more."]),
        # no heading: its title in the table of contents; the next file goes on with it
        ("Second Part", ["Second Part", "No heading here.", "Still part two.", "Continued."]),
        ("Three", ["Three", "item one", "item two"]),
    ]
    # the navigation document (the table of contents) and the cover are not read
    assert "Test Book" not in str(chapters(doc)) and doc.name == "b.epub"
    assert doc.title == "Test Book" and doc.display_title == "Test Book"  # its dc:title, for the output's tag


def test_a_heading_in_a_paragraph_and_line_breaks(tmp_path):
    # books that mark chapters with styled paragraphs, not <h1>, are chaptered as plain text is
    path = make_epub(tmp_path / "b.epub", [
        ("a.xhtml", '<p class="chapter">CHAPTER I.</p><p>First.</p><p>A poem<br/>in two lines.</p>'),
        ("b.xhtml", '<p class="chapter">CHAPTER II.</p><p>Second.</p>'),
    ])
    assert chapters(read_document(path)) == [
        ("CHAPTER I.", ["CHAPTER I.", "First.", "A poem in two lines."]),
        ("CHAPTER II.", ["CHAPTER II.", "Second."]),
    ]


def test_a_heading_right_under_another_is_its_subtitle(tmp_path):
    # a title page made two chapters of nothing: "Oz" and "by L. Frank Baum"
    path = make_epub(tmp_path / "b.epub", [
        ("title.xhtml", "<h1>Oz</h1><h2>by L. Frank Baum</h2>"),
        ("c1.xhtml", "<section><h2>Chapter 1</h2><div><h2>The Cyclone</h2></div><p>Dorothy lived.</p><h2>A Break</h2><p>More.</p></section>"),
        ("part.xhtml", "<h1>Part Two</h1>"),
        ("c2.xhtml", "<h1>Chapter 2</h1><p>Text.</p>"),
    ])
    assert chapters(read_document(path)) == [
        ("Oz: by L. Frank Baum", ["Oz", "by L. Frank Baum"]),
        ("Chapter 1: The Cyclone", ["Chapter 1", "The Cyclone", "Dorothy lived."]),
        ("A Break", ["A Break", "More."]),  # a heading after text starts a chapter
        ("Part Two", ["Part Two"]),  # a heading in a document of its own stays a chapter
        ("Chapter 2", ["Chapter 2", "Text."]),
    ]


def test_documents_off_the_reading_order_are_left_out(tmp_path):
    path = make_epub(tmp_path / "b.epub", [("a.xhtml", "<h1>One</h1><p>Text.</p>"), ("note.xhtml", "<p>A pop-up note.</p>")],
                     spine=lambda items: [items["a.xhtml"], (items["note.xhtml"].id, "no")])
    assert chapters(read_document(path)) == [("One", ["One", "Text."])]


def test_project_gutenberg_boilerplate_is_left_out_and_said(tmp_path):
    path = make_epub(tmp_path / "pg.epub", [
        ("a.xhtml", '<section class="pg-boilerplate pgheader" id="pg-header"><p>The Project Gutenberg eBook of X</p></section>'
                    "<h1>One</h1><p>The story.</p>"),
        ("z.xhtml", '<section class="pg-boilerplate" id="pg-footer"><h2>THE FULL PROJECT GUTENBERG LICENSE</h2><p>Terms.</p></section>'),
    ])
    doc = read_document(path)
    assert chapters(doc) == [("One", ["One", "The story."])]
    assert doc.left_out == ("Project Gutenberg's header and license",)


def _with_encryption(path, algorithm):
    xml = ('<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" xmlns:enc="http://www.w3.org/2001/04/xmlenc#">'
           f'<enc:EncryptedData><enc:EncryptionMethod Algorithm="{algorithm}"/></enc:EncryptedData></encryption>')
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("META-INF/encryption.xml", xml)
    return path


def test_drm_is_refused_in_one_line_and_font_obfuscation_is_not_drm(tmp_path):
    docs = [("a.xhtml", "<h1>One</h1><p>Text.</p>")]
    drm = _with_encryption(make_epub(tmp_path / "drm.epub", docs), "http://www.w3.org/2001/04/xmlenc#aes128-cbc")
    with pytest.raises(InputError, match=r"drm\.epub: the book is DRM-protected \(its text is encrypted\)"):
        read_document(drm)
    fonts = _with_encryption(make_epub(tmp_path / "fonts.epub", docs), "http://www.idpf.org/2008/embedding")
    assert chapters(read_document(fonts)) == [("One", ["One", "Text."])]


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04", "zip without a package"], ids=["text", "torn", "no-opf"])
def test_unreadable_files_are_one_input_error(tmp_path, content):
    path = tmp_path / "bad.epub"
    if isinstance(content, str):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("mimetype", "application/epub+zip")
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.epub: not a readable EPUB") as e:
        read_document(path)
    assert "\n" not in str(e.value)


def test_the_books_title_and_authors_from_its_metadata(tmp_path):
    path = make_epub(tmp_path / "b.epub", [("a.xhtml", "<p>Text.</p>")], authors=["L. Frank Baum", "W. W. Denslow"])
    doc = read_document(path)
    assert (doc.title, doc.author) == ("Test Book", "L. Frank Baum and W. W. Denslow")
    assert read_document(make_epub(tmp_path / "c.epub", [("a.xhtml", "<p>Text.</p>")])).author is None


def test_an_epub_from_standard_input(tmp_path):
    data = make_epub(tmp_path / "b.epub", [("a.xhtml", "<h1>One</h1><p>Text.</p>")]).read_bytes()
    assert chapters(read_text(data, "stdin", "epub")) == [("One", ["One", "Text."])]

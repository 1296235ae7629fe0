"""Sentence splitting and chunking: nothing dropped or reordered, nothing over max_chars."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

from ttsbatch.config import TextOptions
from ttsbatch.errors import InputError
from ttsbatch.text import sentences
from ttsbatch.text.chunking import (
    CHARS_PER_SECOND,
    chunk_document,
    chunk_document_report,
    estimate_seconds,
)
from ttsbatch.text.document import Chapter, Chunk, Document
from ttsbatch.text.normalize import normalize_text
from ttsbatch.text.readers import read_document, read_text
from ttsbatch.text.sentences import split_sentences, train_punkt

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
OPTS = TextOptions()


def doc_of(*chapters: list[str]) -> Document:
    return Document("test", tuple(Chapter(f"C{i}" if i else None, tuple(ps)) for i, ps in enumerate(chapters)))


def all_paragraphs(doc: Document) -> list[str]:
    return [p for ch in doc.chapters for p in ch.paragraphs]


def check_invariants(doc: Document, chunks: list[Chunk], opts: TextOptions, skipped: int = 0, words: bool = True) -> None:
    """The chunker's contract, checked as a whole."""
    paras = all_paragraphs(doc)
    if skipped == 0:
        # every character of the document comes out exactly once, in order
        assert "".join("".join(p.split()) for p in paras) == "".join("".join(c.source.split()) for c in chunks)
        if words:  # and no word is cut (documents without a word longer than max_chars)
            assert [w for p in paras for w in p.split()] == [w for c in chunks for w in c.source.split()]
    pos: dict[int, int] = {}
    for i, c in enumerate(chunks):
        assert c.index == i
        assert 0 < len(c.text) <= opts.max_chars
        assert c.text == c.text.strip() and "  " not in c.text
        assert c.text == normalize_text(c.source, opts)
        para = paras[c.paragraph]
        assert para in doc.chapters[c.chapter].paragraphs
        # source is a span of its own paragraph, after the previous chunk's span; whatever
        # lies between them (skipped pieces) has nothing to say
        start = para.find(c.source, pos.get(c.paragraph, 0))
        assert start >= 0
        assert normalize_text(para[pos.get(c.paragraph, 0) : start], opts) == ""
        pos[c.paragraph] = start + len(c.source)
        # boundary says what follows
        nxt = chunks[i + 1] if i + 1 < len(chunks) else None
        expected = (
            "end" if nxt is None
            else "chapter" if nxt.chapter != c.chapter
            else "paragraph" if nxt.paragraph != c.paragraph
            else "sentence"
        )
        assert c.boundary == expected
    for k, para in enumerate(paras):  # nothing speakable after the last chunk of a paragraph
        assert normalize_text(para[pos.get(k, 0) :], opts) == ""


# ---------------------------------------------------------------------------- sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Mr. Smith went to Washington. He met Dr. No there.", ["Mr. Smith went to Washington.", "He met Dr. No there."]),
        ("Use e.g. this one. Or i.e. that.", ["Use e.g. this one.", "Or i.e. that."]),
        ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
        ("The U.S.A. is big. We went there.", ["The U.S.A. is big.", "We went there."]),
        ("I waited… Then he came. I think… maybe not.", ["I waited…", "Then he came.", "I think… maybe not."]),
        ("I waited... Then he came.", ["I waited...", "Then he came."]),
        ('"Hello," she said. "Bye."', ['"Hello," she said.', '"Bye."']),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("See No. 5 and p. 12 in Vol. 3. Done!", ["See No. 5 and p. 12 in Vol. 3.", "Done!"]),
        ("Dr. No. Mrs. Robinson. Prof. X was there.", ["Dr. No.", "Mrs. Robinson.", "Prof. X was there."]),
        ("What? Really! Yes.", ["What?", "Really!", "Yes."]),
        ("no punctuation at all", ["no punctuation at all"]),
        ("She said no. Then left.", ["She said no.", "Then left."]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text, OPTS) == expected


def test_split_never_drops_or_reorders():
    text = 'A. B? C! "D." (E.) F… g... H. 3.14 Mr. I. J.K. Rowling. ' * 20 + "x" * 3000
    parts = split_sentences(text, OPTS)
    assert "".join("".join(p.split()) for p in parts) == "".join(text.split())
    assert all(p == p.strip() and p for p in parts)


def test_trained_tokenizer_and_parameters_are_reused():
    tok = train_punkt("Some text. More text here. Mr. Smith came.", "english")
    assert split_sentences("Mr. Smith came. He sat.", OPTS, tok) == ["Mr. Smith came.", "He sat."]
    assert split_sentences("Mr. Smith came. He sat.", OPTS, tok._params) == ["Mr. Smith came.", "He sat."]


def test_works_without_punkt_data(monkeypatch, tmp_path):
    """No punkt_tab installed anywhere (as here): trained on the document, nothing downloaded."""
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(sentences, "_nltk_data_dirs", lambda: [str(tmp_path)])
    sentences._pretrained.cache_clear()
    try:
        assert sentences._pretrained("english") is None
        assert split_sentences("Dr. Who arrived. He left.", OPTS) == ["Dr. Who arrived.", "He left."]
    finally:
        sentences._pretrained.cache_clear()


def test_pretrained_parameters_are_added_when_installed(monkeypatch):
    pretrained = sentences._punkt().PunktParameters()
    pretrained.abbrev_types.add("zork")
    monkeypatch.setattr(sentences, "_pretrained", lambda language: pretrained)
    tok = train_punkt("Nothing much here.", "english")
    assert "zork" in tok._params.abbrev_types and "mr" in tok._params.abbrev_types
    assert split_sentences("See zork. Today please.", OPTS, tok) == ["See zork. Today please."]
    monkeypatch.setattr(sentences, "_pretrained", lambda language: None)
    tok = train_punkt("Nothing much here.", "english")
    assert split_sentences("See zork. Today please.", OPTS, tok) == ["See zork.", "Today please."]


def test_splitting_does_not_import_all_of_nltk():
    """Punkt is loaded privately: nltk's package init (scipy, sklearn: ~5 s) is not run."""
    if "nltk" in sys.modules:
        pytest.skip("nltk was imported by something else in this session")
    assert split_sentences("One. Two.", OPTS) == ["One.", "Two."]
    assert "nltk" not in sys.modules and "nltk.tokenize.punkt" not in sys.modules


# ---------------------------------------------------------------------------- chunking


def test_merging_and_boundaries():
    doc = doc_of(["Hi. Yes. No.", "A second paragraph."], ["Chapter text here."])
    chunks = chunk_document(doc, OPTS)
    assert [(c.text, c.source, c.chapter, c.paragraph, c.boundary) for c in chunks] == [
        ("Hi. Yes. No.", "Hi. Yes. No.", 0, 0, "paragraph"),
        ("A second paragraph.", "A second paragraph.", 0, 1, "chapter"),
        ("Chapter text here.", "Chapter text here.", 1, 2, "end"),
    ]


def test_no_merging_with_merge_chars_zero():
    doc = doc_of(["Hi. Yes. No."])
    chunks = chunk_document(doc, TextOptions(merge_chars=0))
    assert [(c.text, c.boundary) for c in chunks] == [("Hi.", "sentence"), ("Yes.", "sentence"), ("No.", "end")]


def test_merge_stops_at_merge_chars_and_max_chars():
    sents = [f"We walked to the market and we bought some {w}." for w in ("pears", "plums", "limes", "figs", "kiwis")]
    assert [len(x) for x in sents] == [49, 49, 49, 48, 49]
    opts = TextOptions(max_chars=120, merge_chars=90)
    chunks = chunk_document(doc_of([" ".join(sents)]), opts)
    # 49 -> 99 (49 < 90 and the merge fits 120) -> stop (99 >= 90); then 48 + 1 + 49 = 98; then 49
    assert [len(c.text) for c in chunks] == [99, 98, 49]
    opts = TextOptions(max_chars=120, merge_chars=120)
    # 99 < 120 but merging a third sentence would exceed max_chars
    assert [len(c.text) for c in chunk_document(doc_of([" ".join(sents)]), opts)] == [99, 98, 49]


def test_chunks_never_span_paragraphs():
    doc = doc_of(["Short.", "Tiny.", "Also short."])
    assert [c.source for c in chunk_document(doc, OPTS)] == ["Short.", "Tiny.", "Also short."]


def test_long_sentence_splits_at_clauses_then_words():
    clause = "the rain kept falling on the roofs of the old town"
    text = "; ".join([clause] * 12) + "."
    chunks = chunk_document(doc_of([text]), OPTS)
    check_invariants(doc_of([text]), chunks, OPTS)
    assert len(chunks) > 1
    assert all(c.source.endswith(";") for c in chunks[:-1])
    words = " ".join(["word"] * 400)
    chunks = chunk_document(doc_of([words]), OPTS)
    check_invariants(doc_of([words]), chunks, OPTS)
    assert all(c.source.split() == ["word"] * len(c.source.split()) for c in chunks)


def test_word_longer_than_max_chars_is_cut_hard():
    doc = doc_of(["x" * 1000])
    chunks = chunk_document(doc, OPTS)
    check_invariants(doc, chunks, OPTS, words=False)
    assert all(len(c.text) == OPTS.max_chars for c in chunks[:-1])  # "Xxx...x." is exactly full


def test_normalization_that_lengthens_is_resplit():
    # each "ﬃ" is one character of source and three ("ffi") of text; "&" becomes " and "
    for para in ["ﬃ" * 1000, "a & " * 300 + "end.", "wait… " * 200]:
        for opts in (OPTS, TextOptions(normalize_punctuation=False, ascii_fold=False), TextOptions(max_chars=20, merge_chars=5)):
            doc = doc_of([para])
            chunks = chunk_document(doc, opts)
            check_invariants(doc, chunks, opts, words=False)


def test_unspeakable_pieces_are_dropped_and_counted():
    doc = doc_of(["Real text.", "😀🎉", "* * *"], ["Hello 😀. 🎉", "✓"])
    chunks, skipped = chunk_document_report(doc, OPTS)
    assert skipped == 3
    check_invariants(doc, chunks, OPTS, skipped=skipped)
    assert [(c.text, c.source, c.paragraph, c.boundary) for c in chunks] == [
        ("Real text.", "Real text.", 0, "chapter"),  # its chapter's last speakable chunk
        ("Hello.", "Hello 😀. 🎉", 3, "end"),  # the emoji merged into a speakable neighbour
    ]


def test_options_are_checked():
    with pytest.raises(InputError, match="max_chars"):
        chunk_document(doc_of(["x"]), TextOptions(max_chars=5))
    with pytest.raises(InputError, match="merge_chars"):
        chunk_document(doc_of(["x"]), TextOptions(merge_chars=-1))


def test_estimate_seconds():
    chunks = chunk_document(doc_of(["a" * 29 + ".", "b" * 14]), OPTS)
    assert estimate_seconds(chunks) == pytest.approx(45 / CHARS_PER_SECOND)
    assert estimate_seconds([]) == 0


# ---------------------------------------------------------------------------- the key property

EDGE_PARAGRAPHS = [
    "no punctuation at all just words flowing on and on " * 30,
    ("This sentence goes on and on, with commas; and clauses — and dashes - and more words " * 60)[:5000] + ".",
    '"Hello," she said. "Bye." He said "Stop." Then he left. \'Single,\' he replied.',
    "I waited… Then he came. Wait... What? It was 3.14 exactly, and 1,000.5 more.",
    "Dr. No met Mr. Smith, e.g. at No. 5 in the U.S.A. on Jan. 3 at 5 p.m. i.e. late. St. Paul etc. were there.",
    "Short. Very. Tiny. Sentences. Here. Ok.",
    "Café “naïve” ﬁne — ½ & 50% of $5. Ünïcödé everywhere!",
    "A line with\ttabs and  double  spaces.",
]


def test_every_word_once_in_order_on_edge_cases():
    doc = doc_of(EDGE_PARAGRAPHS[:4], EDGE_PARAGRAPHS[4:])
    for opts in (OPTS, TextOptions(max_chars=40, merge_chars=20), TextOptions(ascii_fold=False, normalize_punctuation=False)):
        chunks, skipped = chunk_document_report(doc, opts)
        assert skipped == 0
        check_invariants(doc, chunks, opts)


def test_every_character_once_with_a_giant_word():
    doc = doc_of(EDGE_PARAGRAPHS[:2] + ["w" * 20000] + EDGE_PARAGRAPHS[2:])
    chunks = chunk_document(doc, OPTS)
    check_invariants(doc, chunks, OPTS, words=False)
    # only the giant word is cut: words elsewhere stay whole
    giant = [c for c in chunks if c.paragraph == 2]
    assert "".join(c.source for c in giant) == "w" * 20000


def test_property_through_the_reader():
    raw = "\n\n".join(["CHAPTER I.", *EDGE_PARAGRAPHS[:3], "Chapter 2: More", *EDGE_PARAGRAPHS[3:]])
    doc = read_text(raw.encode("utf-8"), "edge.txt")
    assert [c.title for c in doc.chapters] == ["CHAPTER I.", "Chapter 2: More"]
    chunks = chunk_document(doc, OPTS)
    check_invariants(doc, chunks, OPTS)
    assert chunks[0].source == "CHAPTER I." and chunks[-1].boundary == "end"


SAMPLE_FILES = sorted(SAMPLES.glob("*.txt"))


@pytest.mark.parametrize("path", SAMPLE_FILES or [None], ids=[p.name for p in SAMPLE_FILES] or ["no-samples"])
def test_property_on_samples(path):
    if path is None:
        pytest.skip("no samples/*.txt yet")
    doc = read_document(path)
    chunks, skipped = chunk_document_report(doc, OPTS)
    assert chunks
    check_invariants(doc, chunks, OPTS, skipped=skipped)


def _random_document(rng: random.Random, n_paragraphs: int) -> Document:
    vocab = (
        "the a of and to in he she it was said Mr. Mrs. Dr. No. St. e.g. i.e. U.S. etc. 3.14 1,000 42 "
        "café naïve “quoted” ‘single’ — – - ... … ; : , ! ? ( ) & % $5 😀 ﬁne straße"
    ).split()
    chapters, paras = [], []
    for _ in range(n_paragraphs):
        n = rng.choice([1, 3, 10, 40, 120, 250])
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.01:
                words.append("z" * rng.randint(50, 700))  # sometimes longer than max_chars
            elif r < 0.12:
                words.append(rng.choice(vocab) + rng.choice([".", "!", "?", ",", '."', ""]))
            else:
                words.append(rng.choice(vocab) if rng.random() < 0.3 else "".join(rng.choices("abcdefghijklmnop", k=rng.randint(1, 9))))
        paras.append(rng.choice([" ", " ", "  ", "\t"]).join(words))
        if rng.random() < 0.05:
            chapters.append(paras)
            paras = []
    chapters.append(paras)
    return Document("random", tuple(Chapter(f"c{i}", tuple(ps)) for i, ps in enumerate(chapters) if ps))


@pytest.mark.parametrize(
    "seed, opts",
    [(0, OPTS), (1, TextOptions(max_chars=60, merge_chars=30)), (2, TextOptions(ascii_fold=False, normalize_punctuation=False))],
    ids=["default", "small", "no-fold"],
)
def test_property_on_random_text(seed, opts):
    doc = _random_document(random.Random(seed), 300)
    chunks, skipped = chunk_document_report(doc, opts)
    check_invariants(doc, chunks, opts, skipped=skipped, words=False)
    assert len(chunks) > 300


def test_not_quadratic_on_huge_inputs():
    huge_line = "y" * 1_000_000
    long_sentence = ("and then it went on, " * 250)[:5000]
    no_punct = "word " * 200_000
    doc = doc_of([huge_line, long_sentence, no_punct])
    start = time.perf_counter()
    chunks = chunk_document(doc, OPTS)
    elapsed = time.perf_counter() - start
    check_invariants(doc, chunks, OPTS, words=False)
    assert elapsed < 15, f"{elapsed:.1f}s: chunking looks quadratic"  # ~1 s here; quadratic would be minutes

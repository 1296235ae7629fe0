"""Chunking: a Document becomes the pieces of text the model speaks in one go.

Per paragraph (chunks never span paragraphs):

1. Split into sentences with Punkt, trained once per document (``sentences.py``).
2. A sentence whose *normalized* text is longer than ``max_chars`` is cut at the last
   clause boundary (after ``;`` ``:`` ``,`` ``—``, or after a spaced `` - `` / `` – ``)
   that leaves a piece of at least a third of the limit; failing that, at the last
   space; failing that (one "word" longer than the limit), hard at the limit. A piece is
   measured after normalization and cut shorter if normalization made it too long.
3. Consecutive pieces are merged while the chunk so far is shorter than ``merge_chars``
   and the merged chunk, normalized, stays within ``max_chars``. Unspeakable pieces
   (nothing left after normalization, e.g. an emoji) are merged into a neighbour when
   they fit.

Every step is linear in the length of the text, so a 1 MB book, a 5,000-character
sentence or a 1 MB line without spaces chunk in about a second.

``Chunk.source`` is the exact span of the paragraph (before normalization) and
``Chunk.text`` its normalized form, never longer than ``max_chars``. Chunks whose
normalized text is empty are dropped; ``chunk_document_report`` says how many.
``Chunk.boundary`` tells what follows a chunk: ``"sentence"`` (more of the same
paragraph), ``"paragraph"``, ``"chapter"`` (the chapter's last chunk) or ``"end"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..config import TextOptions
from ..errors import InputError
from .document import Chunk, Document
from .normalize import normalize_text
from .sentences import sentence_spans, train_punkt

__all__ = ["chunk_document", "chunk_document_report", "estimate_seconds", "CHARS_PER_SECOND", "MIN_MAX_CHARS"]

# Speaking rate used by --dry-run estimates: about 15 characters of text per second of
# speech (~150 words a minute), roughly what Chatterbox produces at default settings.
CHARS_PER_SECOND = 15.0

# No character normalizes to more than 19 characters (NFKC of U+FDFA is 18, punc_norm
# adds a full stop), so from 20 on every chunk can be made to fit.
MIN_MAX_CHARS = 20
# A merged chunk never covers more source than this many times max_chars (a run of
# unspeakable pieces would otherwise make merging quadratic).
_MERGE_SOURCE_FACTOR = 4

_CLAUSE_RE = re.compile(r"(?:[;:,—]|\s[-–])[\"'”’)\]]*(?=\s)|—")
_SPACES = " \t\n\u00a0\u2009\u3000"  # what may separate words inside a paragraph
_Piece = tuple[int, int, str, bool]  # start, end (in the paragraph), normalized text, mergeable


def _check(opts: TextOptions) -> None:
    if opts.max_chars < MIN_MAX_CHARS:
        raise InputError(f"text option max_chars must be at least {MIN_MAX_CHARS}, got {opts.max_chars}")
    if opts.merge_chars < 0:
        raise InputError(f"text option merge_chars must not be negative, got {opts.merge_chars}")


def _find_cut(para: str, start: int, limit: int) -> int:
    """Where to end a piece that starts at ``start`` and may not pass ``limit``."""
    min_len = (limit - start) // 3
    best = -1
    for m in _CLAUSE_RE.finditer(para, start, limit):
        if m.end() - start >= max(min_len, 1):
            best = m.end()
    if best > start:
        return best
    # The last space; para[limit] itself may be one.
    i = max(para.rfind(c, start + 1, limit + 1) for c in _SPACES)
    if i > start:
        while para[i - 1].isspace():  # the first space of a run; para[start] is not one
            i -= 1
        return i
    return limit


def _strip_end(para: str, start: int, end: int) -> int:
    while end > start and para[end - 1].isspace():
        end -= 1
    return end


def _fit(para: str, start: int, end: int, opts: TextOptions) -> list[_Piece]:
    """Pieces of the sentence ``para[start:end]``, each normalizing to at most max_chars."""
    max_chars = opts.max_chars
    text = normalize_text(para[start:end], opts)
    if len(text) <= max_chars:
        return [(start, end, text, True)]
    pieces: list[_Piece] = []
    p = start
    while p < end:
        while p < end and para[p].isspace():
            p += 1
        if p >= end:
            break
        budget = max_chars
        while True:
            cut = end if end - p <= budget else _find_cut(para, p, p + budget)
            piece_end = _strip_end(para, p, cut)
            text = normalize_text(para[p:piece_end], opts)
            if len(text) <= max_chars:
                pieces.append((p, piece_end, text, True))
                break
            if piece_end - p <= 1:  # one character that normalizes too long: cut its text
                for k in range(0, len(text), max_chars):
                    pieces.append((p, piece_end if k == 0 else p, text[k : k + max_chars], False))
                break
            budget = max(1, min(piece_end - p - 1, (piece_end - p) * max_chars // len(text)))
        p = cut
    return pieces


def _merge(para: str, pieces: Sequence[_Piece], opts: TextOptions) -> list[_Piece]:
    out: list[_Piece] = []
    cur: _Piece | None = None
    cap = _MERGE_SOURCE_FACTOR * opts.max_chars
    for piece in pieces:
        if cur is not None and cur[3] and piece[3] and piece[1] - cur[0] <= cap:
            if len(cur[2]) < opts.merge_chars or not cur[2] or not piece[2]:
                text = normalize_text(para[cur[0] : piece[1]], opts)
                if len(text) <= opts.max_chars:
                    cur = (cur[0], piece[1], text, True)
                    continue
        if cur is not None:
            out.append(cur)
        cur = piece
    if cur is not None:
        out.append(cur)
    return out


def chunk_paragraph(para: str, tokenizer, opts: TextOptions) -> list[_Piece]:
    """``(start, end, normalized text, mergeable)`` of each chunk of one paragraph, empty ones included."""
    pieces: list[_Piece] = []
    for s, e in sentence_spans(para, tokenizer, opts.language):
        pieces.extend(_fit(para, s, e, opts))
    return _merge(para, pieces, opts)


def chunk_document_report(doc: Document, opts: TextOptions) -> tuple[list[Chunk], int]:
    """The chunks of ``doc``, and how many unspeakable pieces (empty once normalized) were skipped."""
    _check(opts)
    tokenizer = train_punkt("\n\n".join(p for ch in doc.chapters for p in ch.paragraphs), opts.language)
    kept: list[tuple[int, int, str, str]] = []  # chapter, paragraph, source, text
    skipped = 0
    paragraph = 0
    for ci, chapter in enumerate(doc.chapters):
        for para in chapter.paragraphs:
            for s, e, text, _ in chunk_paragraph(para, tokenizer, opts):
                if text:
                    kept.append((ci, paragraph, para[s:e], text))
                else:
                    skipped += 1
            paragraph += 1
    chunks = []
    for i, (ci, pi, source, text) in enumerate(kept):
        if i + 1 == len(kept):
            boundary = "end"
        elif kept[i + 1][0] != ci:
            boundary = "chapter"
        elif kept[i + 1][1] != pi:
            boundary = "paragraph"
        else:
            boundary = "sentence"
        chunks.append(Chunk(index=i, text=text, source=source, chapter=ci, paragraph=pi, boundary=boundary))
    return chunks, skipped


def chunk_document(doc: Document, opts: TextOptions) -> list[Chunk]:
    """The chunks of ``doc`` in order (see the module doc); unspeakable pieces are left out."""
    return chunk_document_report(doc, opts)[0]


def estimate_seconds(chunks: Sequence[Chunk]) -> float:
    """Rough spoken length of ``chunks`` in seconds, at ``CHARS_PER_SECOND``."""
    return sum(len(c.text) for c in chunks) / CHARS_PER_SECOND

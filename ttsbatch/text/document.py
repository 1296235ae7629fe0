"""The shapes text takes on its way to the model. No torch on this side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Boundary = Literal["sentence", "paragraph", "chapter", "end"]


@dataclass(frozen=True)
class Chapter:
    """A chapter: its heading (also spoken, as the first paragraph or two) and its paragraphs."""

    # heading as written ("Chapter I" over "The Cyclone" is "Chapter I: The Cyclone"), None
    # for text before the first heading
    title: str | None
    paragraphs: tuple[str, ...]  # plain text, one paragraph per item, hard wraps joined


@dataclass(frozen=True)
class Document:
    """A whole book or article, read from a file."""

    name: str  # file name, for logs
    chapters: tuple[Chapter, ...]
    left_out: tuple[str, ...] = ()  # what the reader did not take as text, one line each (plan and log)
    title: str | None = None  # the book's own title (EPUB metadata, Markdown front matter), if it has one
    author: str | None = None  # its author, from the same places: the output's artist tag

    @property
    def display_title(self) -> str:
        """The title the output's tag gets: the book's own, else its file name."""
        return self.title or self.name


@dataclass(frozen=True)
class Chunk:
    """One piece of text that the model speaks in one go, in document order."""

    index: int  # 0-based position in the document
    text: str  # normalized text, as sent to the model
    source: str  # the same span of the document before normalization (for the no-drop check)
    chapter: int  # index of its chapter in Document.chapters
    paragraph: int  # index of its paragraph, counted across the whole document
    boundary: Boundary  # what follows it: the pause that stitching puts after it

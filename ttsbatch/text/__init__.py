"""Text side: readers, normalization, sentence splitting and chunking. Never imports torch."""

from .chunking import chunk_document, chunk_document_report, estimate_seconds
from .document import Boundary, Chapter, Chunk, Document
from .normalize import normalize_text
from .readers import read_document, read_text
from .sentences import split_sentences, train_punkt

__all__ = [
    "Boundary",
    "Chapter",
    "Chunk",
    "Document",
    "chunk_document",
    "chunk_document_report",
    "estimate_seconds",
    "normalize_text",
    "read_document",
    "read_text",
    "split_sentences",
    "train_punkt",
]

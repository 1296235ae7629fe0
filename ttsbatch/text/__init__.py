"""Text side: readers, normalization, sentence splitting and chunking. Never imports torch."""

from .document import Boundary, Chapter, Chunk, Document

__all__ = ["Boundary", "Chapter", "Chunk", "Document"]

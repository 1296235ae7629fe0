"""What to render: chunk ids, per-chunk seeds, and the missing chunks in document order.

A chunk's id is a content hash of everything that decides its audio: the text as sent to the
model, the voice, every generation parameter, the model identity and a format version. The
store is keyed by that id, so

* rerunning the same command finds every finished chunk and renders only the rest (resume);
* an edited book re-renders only the chunks whose text changed;
* identical texts (a refrain, "Chapter One" twice) are rendered once and share their audio;
* changing any parameter, the voice or the model gives new ids, so stale audio is never reused.

Each chunk's seed comes from its id, so its audio does not depend on which other chunks share
its batch or on the order the batches ran in. No torch and no numpy on this side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from .config import GenerationOptions
from .text.document import Chunk

# Bump to invalidate every stored chunk (e.g. when the engine's output changes for the same
# inputs). It is part of every id.
ID_FORMAT_VERSION = 1

ID_LENGTH = 32  # hex digits kept of the sha256 (128 bits: collisions are not a concern)


def _canonical_generation(generation: GenerationOptions) -> dict:
    """All generation fields, with float-typed fields always floats (0.8 and 1 vs 1.0 hash alike)."""
    out = {}
    for f in dataclasses.fields(generation):
        value = getattr(generation, f.name)
        if f.type in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[f.name] = value
    return out


def chunk_id(text: str, voice_id: str, generation: GenerationOptions, model_id: str) -> str:
    """Stable id of one chunk's audio: sha256 (first 32 hex digits) of a canonical JSON.

    ``text`` is the normalized text exactly as the model gets it (``Chunk.text``); it is hashed
    as is, so any change the model could hear gives a new id. The JSON has sorted keys, no
    whitespace and ASCII escapes, and floats use Python's shortest round-trip repr, so the id is
    the same in every process and Python version (``hash()`` is never used).
    """
    payload = {
        "v": ID_FORMAT_VERSION,
        "text": text,
        "voice": voice_id,
        "model": model_id,
        "generation": _canonical_generation(generation),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:ID_LENGTH]


def seed_for(chunk_id: str) -> int:
    """The chunk's random seed: its first 8 hex digits as an int (0 <= seed < 2**32).

    32 bits suit every consumer (``torch.manual_seed``, numpy's legacy ``RandomState``).
    """
    return int(chunk_id[:8], 16)


@dataclass(frozen=True)
class PlannedChunk:
    """A chunk together with what rendering it needs."""

    chunk: Chunk  # the text and its place in the document
    id: str  # content hash: the store key (see chunk_id)
    seed: int  # per-chunk seed derived from the id (see seed_for)
    budget: int  # speech-token budget: generation.token_budget(len(chunk.text))


class _HasIds(Protocol):
    def ids(self) -> set[str]: ...


def make_plan(chunks: list[Chunk], voice_id: str, generation: GenerationOptions, model_id: str) -> list[PlannedChunk]:
    """One PlannedChunk per chunk, in document order (identical texts get identical ids)."""
    plan = []
    for chunk in chunks:
        cid = chunk_id(chunk.text, voice_id, generation, model_id)
        plan.append(PlannedChunk(chunk=chunk, id=cid, seed=seed_for(cid), budget=generation.token_budget(len(chunk.text))))
    return plan


def pending(plan: list[PlannedChunk], store: _HasIds) -> list[PlannedChunk]:
    """The planned chunks still missing from ``store``, one per id, in document order.

    Document order, so chunks finish roughly in the order the track needs them and the
    book can be stitched and encoded while it is rendered (see :mod:`ttsbatch.track`).

    ``store`` is anything with ``ids() -> set[str]`` (a ChunkStore); it is listed once. Of
    several chunks with the same id, the first in document order is kept: rendering it once
    serves every position.
    """
    done = store.ids()
    seen: set[str] = set()
    todo = []
    for p in plan:
        if p.id in done or p.id in seen:
            continue
        seen.add(p.id)
        todo.append(p)
    return todo

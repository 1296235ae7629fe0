"""Chunk ids, seeds, the resume plan and batching (no model, no audio)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from ttsbatch.config import GenerationOptions
from ttsbatch.plan import PlannedChunk, chunk_id, make_plan, pending, seed_for
from ttsbatch.text.document import Chunk

GEN = GenerationOptions()
VOICE = "voice-abc"
MODEL = "ResembleAI/chatterbox@tiny"


def mk_chunks(texts: list[str]) -> list[Chunk]:
    return [Chunk(index=i, text=t, source=t, chapter=0, paragraph=i, boundary="sentence") for i, t in enumerate(texts)]


class FakeStore:
    def __init__(self, ids=()):
        self._ids = set(ids)

    def ids(self) -> set[str]:
        return set(self._ids)


def changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.125
    if isinstance(value, str):
        return value + "x"
    raise TypeError(type(value))


# -- ids ----------------------------------------------------------------------------------------


def test_id_is_stable_and_hex():
    a = chunk_id("Hello there.", VOICE, GEN, MODEL)
    assert a == chunk_id("Hello there.", VOICE, GenerationOptions(), MODEL)
    assert len(a) == 32 and all(c in "0123456789abcdef" for c in a)


def test_id_matches_known_literal():
    # Pinned on purpose: if this fails, the hashing scheme changed and every user's stored
    # chunks would silently become orphans. Change the literal only together with a deliberate
    # bump of plan.ID_FORMAT_VERSION.
    assert chunk_id("Hello there.", "default", GenerationOptions(), "ResembleAI/chatterbox") == "500ed44a04d7466819cc672568c2eff1"


def test_id_same_in_another_process():
    code = (
        "from ttsbatch.config import GenerationOptions; from ttsbatch.plan import chunk_id;"
        f"print(chunk_id('Hello there.', {VOICE!r}, GenerationOptions(), {MODEL!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == chunk_id("Hello there.", VOICE, GEN, MODEL)


def test_id_changes_with_text_voice_model():
    base = chunk_id("Hello there.", VOICE, GEN, MODEL)
    assert chunk_id("Hello there!", VOICE, GEN, MODEL) != base
    assert chunk_id("Hello there. ", VOICE, GEN, MODEL) != base
    assert chunk_id("Hello there.", VOICE + "2", GEN, MODEL) != base
    assert chunk_id("Hello there.", VOICE, GEN, MODEL + "2") != base


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GenerationOptions)])
def test_id_changes_with_every_generation_field(field):
    base = chunk_id("Hello there.", VOICE, GEN, MODEL)
    other = dataclasses.replace(GEN, **{field: changed(getattr(GEN, field))})
    assert chunk_id("Hello there.", VOICE, other, MODEL) != base


def test_id_int_and_float_spellings_agree():
    # temperature=1 (e.g. from a CLI flag) and 1.0 render the same audio
    assert chunk_id("x", VOICE, GenerationOptions(temperature=1), MODEL) == chunk_id(
        "x", VOICE, GenerationOptions(temperature=1.0), MODEL
    )


def test_id_fields_cannot_collide_by_concatenation():
    assert chunk_id("ab", "c", GEN, MODEL) != chunk_id("a", "bc", GEN, MODEL)


# -- seeds ---------------------------------------------------------------------------------------


def test_seed_deterministic_and_distinct():
    ids = [chunk_id(f"sentence {i}", VOICE, GEN, MODEL) for i in range(200)]
    seeds = [seed_for(i) for i in ids]
    assert seeds == [seed_for(i) for i in ids]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**32 for s in seeds)


# -- plan ----------------------------------------------------------------------------------------


def test_make_plan_document_order_ids_seeds_budget():
    gen = GenerationOptions(tokens_per_char=2.0, max_new_tokens=50)
    chunks = mk_chunks(["Short.", "A somewhat longer sentence here.", "Short."])
    plan = make_plan(chunks, VOICE, gen, MODEL)
    assert [p.chunk for p in plan] == chunks
    assert plan[0].id == plan[2].id != plan[1].id
    for p in plan:
        assert isinstance(p, PlannedChunk)
        assert p.id == chunk_id(p.chunk.text, VOICE, gen, MODEL)
        assert p.seed == seed_for(p.id)
        assert p.budget == gen.token_budget(len(p.chunk.text))
    assert plan[0].budget == 12 and plan[1].budget == 50  # 2 * 6 chars; capped at max_new_tokens


def test_pending_skips_stored_dedups_in_document_order():
    texts = ["bb", "a", "dddd", "bb", "ccc", "a", "eeeee"]
    plan = make_plan(mk_chunks(texts), VOICE, GEN, MODEL)
    todo = pending(plan, FakeStore({plan[4].id}))  # "ccc" is done
    assert [p.chunk.text for p in todo] == ["bb", "a", "dddd", "eeeee"]
    assert [p.chunk.index for p in todo] == [0, 1, 2, 6]  # first occurrence of a duplicate is kept
    assert len({p.id for p in todo}) == len(todo)


def test_resume_plan_ten_store_four_then_edit_one():
    texts = [f"Sentence number {i} of the book." for i in range(10)]
    plan = make_plan(mk_chunks(texts), VOICE, GEN, MODEL)
    store = FakeStore(p.id for p in plan[:4])
    todo = pending(plan, store)
    assert {p.chunk.index for p in todo} == set(range(4, 10))

    store = FakeStore(p.id for p in plan)  # everything rendered
    assert pending(plan, store) == []
    texts[7] = "Sentence number 7 of the edited book."
    plan2 = make_plan(mk_chunks(texts), VOICE, GEN, MODEL)
    assert [p.chunk.index for p in pending(plan2, store)] == [7]
    # another voice: everything is pending again
    assert len(pending(make_plan(mk_chunks(texts), "other", GEN, MODEL), store)) == 10

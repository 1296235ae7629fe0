"""Options: defaults, TOML presets, and flags over presets."""

from __future__ import annotations

import pytest

from ttsbatch.config import GenerationOptions, Options, load_options, preset_names
from ttsbatch.errors import InputError


def test_builtin_presets_exist_and_load():
    assert {"default", "audiobook", "draft"} <= set(preset_names())
    assert load_options("default") == Options()  # default.toml spells out the defaults
    book = load_options("audiobook")
    assert book.stitch.chapter_pause_ms == 3000 and book.generation.temperature == 0.7
    assert load_options("draft").generation.cfm_steps == 4


def test_flags_override_the_preset():
    o = load_options("audiobook", {"generation": {"temperature": 0.9}})
    assert o.generation.temperature == 0.9
    assert o.generation.exaggeration == 0.4  # the rest of the preset stays


def test_preset_file_path_and_int_for_float(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text("[generation]\ntemperature = 1\n[text]\nmax_chars = 200\n")
    o = load_options(str(p))
    assert o.generation.temperature == 1.0 and isinstance(o.generation.temperature, float)
    assert o.text.max_chars == 200


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[generation]\ntemprature = 0.5\n", "unknown option 'temprature'"),
        ("[nope]\nx = 1\n", "unknown section [nope]"),
        ("[generation]\ntemperature = 'hot'\n", "must be float"),
        ("[text]\nmax_chars = 1.5\n", "must be int"),
        ("[generation\n", "not valid TOML"),
    ],
)
def test_bad_presets_are_input_errors(tmp_path, toml, message):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(InputError) as e:
        load_options(str(p))
    assert message in str(e.value) and "bad.toml" in str(e.value)  # every message names the file


def test_unknown_preset_name_lists_the_choices():
    with pytest.raises(InputError, match="audiobook"):
        load_options("nope")


def test_token_budget():
    assert GenerationOptions().token_budget(100) == 1000
    g = GenerationOptions(tokens_per_char=0.5, max_new_tokens=40)
    assert g.token_budget(10) == 5 and g.token_budget(1000) == 40 and g.token_budget(0) == 1

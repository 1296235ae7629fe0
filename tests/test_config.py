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
        # values that used to pass here and fail after synthesis (ffmpeg, the stitcher) or never
        ("[export]\nmp3_bitrate = 'lots'\n", "[export] mp3_bitrate must be a bitrate like \"128k\" between 8k and 320k, got 'lots'"),
        ("[export]\naac_bitrate = '9000k'\n", "aac_bitrate must be a bitrate"),
        ("[export]\nsample_rate = 5\n", "[export] sample_rate must be one of 0, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, got 5: 0 keeps 24000"),
        ("[stitch]\nparagraph_pause_ms = -100\n", "[stitch] paragraph_pause_ms must be at least 0, got -100"),
        ("[stitch]\nsilence_threshold_db = 10\n", "silence_threshold_db must be between -120 and 0, got 10"),
        ("[text]\nmerge_chars = -1\n", "[text] merge_chars must be between 0 and 2000, got -1"),
        ("[generation]\nexaggeration = 3\n", "[generation] exaggeration must be between 0 and 2, got 3"),
        ("[generation]\ncfm_steps = 0\n", "cfm_steps must be between 1 and 1000, got 0"),
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


def test_the_edges_of_every_range_are_allowed():
    # the bounds themselves are valid settings (cfg_weight 0 disables CFG; top_p 1 disables nucleus)
    edges = {"generation": {"exaggeration": 2.0, "cfg_weight": 0.0, "min_p": 1.0, "top_p": 1.0, "max_new_tokens": 4096},
             "text": {"max_chars": 20, "merge_chars": 0},
             "stitch": {"sentence_pause_ms": 0, "fade_ms": 0, "silence_threshold_db": 0.0},
             "export": {"sample_rate": 44100, "mp3_bitrate": "320k", "aac_bitrate": "16k"}}
    o = load_options(None, edges)
    assert o.generation.exaggeration == 2.0 and o.export.sample_rate == 44100 and o.text.merge_chars == 0

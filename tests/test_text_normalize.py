"""Normalization: Unicode, ASCII folding, unspeakable text, and Chatterbox's punc_norm rules."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from ttsbatch.config import TextOptions
from ttsbatch.text.normalize import describe_unsaid, fold_ascii, normalize_text, punc_norm, unsaid_letters

FULL = TextOptions()  # ascii_fold and normalize_punctuation on
PLAIN = TextOptions(ascii_fold=False, normalize_punctuation=False)
FOLD_ONLY = TextOptions(normalize_punctuation=False)
PUNC_ONLY = TextOptions(ascii_fold=False)


@pytest.mark.parametrize("opts", [FULL, PLAIN, FOLD_ONLY, PUNC_ONLY], ids=["full", "plain", "fold", "punc"])
def test_empty_stays_empty(opts):
    for text in ["", "   ", "\n\t", "😀🎉", "* * *", "—", "...", "\u200b"]:
        if opts.ascii_fold or not any(ch in text for ch in "😀🎉"):
            assert normalize_text(text, opts) == "", repr(text)


@pytest.mark.parametrize("text, said", [
    ("Visit https://example.com/x?y=1.", "Visit example.com."),  # the sentence keeps its full stop
    ("(see http://www.gutenberg.org/ebooks/55)", "(see gutenberg.org)."),
    ("www.example.org is nice", "Example.org is nice."),
    ("At HTTPS://Example.COM:8080/a/b, we met.", "At Example.COM, we met."),
    ('Read "https://a.b.co/x" now!', 'Read "a.b.co" now!'),
    ("http://localhost:8000/x here", "Localhost here."),
    ("the site example.com works", "The site example.com works."),  # no address to shorten
])
def test_web_addresses_are_read_as_their_host(text, said):
    # they were read character class by character class: "Http, localhost,8000 x here."
    assert normalize_text(text, FULL) == said


def test_letters_of_other_scripts_are_counted_by_script():
    text = "Hello Привет 你好 café Ω naïve ß ﬁ 😀 © ٣"
    assert unsaid_letters(text) == {"Cyrillic": 6, "CJK": 2, "Greek": 1}  # most first
    assert list(unsaid_letters(text)) == ["Cyrillic", "CJK", "Greek"]
    for said in ["café", "ß æ ł", "ﬁ", "😀 © →", "plain ASCII.", ""]:
        assert unsaid_letters(said) == {}, said
    # what is counted is what folding removes
    assert "П" not in fold_ascii("При") and fold_ascii("При").strip() == ""
    assert describe_unsaid({"Cyrillic": 6, "CJK": 2}) == "8 letters in other scripts (Cyrillic 6, CJK 2)"
    assert describe_unsaid({"Greek": 1}) == "1 letter in other scripts (Greek 1)"


def test_emoji_kept_without_ascii_fold():
    assert normalize_text("I ❤ NY", PLAIN) == "I ❤ NY"


def test_whitespace_collapse_and_nfkc():
    assert normalize_text("  a\t\tb \n\n c\u00a0d  ", PLAIN) == "a b c d"
    assert normalize_text("ﬁne ｆｕｌｌ wait…", PLAIN) == "fine full wait..."


def test_control_and_format_characters_are_removed():
    assert normalize_text("zero\u200bwidth soft\u00adhyphen bell\x07", PLAIN) == "zerowidth softhyphen bell"


def test_ascii_fold_letters():
    assert normalize_text("Café crème naïve déjà Ångström", FOLD_ONLY) == "Cafe creme naive deja Angstrom"
    assert normalize_text("Straße Œuvre Ærø Łódź Þór", FOLD_ONLY) == "Strasse OEuvre AEro Lodz Thor"


def test_ascii_fold_punctuation():
    assert normalize_text("“Hi,” she said — ‘yes’ – «non» …", FOLD_ONLY) == "\"Hi,\" she said - 'yes' - \"non\" ..."
    assert normalize_text("[note] {x}", FOLD_ONLY) == "(note) (x)"


def test_ascii_fold_symbols():
    assert normalize_text("rock & roll, 50% off, $5.99 or £3, #2, 20°", FOLD_ONLY) == (
        "rock and roll, 50 percent off, 5.99 dollars or 3 pounds, number 2, 20 degrees"
    )
    assert normalize_text("and/or ===== ~~~ +++ ***", FOLD_ONLY) == "and or"


def test_ascii_fold_drops_what_cannot_be_said():
    assert normalize_text("I ❤️ NY 😀 → up ✓", FOLD_ONLY) == "I NY up"
    assert normalize_text("Привет мир", FOLD_ONLY) == ""


def test_fold_output_alphabet():
    text = "Ünïcödé “quotes” — ½ ² ™ © ® € 😀 中文 \x01 \u0301 keep .,!?;:'\"-()"
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?;:'\"-()")
    assert set(normalize_text(text, FULL)) <= allowed
    assert set(fold_ascii(text)) <= allowed


def test_fold_keeps_plain_ascii_untouched():
    text = "Plain text, with (parens) and 'quotes'; fine: yes? no! 3.14 - done."
    assert fold_ascii(text) == text


def test_punctuation_rules_in_normalize_text():
    assert normalize_text("hello world", FULL) == "Hello world."
    assert normalize_text("wait… what: yes; no", FULL) == "Wait, what, yes, no."  # no double spaces
    assert normalize_text("  spaced   out  ", FULL) == "Spaced out."
    assert normalize_text("Already done!", FULL) == "Already done!"
    assert normalize_text('He said "Go."', FULL) == 'He said "Go."'  # punc_norm alone gives '"Go.".'
    assert normalize_text("(A note.)", FULL) == "(A note.)"
    assert normalize_text('He said "Go"', FULL) == 'He said "Go".'



def test_punc_norm_rules():
    assert punc_norm("") == ""
    assert punc_norm("hello") == "Hello."
    assert punc_norm("a - b") == "A, b."
    assert punc_norm("x...") == "X,"
    assert punc_norm("“q” ‘s’ em—dash en–dash") == "\"q\" 's' em-dash en-dash."
    assert punc_norm("ends with dash -") == "Ends with dash -"


PUNC_NORM_CASES = [
    "hello world",
    "Hello... world",
    "wait…what",
    "a: b; c",
    "a - b - c",
    "em—dash and en–dash",
    "“double” and ‘single’ quotes",
    "ends with comma,",
    "ends with dash -",
    "  multiple   spaces  here ",
    " leading space keeps lowercase",
    "x ,y , z",
    "already ends!",
    "question?",
    "lower start: yes...",
    "élan vital",
    "3.14 is pi",
    '"quoted."',
]


def _chatterbox_punc_norm():
    """The installed ``chatterbox.tts.punc_norm``, compiled from its source file.

    Importing ``chatterbox.tts`` pulls in torch, transformers and diffusers (15-20 s); the
    function itself uses only builtins, so its definition is taken from the installed
    file with ``ast`` and compiled alone: the real code, without the imports.
    """
    spec = importlib.util.find_spec("chatterbox")  # locates the package, runs nothing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("chatterbox-tts is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tts.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "punc_norm"]
    namespace: dict = {}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["punc_norm"]


def test_punc_norm_matches_chatterbox():
    """Our copy of the rules gives what the real chatterbox.tts.punc_norm gives."""
    real = _chatterbox_punc_norm()
    for text in PUNC_NORM_CASES:
        assert punc_norm(text) == real(text), repr(text)
    # The one deliberate difference: empty text stays empty instead of a canned sentence.
    assert real("") != "" and punc_norm("") == ""

"""Text normalization: what a chunk looks like when it is sent to the model.

``normalize_text`` runs these steps, in order:

1. Unicode NFKC (ligatures, full-width forms, ``…`` -> ``...``, no-break spaces -> spaces);
   control and format characters (zero-width spaces, soft hyphens, BOMs) are removed.
2. With ``ascii_fold``: accented letters lose their accents (``é`` -> ``e``, ``ß`` -> ``ss``),
   curly quotes become straight ones, dashes become ``-``, a few symbols are spelled out
   (``&`` -> ``and``, ``%`` -> ``percent``, ``$5`` -> ``5 dollars``, see ``_SYMBOL_WORDS``),
   brackets become parentheses, web addresses are read as their host
   (``https://www.gutenberg.org/ebooks/55`` -> ``gutenberg.org``), and everything else that
   is not an ASCII letter, a digit or one of ``.,!?;:'"-()`` (emoji, arrows, other
   scripts, ...) becomes a space.
3. Whitespace is collapsed to single spaces and stripped.
4. Text with no letter or digit left is unspeakable and becomes ``""``.
5. With ``normalize_punctuation``: Chatterbox's own ``punc_norm`` rules (``punc_norm`` below
   is a copy of ``chatterbox.tts.punc_norm`` that leaves empty text empty), then the double
   spaces its replacements can leave are collapsed and the full stop it appends after an
   already punctuated closing quote is taken back (``"Go."`` not ``"Go.".``).

Normalization may make text longer (``...`` from ``…``, spelled-out symbols, the full stop
that ``punc_norm`` appends); the chunker measures the normalized text, never the source.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from ..config import TextOptions

__all__ = ["normalize_text", "punc_norm", "fold_ascii", "unsaid_letters", "describe_unsaid"]

_WS_RE = re.compile(r"\s+")

# chatterbox.tts.punc_norm's replacement table, in its order (chatterbox-tts 0.1.7).
_PUNC_TO_REPLACE = (
    ("...", ", "),
    ("…", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)
_SENTENCE_ENDERS = (".", "!", "?", "-", ",")
_STOP_AFTER_QUOTE_RE = re.compile(r"([.!?,\-][\"')\]]+)\.$")


def punc_norm(text: str) -> str:
    """Chatterbox's ``punc_norm``, rule for rule, except that empty text stays empty.

    Capitalizes the first character (only if it is a lowercase letter, before the
    whitespace collapse, as the original does), collapses whitespace, applies the
    replacement table and appends ``.`` unless the text ends in one of ``.!?-,``.
    """
    if len(text) == 0:
        return ""
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _PUNC_TO_REPLACE:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(_SENTENCE_ENDERS):
        text += "."
    return text


# Letters that have no Unicode decomposition to ASCII.
_LETTERS = {
    "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O",
    "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D",
    "ı": "i", "ħ": "h", "Ħ": "H", "ŋ": "ng", "Ŋ": "Ng", "ĸ": "k", "ſ": "s",
}
# Quotes, dashes and brackets.
_PUNCT = {
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "`": "'", "´": "'",
    "“": '"', "”": '"', "„": '"', "‟": '"', "«": '"', "»": '"', "‹": "'", "›": "'", "″": '"',
    "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-", "⁃": "-",
    "[": "(", "]": ")", "{": "(", "}": ")",
    "…": "...", "⁄": " over ", "/": " ",  # NFKC turns ½ into 1⁄2 (fraction slash)
    "¡": "", "¿": "",  # Spanish opening marks: the closing mark is kept
}
# Symbols with a spoken form (spaces are collapsed afterwards).
_SYMBOL_WORDS = {
    "&": " and ", "%": " percent", "‰": " per mille", "+": " plus ", "=": " equals ",
    "@": " at ", "°": " degrees", "×": " times ", "÷": " divided by ", "±": " plus or minus ",
    "$": " dollars ", "£": " pounds ", "€": " euros ", "¥": " yen ", "¢": " cents ",
    "§": " section ", "¶": " paragraph ",
}
_CURRENCY_RE = re.compile(r"([$£€¥])\s?(\d+(?:,\d{3})*(?:\.\d+)?)")
_CURRENCY_WORD = {"$": "dollars", "£": "pounds", "€": "euros", "¥": "yen"}
_NUMBER_SIGN_RE = re.compile(r"#\s?(?=\d)")  # "#5" -> "number 5"; any other "#" is dropped
# A run of one symbol ("=====", "& & &" is fine) is a divider, not something to say.
_SYMBOL_RUN_RE = re.compile(r"([&%‰+=@°×÷±$£€¥¢§¶])\1+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,!?;:])(?=\s|$)")
_NEEDS_FOLD_RE = re.compile(r"[^A-Za-z0-9 .,!?;:'\"()\-\s]")
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?;:'\"-()")


@lru_cache(maxsize=8192)
def _fold_char(ch: str) -> str:
    if ch in _KEEP:
        return ch
    if ch in _LETTERS:
        return _LETTERS[ch]
    if ch in _PUNCT:
        return _PUNCT[ch]
    if ch in _SYMBOL_WORDS:
        return _SYMBOL_WORDS[ch]
    cat = unicodedata.category(ch)
    if cat == "Mn" or cat == "Cf" or cat == "Me":
        return ""  # combining accents, zero-width characters
    decomposed = unicodedata.normalize("NFKD", ch)
    if decomposed != ch:
        out = "".join(_fold_char(c) for c in decomposed)
        if out.strip():
            return out
    return " "  # emoji, arrows, other scripts: nothing the English tokenizer can say


# A web address: scheme or "www.", host, then any path, query or fragment, but not the
# punctuation that ends its sentence ("see https://example.com/x." keeps its full stop).
_URL_RE = re.compile(
    r"\b(?:(?:https?|ftp)://(?:www\.)?|www\.)([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)(?::\d+)?(?:[/?#]\S*?)?"
    r"(?=[.,!?;:)\]\"']*(?:\s|$))",
    re.IGNORECASE,
)


def fold_ascii(text: str) -> str:
    """Fold ``text`` to the characters Chatterbox's English tokenizer can say (see module doc)."""
    if "://" in text or "www." in text or "WWW." in text:
        # read as their host: "https://www.gutenberg.org/ebooks/55?x=1" is "gutenberg.org"
        text = _URL_RE.sub(lambda m: m.group(1), text)
    if not _NEEDS_FOLD_RE.search(text):
        return text
    text = _SYMBOL_RUN_RE.sub(" ", text)
    text = _CURRENCY_RE.sub(lambda m: f"{m.group(2)} {_CURRENCY_WORD[m.group(1)]}", text)
    text = _NUMBER_SIGN_RE.sub(" number ", text)
    text = _NEEDS_FOLD_RE.sub(lambda m: _fold_char(m.group()), text)
    # What was dropped may leave a space before punctuation: "Hello 😀." -> "Hello ."
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)


_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
# The first word of a letter's Unicode name is its script ("CYRILLIC SMALL LETTER A"), but
# for these: Chinese characters are "CJK UNIFIED IDEOGRAPH-4F60".
_SCRIPT_NAMES = {"CJK": "CJK"}


def unsaid_letters(text: str) -> dict[str, int]:
    """The letters of ``text`` that ``fold_ascii`` drops, counted by script, most first.

    These are letters of other scripts (Cyrillic, Greek, CJK, ...) that Chatterbox's English
    model cannot say: folding turns them into spaces, so their words are not spoken. Accented
    Latin letters fold to plain ones and are not counted; nor are emoji and symbols.
    """
    counts: dict[str, int] = {}
    for m in _NON_ASCII_RE.finditer(text):
        ch = unicodedata.normalize("NFKC", m.group())
        if not ch.isalpha() or _fold_char(ch[0]).strip():
            continue
        word = unicodedata.name(ch[0], "OTHER").split()[0]
        script = _SCRIPT_NAMES.get(word, word.capitalize())
        counts[script] = counts.get(script, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def describe_unsaid(counts: dict[str, int]) -> str:
    """``{"Cyrillic": 23, "CJK": 4}`` as "27 letters in other scripts (Cyrillic 23, CJK 4)"."""
    n = sum(counts.values())
    scripts = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{n} letter{'s' if n != 1 else ''} in other scripts ({scripts})"


def _drop_controls(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        c if c.isspace() else "" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in text
    )


def normalize_text(text: str, opts: TextOptions) -> str:
    """The text of one chunk as the model gets it; ``""`` when nothing in it can be spoken."""
    text = unicodedata.normalize("NFKC", text)
    text = _drop_controls(text)
    if opts.ascii_fold:
        text = fold_ascii(text)
    text = _WS_RE.sub(" ", text).strip()
    if not any(c.isalnum() for c in text):
        return ""
    if opts.normalize_punctuation:
        # punc_norm collapses spaces before its replacements, which can leave doubles
        # ("wait… what" -> "Wait,  what."); the model gets single spaces.
        text = _WS_RE.sub(" ", punc_norm(text))
        # ...and the full stop it appends after a closing quote: 'He said "Go."' stays so.
        text = _STOP_AFTER_QUOTE_RE.sub(r"\1", text)
    return text
